"""Selection: a score per context position, and the top-k of those scores.

What lives here: Q2C (Paper A Eq. 4: the last layer's question-to-context attention summed
over heads and question tokens; Paper B Eq. 2's average over layers as an option), SnapKV,
H2O, StreamingLLM and seeded random scorers, the ``SCORERS`` registry the harness grids
over, and the eager ``output_attentions`` Q2C kept only as the reference the tests and the
benchmark compare against. Attention is recomputed from the query states the prefill hooks
captured and the keys in its snapshot, so the prefill itself stays on SDPA. What it leaves
to others: the forward pass (``generation``) and how the kept positions travel (``scout``,
``kvcodec``).

Every scorer has the signature ``scorer(prefill, **params) -> FloatTensor[num_context]``;
larger means keep. Positions a method always keeps (sinks, recent windows) score ``inf``.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from ray_scout.core.llm.generation import Prefill
from ray_scout.core.llm.models import LoadedModel
from ray_scout.core.llm.prompt import PromptLayout
from ray_scout.core.llm.scorers import CAPTURE  # noqa: F401  (re-exported beside SCORERS)

# Rows of attention computed at once: bounds the [heads, rows, tokens] block in memory.
ROW_CHUNK = 512


class SelectionError(ValueError):
    """A retention, scorer name or prefill that selection cannot work with."""


def select_positions(scores: torch.Tensor, retention: float) -> torch.Tensor:
    """The ``round(retention * n)`` highest-scoring positions, in increasing order.

    Ties go to the earlier position (a stable sort), so the result is deterministic.
    """
    if scores.dim() != 1:
        raise SelectionError(f"scores must be 1-D (one per context position), got {tuple(scores.shape)}")
    if not 0.0 <= retention <= 1.0:
        raise SelectionError(f"retention must lie in [0, 1], got {retention}")
    k = round(retention * scores.numel())
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def _attention_rows(pre: Prefill, layer: int, rows: torch.Tensor) -> torch.Tensor:
    """Softmaxed attention ``[heads, len(rows), tokens]`` of prompt rows at ``layer``.

    Causal over the full row, as the model's own attention: row ``i`` sees keys ``<= i``.
    """
    if layer not in pre.queries:
        raise SelectionError(
            f"prefill holds no query states for layer {layer}; "
            "prefill with capture='last' (or 'all' for the all-layer average)"
        )
    keys = pre.snapshot.keys[layer]
    heads = pre.queries[layer].shape[0]
    keys = keys.repeat_interleave(heads // keys.shape[0], dim=0)  # GQA: each KV head serves a group
    rows = rows.to(keys.device)
    q = pre.queries[layer][:, rows].float()
    logits = torch.matmul(q, keys.float().transpose(1, 2)) * pre.scaling
    future = torch.arange(keys.shape[1], device=keys.device).unsqueeze(0) > rows.unsqueeze(1)
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)


def _column_sums(pre: Prefill, layer: int, rows: torch.Tensor) -> torch.Tensor:
    """Attention received by every prompt position from ``rows``, summed over heads."""
    total = torch.zeros(pre.snapshot.num_tokens, device=pre.snapshot.keys[layer].device)
    for chunk in rows.split(ROW_CHUNK):
        total += _attention_rows(pre, layer, chunk).sum(dim=(0, 1))
    return total.cpu()  # scores live on the CPU, beside the positions they rank


def _context(pre: Prefill, per_token: torch.Tensor) -> torch.Tensor:
    span = pre.layout.context_span
    return per_token[span.start:span.stop]


def _question_rows(layout: PromptLayout) -> torch.Tensor:
    return torch.arange(layout.question_span.start, layout.question_span.stop)


def votes(pre: Prefill, rows: torch.Tensor) -> torch.Tensor:
    """Last-layer attention every context position receives from prompt ``rows``, summed
    over heads and rows: Q2C's votes come from the question's rows, SnapKV's from the
    prompt's last ``window`` rows."""
    return _context(pre, _column_sums(pre, pre.last_layer, rows))


def pool(scores: torch.Tensor, kernel: int, pooling: str = "avg") -> torch.Tensor:
    """Scores smoothed along positions (SnapKV's clustering step); kernel 1 leaves them."""
    if kernel < 1 or kernel % 2 == 0:
        raise SelectionError(f"pooling kernel must be odd and positive, got {kernel}")
    if kernel == 1:
        return scores
    x = scores.view(1, 1, -1)
    if pooling == "avg":
        pooled = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    elif pooling == "max":
        pooled = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        raise SelectionError(f"pooling must be 'avg' or 'max', not {pooling!r}")
    return pooled.view(-1)


