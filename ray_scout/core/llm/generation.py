"""Generation: one prefill pass, then greedy decoding from a whole or pruned KV cache.

What lives here: the prefill (SDPA, batch one) that yields the prompt's ``KVSnapshot``, its
next-token logits and the post-RoPE query states of chosen layers (so Q2C never needs eager
attention): on CUDA through ``fused_prefill``, elsewhere through the model's own forward
with forward pre-hooks that recompute the queries; greedy decoding that continues at a snapshot's
original positions; and the pruned path (keep selected context positions plus every
non-context token). What it leaves to others: which positions to keep (``selection``),
how KV travels (``kvcodec``), and where the two halves run (the actors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
import dataclasses
import time

import torch

from ray_scout.core.llm import fused_prefill
from ray_scout.core.llm.kv import KVSnapshot
from ray_scout.core.llm.models import LoadedModel
from ray_scout.core.llm.prompt import PromptLayout

DEFAULT_MAX_NEW_TOKENS = 24


class GenerationError(ValueError):
    """A model or cache that generation cannot work with."""


@dataclasses.dataclass(frozen=True)
class Prefill:
    """The result of prefilling a prompt.

    ``queries[layer]`` is ``[heads, tokens, head_dim]`` (after RoPE, before the softmax
    scaling ``scaling``) for every layer asked for; empty when none was.
    """

    layout: PromptLayout
    snapshot: KVSnapshot
    logits: torch.Tensor
    queries: dict[int, torch.Tensor]
    scaling: float
    prefill_s: float

    @property
    def last_layer(self) -> int:
        return self.snapshot.num_layers - 1


@dataclasses.dataclass(frozen=True)
class Answer:
    """A decoded answer; ``prefill_s`` is None where the caller did the prefill."""

    text: str
    token_ids: tuple[int, ...]
    decode_s: float
    prefill_s: float | None = None
    kept_tokens: int | None = None


def attention_modules(lm: LoadedModel) -> list:
    """The self-attention module of every decoder layer, in order."""
    try:
        layers = lm.model.model.layers
    except AttributeError:
        raise GenerationError(
            f"{lm.model_id}: expected a decoder-only model with model.model.layers "
            "(Llama/Qwen/Mistral style); other layouts need their own query hook"
        ) from None
    return [layer.self_attn for layer in layers]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _recompute_query(module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """q = rope(q_proj(hidden)) as the attention module computes it, ``[heads, T, d]``."""
    cos, sin = position_embeddings
    q = module.q_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim)
    if hasattr(module, "q_norm"):  # Qwen3-style per-head norm before RoPE
        q = module.q_norm(q)
    q = q.transpose(1, 2)
    if cos.shape[-1] != q.shape[-1]:
        raise GenerationError("partial rotary embeddings are not supported by the query hook")
    q = q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)
    return q[0]


@contextlib.contextmanager
def _query_hooks(lm: LoadedModel, layers: list[int], sink: dict[int, torch.Tensor]):
    modules = attention_modules(lm)
    handles = []
    for layer in layers:
        def hook(module, args, kwargs, layer=layer):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            sink[layer] = _recompute_query(module, hidden, kwargs["position_embeddings"])
        handles.append(modules[layer].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _query_layers(capture: str, num_layers: int) -> list[int]:
    if capture == "none":
        return []
    if capture == "last":
        return [num_layers - 1]
    if capture == "all":
        return list(range(num_layers))
    raise GenerationError(f"capture must be 'none', 'last' or 'all', not {capture!r}")


def _finished_s(lm: LoadedModel, start: float) -> float:
    """Seconds since ``start`` once the device has finished the work queued so far: on a GPU
    the forward only queues kernels, and ``prefill_s`` is meant as the prefill's duration."""
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
    return time.perf_counter() - start


def uses_fused_prefill(lm: LoadedModel) -> bool:
    """Whether ``prefill`` takes ``fused_prefill`` by default: on CUDA, for the
    architectures it supports (docs/PERFORMANCE.md, section 2, measures it); the CPU keeps
    the transformers forward."""
    return lm.device.type == "cuda" and fused_prefill.supports(lm.model)


