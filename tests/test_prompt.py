"""Prompt layout: exact context/question spans and character offsets."""

import pytest

from ray_scout.core.llm.prompt import PromptError, build_prompt

CONTEXT = "The museum opened in 1887. Its first director was Clara Mendes, a botanist from Lisbon."
QUESTION = "Who was the first director?"


def test_context_span_decodes_to_the_context(tiny_model):
    tok = tiny_model.tokenizer
    layout = build_prompt(tok, CONTEXT, QUESTION)
    span = layout.context_span
    assert tok.decode(layout.input_ids[span.start:span.stop]) == CONTEXT
    q = layout.question_span
    assert tok.decode(layout.input_ids[q.start:q.stop]) == QUESTION
    assert span.stop <= q.start < q.stop < layout.num_tokens


def test_offsets_cover_each_context_token(tiny_model):
    tok = tiny_model.tokenizer
    layout = build_prompt(tok, CONTEXT, QUESTION)
    assert layout.context_offsets.shape == (layout.num_context, 2)
    for i, (start, end) in enumerate(layout.context_offsets.tolist()):
        token = layout.input_ids[layout.context_span.start + i]
        assert tok.decode([token]) == CONTEXT[start:end]


def test_chat_template_ends_with_assistant_turn(tiny_model):
    layout = build_prompt(tiny_model.tokenizer, CONTEXT, QUESTION)
    assert tiny_model.tokenizer.decode(layout.input_ids).endswith("<|im_start|>assistant\n")


def test_plain_fallback_without_chat_template(tiny_model):
    class NoTemplate:
        chat_template = None

        def __call__(self, *args, **kwargs):
            return tiny_model.tokenizer(*args, **kwargs)

    layout = build_prompt(NoTemplate(), CONTEXT, QUESTION)
    text = tiny_model.tokenizer.decode(layout.input_ids)
    assert "<|im_start|>" not in text and text.endswith("Answer:")


def test_non_context_positions_are_the_complement(tiny_model):
    layout = build_prompt(tiny_model.tokenizer, CONTEXT, QUESTION)
    outside = set(layout.non_context_positions().tolist())
    assert len(outside) + layout.num_context == layout.num_tokens
    assert not outside & set(layout.context_span)


@pytest.mark.parametrize("context,question", [("", "q?"), ("text", "  "), ("a\x00b", "q?")])
def test_bad_prompt_input_raises(tiny_model, context, question):
    with pytest.raises(PromptError):
        build_prompt(tiny_model.tokenizer, context, question)


def test_plain_prompt_starts_with_the_bos_the_tokenizer_adds(tiny_model):
    tok = tiny_model.tokenizer

    class BaseModelTokenizer:  # no chat template; puts BOS first, as Gemma's does
        chat_template = None
        bos_token_id = 7

        def __call__(self, text, add_special_tokens=True, **kwargs):
            out = tok(text, add_special_tokens=False, **kwargs)
            if add_special_tokens:
                out["input_ids"] = [7] + out["input_ids"]
            return out

    layout = build_prompt(BaseModelTokenizer(), CONTEXT, QUESTION)
    assert int(layout.input_ids[0]) == 7 and 7 not in layout.input_ids[1:].tolist()
    span = layout.context_span
    assert tok.decode(layout.input_ids[span.start:span.stop]) == CONTEXT
    # A tokenizer that adds no BOS (the tiny one's, without its template) gets none.
    class NoBos(BaseModelTokenizer):
        def __call__(self, text, add_special_tokens=True, **kwargs):
            return tok(text, add_special_tokens=False, **kwargs)

    assert int(build_prompt(NoBos(), CONTEXT, QUESTION).input_ids[0]) != 7