def q2c(pre: Prefill, *, kernel: int = 1, pooling: str = "avg") -> torch.Tensor:
    """Paper A Eq. 4: s_j = sum over heads h and question tokens i of A_L[h, i, j].

    ``kernel`` > 1 pools the scores as SnapKV does (not in the paper; for the comparison in
    docs/SELECTION.md).
    """
    return pool(votes(pre, _question_rows(pre.layout)), kernel, pooling)


def q2c_all_layers(pre: Prefill) -> torch.Tensor:
    """Paper B Eq. 2: the Q2C score averaged over all layers (needs ``capture='all'``)."""
    rows = _question_rows(pre.layout)
    layers = range(pre.snapshot.num_layers)
    return _context(pre, sum(_column_sums(pre, layer, rows) for layer in layers) / len(layers))


def snapkv(pre: Prefill, *, window: int = 32, kernel: int = 5, pooling: str = "avg") -> torch.Tensor:
    """SnapKV: attention from the last ``window`` prompt tokens, pooled along positions.

    As the SnapKV paper, but summed over heads: a snapshot keeps the same positions in every
    head, while SnapKV picks per head.
    """
    n = pre.layout.num_tokens
    return pool(votes(pre, torch.arange(max(0, n - window), n)), kernel, pooling)


def _keep_recent(scores: torch.Tensor, recent: int) -> torch.Tensor:
    if recent < 0:
        raise SelectionError(f"recent window must be non-negative, got {recent}")
    scores = scores.clone()
    if recent:
        scores[-recent:] = float("inf")
    return scores


def h2o(pre: Prefill, *, recent: int = 8) -> torch.Tensor:
    """H2O: attention accumulated over every prompt row, plus the last ``recent`` context tokens.

    Scored at the last layer over the whole prompt, as a one-shot prefill eviction.
    """
    return _keep_recent(votes(pre, torch.arange(pre.layout.num_tokens)), recent)


def streaming(pre: Prefill, *, sinks: int = 4, recent: int = 0) -> torch.Tensor:
    """StreamingLLM: the first ``sinks`` context tokens, then the most recent ones.

    Scores rise with position, so any budget keeps the sinks and the newest tokens.
    """
    if sinks < 0:
        raise SelectionError(f"sinks must be non-negative, got {sinks}")
    scores = torch.arange(pre.layout.num_context, dtype=torch.float32)
    scores[:sinks] = float("inf")
    return _keep_recent(scores, recent)


def random_scores(pre: Prefill, *, seed: int = 0) -> torch.Tensor:
    """Uniform random scores from a seeded generator (the selection floor)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(pre.layout.num_context, generator=generator)


SCORERS: dict[str, Callable[..., torch.Tensor]] = {
    "q2c": q2c,
    "q2c_all_layers": q2c_all_layers,
    "snapkv": snapkv,
    "h2o": h2o,
    "streaming": streaming,
    "random": random_scores,
}


def score(name: str, pre: Prefill, **params) -> torch.Tensor:
    """Scores of the scorer ``name`` (see ``SCORERS``)."""
    try:
        scorer = SCORERS[name]
    except KeyError:
        raise SelectionError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}") from None
    return scorer(pre, **params)


@contextlib.contextmanager
def _eager_attention(lm: LoadedModel):
    previous = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        lm.model.set_attn_implementation(previous)


@torch.inference_mode()
def q2c_eager_reference(lm: LoadedModel, layout: PromptLayout, *, all_layers: bool = False) -> torch.Tensor:
    """Q2C from the attention probabilities eager attention returns (reference only).

    Materializes every layer's ``[heads, T, T]`` attention: slow and memory-hungry at long
    context, which is why ``q2c`` recomputes only the rows it needs.
    """
    with _eager_attention(lm):
        out = lm.model(input_ids=layout.input_ids.unsqueeze(0).to(lm.device), output_attentions=True,
                       logits_to_keep=1)
    q = slice(layout.question_span.start, layout.question_span.stop)
    c = slice(layout.context_span.start, layout.context_span.stop)
    layers = out.attentions if all_layers else out.attentions[-1:]
    return sum(a[0, :, q, c].float().sum(dim=(0, 1)) for a in layers) / len(layers)