@torch.inference_mode()
def prefill(lm: LoadedModel, layout: PromptLayout, *, capture: str = "last",
            fused: bool | None = None) -> Prefill:
    """Run the prompt once with SDPA attention.

    ``capture`` picks the layers whose query states are recorded: ``"last"`` (Q2C, SnapKV,
    H2O), ``"all"`` (the all-layer Q2C average), or ``"none"``. ``fused`` picks the path:
    ``fused_prefill.forward`` (compiled on CUDA; its queries come straight out of the QKV
    projection) or the model's own forward with query hooks; None takes
    ``uses_fused_prefill``. Both compute the same snapshot, logits and queries up to float
    rounding (tests/test_fused_prefill.py).
    """
    num_layers = lm.facts.num_layers
    layers = _query_layers(capture, num_layers)
    if fused is None:
        fused = uses_fused_prefill(lm)
    elif fused and not fused_prefill.supports(lm.model):
        raise GenerationError(f"{lm.model_id}: fused_prefill supports Llama/Qwen2 decoders "
                              "with full attention; prefill with fused=False")
    ids = layout.input_ids.to(lm.device)
    scaling = float(attention_modules(lm)[-1].scaling)
    if fused:
        start = time.perf_counter()
        out = fused_prefill.forward(lm.model, ids, layers, compiled=lm.device.type == "cuda")
        elapsed = _finished_s(lm, start)
        snapshot = KVSnapshot(out.keys, out.values, torch.arange(layout.num_tokens))
        return Prefill(layout, snapshot, out.logits, out.queries, scaling, elapsed)
    queries: dict[int, torch.Tensor] = {}
    start = time.perf_counter()
    with _query_hooks(lm, layers, queries):
        # Only the last row's logits are needed: skips a [T, vocab] projection.
        out = lm.model(input_ids=ids.unsqueeze(0), cache=full_cache(),
                       use_cache=True, logits_to_keep=1)
    elapsed = _finished_s(lm, start)
    snapshot = KVSnapshot.from_cache(out.cache)
    return Prefill(layout, snapshot, out.logits[0, -1].float(), queries, scaling, elapsed)


def full_cache():
    """An empty cache whose every layer keeps every token, sliding-window layers included
    (``KVSnapshot.to_cache`` says why); the mask applies the window (``_attention_mask``)."""
    from transformers import DynamicCache

    return DynamicCache()


def _attention_mask(lm: LoadedModel, key_positions: torch.Tensor, valid: torch.Tensor,
                    query_positions: torch.Tensor):
    """The mask of a decoding step over a (possibly pruned or padded) cache.

    ``key_positions`` ``[batch, keys]``: the original position of every cache entry, this
    step's tokens included; ``valid``: which entries are real (not padding);
    ``query_positions`` ``[batch, queries]``. Where the model has no sliding-window layers,
    or every row's entries are consecutive positions (a whole prompt), the usual
    ``[batch, keys]`` padding mask. Otherwise (a pruned cache on Gemma 3) a 4D mask per
    layer type built from original positions: transformers counts the window in cache
    entries, so over a pruned cache a sliding layer would attend to kept tokens farther
    back than its window, at rotary distances it never saw (Gemma's scout at 1K tokens
    answered nothing). A sliding layer sees a kept token only where the unpruned prompt
    would have shown it, within ``sliding_window`` positions.
    """
    config = lm.model.config
    window = getattr(config, "sliding_window", None)
    if not window or "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
        return valid.long()
    back = torch.arange(key_positions.shape[1] - 1, -1, -1, device=key_positions.device)
    if bool(((key_positions == key_positions[:, -1:] - back) | ~valid).all()):
        return valid.long()  # entries are positions: the window counts the same
    query = query_positions[:, None, :, None]
    key = key_positions[:, None, None, :]
    seen = valid[:, None, None, :] & (key <= query)
    masks = {"full_attention": seen, "sliding_attention": seen & (query - key < window)}
    implementation = config._attn_implementation
    if implementation == "eager":  # additive
        dtype = lm.model.dtype
        return {kind: torch.zeros(m.shape, dtype=dtype, device=m.device)
                .masked_fill(~m, torch.finfo(dtype).min) for kind, m in masks.items()}
    if implementation != "sdpa":
        raise GenerationError(f"a sliding-window model decodes here with sdpa or eager "
                              f"attention, not {implementation!r}")
    return masks


