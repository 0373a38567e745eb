"""Prefill, query capture and greedy decoding from whole and pruned KV."""

import pytest
import torch

from ray_scout.core.llm.generation import (
    GenerationError, _attention_mask, answer_full, answer_pruned, attention_modules,
    continue_after_batch, greedy_answer, kept_prompt_positions, prefill, pruned_snapshot,
)
from ray_scout.core.llm.prompt import build_prompt

CONTEXT = "The museum opened in 1887. Its first director was Clara Mendes, a botanist from Lisbon."
QUESTION = "Who was the first director of the museum?"


@pytest.fixture(scope="module")
def tiny_layout(tiny_model):
    return build_prompt(tiny_model.tokenizer, CONTEXT, QUESTION)


def test_prefill_snapshot_and_logits_match_a_plain_forward(tiny_model, tiny_layout):
    pre = prefill(tiny_model, tiny_layout, capture="all")
    with torch.inference_mode():
        out = tiny_model.model(tiny_layout.input_ids.unsqueeze(0))
    torch.testing.assert_close(pre.logits, out.logits[0, -1])
    assert pre.snapshot.num_tokens == tiny_layout.num_tokens
    assert sorted(pre.queries) == list(range(tiny_model.facts.num_layers))
    heads = tiny_model.facts.num_attention_heads
    assert pre.queries[0].shape == (heads, tiny_layout.num_tokens, tiny_model.facts.head_dim)


def test_captured_query_reproduces_sdpa_output(tiny_model, tiny_layout):
    """softmax(q k^T) v from the hooked query equals the module's own attention output."""
    pre = prefill(tiny_model, tiny_layout, capture="last")
    module = attention_modules(tiny_model)[-1]
    seen = {}

    def keep_output(mod, args, out):
        seen["out"] = out[0]

    handle = module.register_forward_hook(keep_output)
    try:
        with torch.inference_mode():
            tiny_model.model(tiny_layout.input_ids.unsqueeze(0))
    finally:
        handle.remove()
    layer = pre.last_layer
    group = tiny_model.facts.gqa_ratio
    k = pre.snapshot.keys[layer].repeat_interleave(group, 0)
    v = pre.snapshot.values[layer].repeat_interleave(group, 0)
    attn = torch.nn.functional.scaled_dot_product_attention(pre.queries[layer], k, v, is_causal=True)
    mine = module.o_proj(attn.transpose(0, 1).reshape(tiny_layout.num_tokens, -1))
    torch.testing.assert_close(mine, seen["out"][0], atol=1e-5, rtol=1e-4)


def test_greedy_answer_matches_transformers_generate(tiny_model, tiny_layout):
    answer = answer_full(tiny_model, tiny_layout, max_new_tokens=8)
    ids = tiny_layout.input_ids.unsqueeze(0)
    with torch.inference_mode():
        ref = tiny_model.model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert answer.token_ids == tuple(ref[:len(answer.token_ids)])
    assert answer.prefill_s is not None and answer.decode_s > 0


def test_pruned_path_keeping_everything_equals_full(tiny_model, tiny_layout):
    pre = prefill(tiny_model, tiny_layout, capture="none")
    full = greedy_answer(tiny_model, pre.snapshot, pre.logits, max_new_tokens=8)
    pruned = answer_pruned(tiny_model, pre, torch.arange(tiny_layout.num_context), max_new_tokens=8)
    assert pruned.token_ids == full.token_ids
    assert pruned.kept_tokens == tiny_layout.num_tokens


def test_pruned_path_keeps_selected_context_and_all_non_context(tiny_model, tiny_layout):
    kept = kept_prompt_positions(tiny_layout, torch.tensor([0, 3, 5]))
    start = tiny_layout.context_span.start
    assert kept.tolist() == sorted(tiny_layout.non_context_positions().tolist() + [start, start + 3, start + 5])
    pre = prefill(tiny_model, tiny_layout, capture="none")
    answer = answer_pruned(tiny_model, pre, torch.tensor([0, 3, 5]), max_new_tokens=4)
    assert answer.kept_tokens == len(kept)


