"""Prompt layout: where the context and the question sit among a prompt's tokens.

What lives here: the one prompt wording every mode shares (chat template when the tokenizer
has one; for base models a plain completion prompt ending in "Answer:", after the BOS token
the tokenizer would put first), tokenized piece by piece so the context and question token
ranges are exact, plus the character offsets of every context token inside the context
string (the common ground for mapping positions between tokenizers). What it leaves to
others: running the model (``generation``) and choosing positions (``selection``).
"""

from __future__ import annotations

import dataclasses

import torch

SYSTEM = "You answer questions about a text. Reply with the shortest exact phrase from the text."
_CONTEXT_MARK = "\x00CONTEXT\x00"
_QUESTION_MARK = "\x00QUESTION\x00"
USER = f"Text: {_CONTEXT_MARK}\n\nQuestion: {_QUESTION_MARK}\nAnswer in a few words."
# Base models (no chat template) complete the text: after "Answer:" Gemma 3 270M writes the
# span itself and then a newline, where decoding stops.
PLAIN = f"{SYSTEM}\n\nText: {_CONTEXT_MARK}\n\nQuestion: {_QUESTION_MARK}\nAnswer:"
# Synthetic prompts (timing at real shapes without text): template tokens around the context
# and after the question, and a question span of realistic length for Q2C to sum over.
SYNTHETIC_TEMPLATE_TOKENS = 16
SYNTHETIC_QUESTION_TOKENS = 32


class PromptError(ValueError):
    """A context or question the prompt cannot be built from."""


@dataclasses.dataclass(frozen=True)
class PromptLayout:
    """A tokenized prompt; spans are ``range`` objects over token indices.

    ``context_offsets[i]`` is the ``(start, end)`` character range of context token ``i``
    inside ``context`` (the string, not the rendered prompt).
    """

    input_ids: torch.Tensor
    context_span: range
    question_span: range
    context_offsets: torch.Tensor
    context: str
    question: str

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_context(self) -> int:
        return len(self.context_span)

    def non_context_positions(self) -> torch.Tensor:
        """Every prompt position outside the context (template and question)."""
        all_positions = torch.arange(self.num_tokens)
        inside = (all_positions >= self.context_span.start) & (all_positions < self.context_span.stop)
        return all_positions[~inside]


def _render(tokenizer) -> str:
    """The prompt text with marks where the context and question go."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
            tokenize=False,
            add_generation_prompt=True,
        )
    return PLAIN


def _start_ids(tokenizer) -> list[int]:
    """The BOS token where the tokenizer starts every text with one and the prompt is plain
    text: a chat template writes its own, and Gemma without BOS answers with noise."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if getattr(tokenizer, "chat_template", None) or bos is None:
        return []
    return [bos] if tokenizer("a")["input_ids"][:1] == [bos] else []


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def build_prompt(tokenizer, context: str, question: str) -> PromptLayout:
    """Tokenize the shared prompt around ``context`` and ``question``.

    The pieces between the marks are tokenized separately so that no token straddles the
    context boundary; the context's own tokenization (with offsets) is therefore the same in
    every prompt, which the scout payload and cross-tokenizer mapping rely on.
    """
    if not context.strip():
        raise PromptError("empty context: selection and scout need a document to select from")
    if not question.strip():
        raise PromptError("empty question: Q2C scores the context against the question")
    for name, text in (("context", context), ("question", question)):
        if "\x00" in text:
            raise PromptError(f"{name} contains a NUL character; strip it before prompting")
    rendered = _render(tokenizer)
    head, rest = rendered.split(_CONTEXT_MARK)
    middle, tail = rest.split(_QUESTION_MARK)
    encoded = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    context_ids = encoded["input_ids"]
    offsets = torch.tensor(encoded["offset_mapping"], dtype=torch.long).reshape(-1, 2)
    head_ids, middle_ids = _start_ids(tokenizer) + _ids(tokenizer, head), _ids(tokenizer, middle)
    question_ids, tail_ids = _ids(tokenizer, question), _ids(tokenizer, tail)
    c0 = len(head_ids)
    q0 = c0 + len(context_ids) + len(middle_ids)
    ids = head_ids + context_ids + middle_ids + question_ids + tail_ids
    return PromptLayout(
        input_ids=torch.tensor(ids, dtype=torch.long),
        context_span=range(c0, c0 + len(context_ids)),
        question_span=range(q0, q0 + len(question_ids)),
        context_offsets=offsets,
        context=context,
        question=question,
    )


def synthetic_layout(num_tokens: int, vocab_size: int, *, seed: int = 0) -> PromptLayout:
    """A prompt of random ids with the layout of a real one: template, context, question,
    template. Its context text is a placeholder (one character per token)."""
    if num_tokens < 2 * SYNTHETIC_TEMPLATE_TOKENS + SYNTHETIC_QUESTION_TOKENS + 1:
        raise ValueError(f"need more than {2 * SYNTHETIC_TEMPLATE_TOKENS + SYNTHETIC_QUESTION_TOKENS} tokens")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, min(vocab_size, 40_000), (num_tokens,), generator=generator)
    question_end = num_tokens - SYNTHETIC_TEMPLATE_TOKENS
    context = range(SYNTHETIC_TEMPLATE_TOKENS, question_end - SYNTHETIC_QUESTION_TOKENS)
    offsets = torch.stack([torch.arange(len(context)), torch.arange(1, len(context) + 1)], 1)
    return PromptLayout(ids, context, range(question_end - SYNTHETIC_QUESTION_TOKENS, question_end),
                        offsets, "x" * len(context), "q")