def _is_stop(lm: LoadedModel, token: int, text: str) -> bool:
    eos = lm.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {lm.tokenizer.eos_token_id}
    return token in eos_ids or "\n" in text


@torch.inference_mode()
def greedy_answer(
    lm: LoadedModel,
    snapshot: KVSnapshot,
    first_logits: torch.Tensor,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> Answer:
    """Greedy decoding after ``snapshot`` (possibly pruned), starting from ``first_logits``.

    New tokens take original positions from ``snapshot.next_position`` on, so RoPE phases
    stay those of the unpruned prompt. Stops at EOS or at a newline (answers are one line).
    """
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    snapshot.check_matches(lm.facts)
    start = time.perf_counter()
    cache = snapshot.to_cache()
    position = snapshot.next_position
    keys = snapshot.positions.to(lm.device).unsqueeze(0)
    token = int(first_logits.argmax())
    tokens: list[int] = []
    while True:
        piece = lm.tokenizer.decode([token])
        if _is_stop(lm, token, piece):
            break
        tokens.append(token)
        if len(tokens) >= max_new_tokens:
            break
        query = torch.tensor([[position]], device=lm.device)
        keys = torch.cat([keys, query], dim=1)
        out = lm.model(
            input_ids=torch.tensor([[token]], device=lm.device),
            position_ids=query,
            attention_mask=_attention_mask(lm, keys, torch.ones_like(keys, dtype=torch.bool),
                                           query),
            cache=cache,
            use_cache=True,
        )
        cache = out.cache
        position += 1
        token = int(out.logits[0, -1].argmax())
    elapsed = time.perf_counter() - start
    text = lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return Answer(text, tuple(tokens), elapsed, kept_tokens=snapshot.num_tokens)


def kept_prompt_positions(layout: PromptLayout, context_positions: torch.Tensor) -> torch.Tensor:
    """Prompt positions of the pruned path: the selected context plus all non-context tokens."""
    context_positions = torch.as_tensor(context_positions, dtype=torch.long)
    if context_positions.numel() and (
        int(context_positions.min()) < 0 or int(context_positions.max()) >= layout.num_context
    ):
        raise IndexError(f"context positions must lie in [0, {layout.num_context})")
    kept = torch.cat([layout.non_context_positions(), context_positions + layout.context_span.start])
    return torch.unique(kept)  # sorted, and a repeated position is kept once


@torch.inference_mode()
def continue_after(
    lm: LoadedModel,
    snapshot: KVSnapshot,
    tail_ids: Sequence[int],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> Answer:
    """Run the prompt's last token(s) against a (possibly pruned) cache, then decode.

    The tail takes the positions right after ``snapshot.next_position``, so the first answer
    token is conditioned only on what the cache holds.
    """
    if not tail_ids:
        raise GenerationError("need at least one tail token to produce the first logits")
    start = time.perf_counter()
    tail_positions = torch.arange(snapshot.next_position, snapshot.next_position + len(tail_ids))
    query = tail_positions.unsqueeze(0).to(lm.device)
    keys = torch.cat([snapshot.positions.to(lm.device).unsqueeze(0), query], dim=1)
    out = lm.model(
        input_ids=torch.tensor([list(tail_ids)], device=lm.device),
        position_ids=query,
        attention_mask=_attention_mask(lm, keys, torch.ones_like(keys, dtype=torch.bool), query),
        cache=snapshot.to_cache(),
        use_cache=True,
    )
    step_s = time.perf_counter() - start
    grown = KVSnapshot.from_cache(out.cache,
                                  torch.cat([snapshot.positions.cpu(), tail_positions]))
    answer = greedy_answer(lm, grown, out.logits[0, -1], max_new_tokens=max_new_tokens)
    return dataclasses.replace(answer, decode_s=answer.decode_s + step_s)


def pruned_snapshot(pre: Prefill, context_positions: torch.Tensor) -> KVSnapshot:
    """The prompt's KV with only the selected context kept, and without the last token."""
    kept = kept_prompt_positions(pre.layout, context_positions)
    return pre.snapshot.select(kept[kept != pre.layout.num_tokens - 1])


def answer_pruned(
    lm: LoadedModel,
    pre: Prefill,
    context_positions: torch.Tensor,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> Answer:
    """Answer with only the selected context positions (plus template and question) in KV.

    The last prompt token is re-run against the pruned cache, so the first answer token is
    also conditioned only on what was kept (the prefill's logits saw the whole context).
    """
    tail = pre.layout.input_ids[-1:].tolist()
    answer = continue_after(lm, pruned_snapshot(pre, context_positions), tail,
                            max_new_tokens=max_new_tokens)
    return dataclasses.replace(answer, prefill_s=pre.prefill_s)


def answer_full(
    lm: LoadedModel, layout: PromptLayout, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> Answer:
    """Prefill and answer with the whole prompt in KV (the full-context reference)."""
    pre = prefill(lm, layout, capture="none")
    answer = greedy_answer(lm, pre.snapshot, pre.logits, max_new_tokens=max_new_tokens)
    return dataclasses.replace(answer, prefill_s=pre.prefill_s)


@torch.inference_mode()
def prefill_batch(lm: LoadedModel, layouts: Sequence[PromptLayout]
                  ) -> tuple[list[KVSnapshot], float]:
    """Prefill several prompts in one forward pass (left padding, no query capture).

    Each row keeps its own positions ``0 .. n-1`` (position ids count only real tokens) and
    its pads are masked out, so row ``i``'s snapshot is that of ``prefill(layouts[i])`` up
    to float rounding of the differently shaped matmuls. Returns the snapshots and the
    pass's wall time, which every row shares.
    """
    if not layouts:
        raise GenerationError("prefill_batch needs at least one prompt")
    lengths = [layout.num_tokens for layout in layouts]
    width = max(lengths)
    ids = torch.zeros(len(layouts), width, dtype=torch.long)
    mask = torch.zeros(len(layouts), width, dtype=torch.long)
    for row, layout in enumerate(layouts):
        ids[row, width - lengths[row]:] = layout.input_ids
        mask[row, width - lengths[row]:] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    start = time.perf_counter()
    out = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                   position_ids=positions.to(lm.device), cache=full_cache(),
                   use_cache=True, logits_to_keep=1)
    elapsed = time.perf_counter() - start
    layers = out.cache.layers
    snapshots = [
        KVSnapshot(tuple(layer.keys[row, :, width - n:] for layer in layers),
                   tuple(layer.values[row, :, width - n:] for layer in layers),
                   torch.arange(n))
        for row, n in enumerate(lengths)
    ]
    return snapshots, elapsed


def _padded_cache(lm: LoadedModel, snapshots: Sequence[KVSnapshot]):
    """Left-padded ``DynamicCache`` of several snapshots, its ``[batch, width]`` mask of
    real entries and their original positions (0 under the padding)."""
    from transformers import DynamicCache

    width = max(s.num_tokens for s in snapshots)
    first = snapshots[0]
    shape = (len(snapshots), first.num_kv_heads, width, first.head_dim)
    mask = torch.zeros(len(snapshots), width, dtype=torch.bool, device=lm.device)
    positions = torch.zeros(len(snapshots), width, dtype=torch.long, device=lm.device)
    data = []
    for layer in range(first.num_layers):
        keys = first.keys[layer].new_zeros(shape)
        values = first.values[layer].new_zeros(shape)
        for row, snap in enumerate(snapshots):
            keys[row, :, width - snap.num_tokens:] = snap.keys[layer]
            values[row, :, width - snap.num_tokens:] = snap.values[layer]
        data.append((keys, values))
    for row, snap in enumerate(snapshots):
        mask[row, width - snap.num_tokens:] = True
        positions[row, width - snap.num_tokens:] = snap.positions.to(lm.device)
    return DynamicCache(ddp_cache_data=data), mask, positions  # full layers, as to_cache


@torch.inference_mode()
def continue_after_batch(
    lm: LoadedModel,
    snapshots: Sequence[KVSnapshot],
    tails: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> tuple[list[Answer], float]:
    """``continue_after`` for several (possibly pruned) caches at once.

    Caches of different lengths are left-padded and masked; every row continues at its own
    original positions. Rows that stop (EOS, newline, ``max_new_tokens``) leave the batch,
    so the remaining rows decode without them. Every tail must have the same length (the
    tail step is one padded forward pass). Each answer's ``decode_s`` is the batch's wall
    time, which is also returned.
    """
    if not snapshots or len(snapshots) != len(tails):
        raise GenerationError(f"need one tail per snapshot, got {len(snapshots)} snapshots "
                              f"and {len(tails)} tails")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    tail_len = len(tails[0])
    if tail_len < 1 or any(len(t) != tail_len for t in tails):
        raise GenerationError("every tail must have the same non-zero length; batch "
                              "requests with equal tails together")
    for snap in snapshots:
        snap.check_matches(lm.facts)
    device = lm.device
    start = time.perf_counter()
    cache, valid, keys = _padded_cache(lm, snapshots)
    next_positions = torch.tensor([s.next_position for s in snapshots], device=device)
    query = next_positions.unsqueeze(1) + torch.arange(tail_len, device=device)
    valid = torch.cat([valid, valid.new_ones(len(snapshots), tail_len)], dim=1)
    keys = torch.cat([keys, query], dim=1)
    out = lm.model(input_ids=torch.tensor([list(t) for t in tails], device=device),
                   position_ids=query, attention_mask=_attention_mask(lm, keys, valid, query),
                   cache=cache, use_cache=True)
    cache = out.cache
    logits = out.logits[:, -1]
    next_positions = next_positions + tail_len
    rows = list(range(len(snapshots)))  # batch row -> request index
    tokens: list[list[int]] = [[] for _ in snapshots]
    while rows:
        choices = logits.argmax(dim=-1).tolist()
        keep = []
        for batch_row, (index, token) in enumerate(zip(rows, choices)):
            if _is_stop(lm, token, lm.tokenizer.decode([token])):
                continue
            tokens[index].append(token)
            if len(tokens[index]) < max_new_tokens:
                keep.append(batch_row)
        if not keep:
            break
        if len(keep) < len(rows):  # finished rows stop costing compute
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            valid = valid.index_select(0, index)
            keys = keys.index_select(0, index)
            next_positions = next_positions.index_select(0, index)
            choices = [choices[r] for r in keep]
            rows = [rows[r] for r in keep]
        query = next_positions.unsqueeze(1)
        valid = torch.cat([valid, valid.new_ones(len(rows), 1)], dim=1)
        keys = torch.cat([keys, query], dim=1)
        out = lm.model(input_ids=torch.tensor(choices, device=device).unsqueeze(1),
                       position_ids=query, attention_mask=_attention_mask(lm, keys, valid, query),
                       cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[:, -1]
        next_positions = next_positions + 1
    elapsed = time.perf_counter() - start
    answers = [Answer(lm.tokenizer.decode(t, skip_special_tokens=True).strip(), tuple(t),
                      elapsed, kept_tokens=s.num_tokens + tail_len)
               for t, s in zip(tokens, snapshots)]
    return answers, elapsed