def test_out_of_range_context_positions_raise(tiny_layout):
    with pytest.raises(IndexError):
        kept_prompt_positions(tiny_layout, torch.tensor([tiny_layout.num_context]))


def test_bad_capture_and_token_budget_raise(tiny_model, tiny_layout):
    with pytest.raises(GenerationError):
        prefill(tiny_model, tiny_layout, capture="first")
    pre = prefill(tiny_model, tiny_layout, capture="none")
    with pytest.raises(GenerationError):
        greedy_answer(tiny_model, pre.snapshot, pre.logits, max_new_tokens=0)


@pytest.mark.model
def test_embedded_model_answers_extractively(embedded_model):
    layout = build_prompt(embedded_model.tokenizer, CONTEXT, QUESTION)
    answer = answer_full(embedded_model, layout)
    assert "Clara Mendes" in answer.text
    assert "\n" not in answer.text


@pytest.fixture(scope="module")
def sliding_model(tiny_model):
    """A tiny random Gemma 3 whose every layer attends within 48 positions."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from ray_scout.core.llm.models import KVFacts, LoadedModel

    config = Gemma3TextConfig(
        vocab_size=tiny_model.model.config.vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        sliding_window=48, layer_types=["sliding_attention"] * 2, query_pre_attn_scalar=32)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    return LoadedModel("random:tiny-sliding", model, tiny_model.tokenizer,
                       KVFacts.from_config(config, "random:tiny-sliding"))


def test_a_sliding_layer_sees_a_kept_token_only_within_its_window(sliding_model):
    # Context tokens more than a window before the answer are invisible to every layer of
    # this model, so keeping some of them must change nothing; the recent context is
    # thinned so that cache entries and positions part (a window counted in entries, as
    # transformers counts it, would reach back to the old tokens: Gemma's scout at 1K
    # tokens answered nothing that way).
    layout = build_prompt(sliding_model.tokenizer, " ".join([CONTEXT] * 4), QUESTION)
    pre = prefill(sliding_model, layout, capture="none")
    steps = 6
    context_start = layout.context_span.start
    reach = layout.num_tokens + steps - 48  # the window of the last decoded token
    old = [p for p in range(layout.num_context) if context_start + p < reach][:5]
    recent = [p for p in range(layout.num_context) if context_start + p >= reach][::2]
    assert len(old) == 5 and len(recent) >= 2
    answers = [answer_pruned(sliding_model, pre, torch.tensor(kept), max_new_tokens=steps)
               for kept in (old + recent, recent)]
    assert len(answers[0].token_ids) == steps
    assert answers[0].token_ids == answers[1].token_ids
    # A batch of the two prunings (left-padded to one width) decodes the same tokens.
    snapshots = [pruned_snapshot(pre, torch.tensor(kept)) for kept in (old + recent, recent)]
    tail = layout.input_ids[-1:].tolist()
    batch, _ = continue_after_batch(sliding_model, snapshots, [tail, tail], max_new_tokens=steps)
    assert [a.token_ids for a in batch] == [answers[0].token_ids] * 2


def test_a_whole_cache_on_a_sliding_model_keeps_the_models_own_mask(sliding_model):
    # Entries are positions: the usual padding mask, so full-context answers are those of
    # transformers' own decoding.
    layout = build_prompt(sliding_model.tokenizer, " ".join([CONTEXT] * 4), QUESTION)
    pre = prefill(sliding_model, layout, capture="none")
    keys = pre.snapshot.positions.unsqueeze(0)
    mask = _attention_mask(sliding_model, keys, torch.ones_like(keys, dtype=torch.bool),
                           keys[:, -1:])
    assert mask.shape == keys.shape and bool(mask.all())
    ids = layout.input_ids.unsqueeze(0)
    ref = sliding_model.model.generate(ids, max_new_tokens=6, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    answer = greedy_answer(sliding_model, pre.snapshot, pre.logits, max_new_tokens=6)
    assert answer.token_ids == tuple(ref.tolist()[:len(answer.token_ids)])
