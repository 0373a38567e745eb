"""Bottleneck layers: which layers' INT4 quantization costs a model the most.

What lives here: the per-layer sensitivity measurement (quantize ONLY layer l's KV to INT4,
keep every other layer exact, and measure the KL divergence of the next-token distributions
of a short continuation against the exact cache), its report, and a per-model JSON cache
under ``models.cache_dir()/bottleneck/``. What it knows: a loaded model and the INT4 codec.
What it leaves to others: using the result (``codec_for(Mode.MIXED_INT4,
protected_layers=...)``) and deciding when mixed precision is worth it (the policy).

Paper A found one or two such layers per model (often layer 0) and protected them in 16 bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import torch

from ray_scout.core.llm import models
from ray_scout.core.llm.kv import KVSnapshot
from ray_scout.core.llm.kvcodec import codec_for
from ray_scout.core.modes import Mode

METRIC = "mean next-token KL(exact || only this layer INT4), nats"
CONTINUATION_TOKENS = 8

# Short calibration texts of different kinds (prose, numbers, code, QA), written for this
# project; users can pass their own prompts.
CALIBRATION_PROMPTS = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the "
    "wick, polished the great lens, and wrote the weather into a leather logbook that his "
    "grandmother had started sixty years before. Ships passing the headland relied on him.",
    "Quarterly report: revenue rose from 4.2 million to 5.1 million dollars, an increase of "
    "21 percent, while operating costs fell by 3 percent to 2.7 million. The board approved "
    "a dividend of 0.35 dollars per share, payable on 14 March to holders of record.",
    "def merge_sorted(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
    "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n",
    "Context: The Rhine rises in the Swiss Alps, flows through Lake Constance, forms part of "
    "the border between Germany and France, and reaches the North Sea in the Netherlands. "
    "Question: Into which sea does the Rhine flow? Answer: The Rhine flows into the North Sea.",
)


@dataclasses.dataclass(frozen=True)
class BottleneckReport:
    """Per-layer INT4 sensitivity of one model; ``ranking`` lists layers, worst first."""

    model_id: str
    metric: str
    group_size: int
    prompts_digest: str
    num_prompts: int
    scores: tuple[float, ...]
    all_layers_score: float  # the same metric with every layer in INT4, for scale
    ranking: tuple[int, ...]

    def top(self, k: int) -> tuple[int, ...]:
        return tuple(sorted(self.ranking[:k]))


def prompts_digest(prompts: list[str] | tuple[str, ...]) -> str:
    return hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]


def _continuation_logprobs(lm: models.LoadedModel, snap: KVSnapshot,
                           continuation: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(continuation.shape[1], device=lm.device) + snap.next_position
    with torch.no_grad():
        logits = lm.model(continuation, cache=snap.to_cache(),
                          position_ids=positions.unsqueeze(0)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference.exp() * (reference - other)).sum(-1).mean())


def diagnose_bottleneck_layers(lm: models.LoadedModel, prompts: list[str] | None = None, *,
                               top_k: int = 1, group_size: int = 32) -> BottleneckReport:
    """Score each layer by the damage of quantizing only its KV to INT4.

    Each prompt is split into a context (prefilled once, exact) and its last
    ``CONTINUATION_TOKENS`` tokens (decoded against the cache). ``top_k`` only checks that
    the model has that many layers; the report ranks all of them.
    """
    prompts = list(prompts or CALIBRATION_PROMPTS)
    layers = lm.facts.num_layers
    if not 1 <= top_k <= layers:
        raise ValueError(f"top_k={top_k} outside [1, {layers}] for {lm.model_id}")
    codec = codec_for(Mode.INT4, group_size=group_size)
    totals = torch.zeros(layers, dtype=torch.float64)
    all_layers = 0.0
    for prompt in prompts:
        ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
        if ids.shape[1] < 2 * CONTINUATION_TOKENS:
            raise ValueError(f"calibration prompt of {ids.shape[1]} tokens is too short; "
                             f"give at least {2 * CONTINUATION_TOKENS}")
        context, continuation = ids[:, :-CONTINUATION_TOKENS], ids[:, -CONTINUATION_TOKENS:]
        with torch.no_grad():
            exact = KVSnapshot.from_cache(lm.model(context, use_cache=True).cache)
        quantized = codec.decode(codec.encode(exact), dtype=exact.dtype, device=lm.device)
        reference = _continuation_logprobs(lm, exact, continuation)
        all_layers += _kl(reference, _continuation_logprobs(lm, quantized, continuation))
        for layer in range(layers):
            keys, values = list(exact.keys), list(exact.values)
            keys[layer], values[layer] = quantized.keys[layer], quantized.values[layer]
            spliced = KVSnapshot(tuple(keys), tuple(values), exact.positions)
            totals[layer] += _kl(reference, _continuation_logprobs(lm, spliced, continuation))
    scores = tuple(float(s) / len(prompts) for s in totals)
    ranking = tuple(sorted(range(layers), key=lambda layer: -scores[layer]))
    return BottleneckReport(lm.model_id, METRIC, group_size, prompts_digest(prompts),
                            len(prompts), scores, all_layers / len(prompts), ranking)


# Reports measured once and committed, so a fresh machine (CI) need not spend minutes on them.
SHIPPED_DIR = Path(__file__).resolve().parents[3] / "experiments" / "profiles"


def _safe(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)


def report_path(model_id: str, root: Path | None = None) -> Path:
    return (root or models.cache_dir()) / "bottleneck" / f"{_safe(model_id)}.json"


def shipped_report_path(model_id: str) -> Path:
    return SHIPPED_DIR / f"bottleneck-{_safe(model_id)}.json"


def save_report(report: BottleneckReport, root: Path | None = None) -> Path:
    path = report_path(report.model_id, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".partial")
    staging.write_text(json.dumps(dataclasses.asdict(report), indent=1))
    staging.replace(path)
    return path


def load_report(model_id: str, root: Path | None = None, *,
                path: Path | None = None) -> BottleneckReport | None:
    """The cached (or, with ``path``, that) report; None when there is none.

    A shipped report's ``provenance`` (machine, date, command) is documentation and skipped.
    """
    path = path or report_path(model_id, root)
    try:
        raw = json.loads(path.read_text())
        raw.pop("provenance", None)
        raw["scores"] = tuple(raw["scores"])
        raw["ranking"] = tuple(raw["ranking"])
        return BottleneckReport(**raw)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"cached bottleneck report {path} is unreadable ({err}); "
                         "delete it to recompute") from None


def protected_layers_for(lm: models.LoadedModel, prompts: list[str] | None = None, *,
                         top_k: int = 1, group_size: int = 32, refresh: bool = False,
                         root: Path | None = None) -> tuple[int, ...]:
    """The top-k bottleneck layers of ``lm``: from the user's cache or the report shipped in
    ``experiments/profiles/`` when the prompts and group size match, measured (and cached)
    otherwise."""
    prompts = list(prompts or CALIBRATION_PROMPTS)
    cached = None
    if not refresh:
        cached = (load_report(lm.model_id, root)
                  or load_report(lm.model_id, path=shipped_report_path(lm.model_id)))
    if (cached is None or cached.prompts_digest != prompts_digest(prompts)
            or cached.group_size != group_size):
        cached = diagnose_bottleneck_layers(lm, prompts, top_k=top_k, group_size=group_size)
        save_report(cached, root)
    return cached.top(top_k)
