"""Latency profiles: how long a model takes to prefill and to decode, measured, not assumed.

What lives here: a profile (prefill seconds vs prompt tokens, decode seconds per token vs
context tokens) for one model on one device, its interpolation, its file format, and the
measurement that produces it. Profiled fidelity replaces compute with these numbers and the
policy uses them for its latency estimates. What it leaves to others: when compute happens
(the actors) and what it costs on the wire (the codecs).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from ray_scout.provenance import record


@dataclasses.dataclass(frozen=True)
class LatencyProfile:
    """Measured compute times of one model on one device."""

    model_id: str
    device: str
    prefill_points: tuple[tuple[int, float], ...]  # (prompt tokens, seconds)
    decode_points: tuple[tuple[int, float], ...]  # (context tokens, seconds per new token)
    provenance: str = ""  # machine, date and command that measured it

    def __post_init__(self) -> None:
        for name, points in (("prefill", self.prefill_points), ("decode", self.decode_points)):
            tokens = [t for t, _ in points]
            if not points or tokens != sorted(set(tokens)) or any(s <= 0 for _, s in points):
                raise ValueError(f"{name} points must be non-empty, strictly increasing in "
                                 f"tokens and positive in seconds: {points}")

    def prefill_s(self, tokens: int) -> float:
        return _interpolate(self.prefill_points, tokens)

    def decode_s(self, context_tokens: int, new_tokens: int) -> float:
        return new_tokens * _interpolate(self.decode_points, context_tokens)

    def to_dict(self) -> dict:
        return {
            "model_id": self.model_id,
            "device": self.device,
            "prefill": [[t, s] for t, s in self.prefill_points],
            "decode_per_token": [[t, s] for t, s in self.decode_points],
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "LatencyProfile":
        data = yaml.safe_load(Path(path).read_text())
        try:
            return cls(
                model_id=data["model_id"],
                device=data["device"],
                prefill_points=tuple((int(t), float(s)) for t, s in data["prefill"]),
                decode_points=tuple((int(t), float(s)) for t, s in data["decode_per_token"]),
                provenance=data.get("provenance", ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a latency profile ({exc})") from exc


def _interpolate(points: tuple[tuple[int, float], ...], tokens: int) -> float:
    """Piecewise linear inside the measured range, linear from the last segment beyond it."""
    xs = np.array([t for t, _ in points], dtype=float)
    ys = np.array([s for _, s in points], dtype=float)
    if len(xs) == 1 or xs[0] <= tokens <= xs[-1]:
        return float(np.interp(tokens, xs, ys))
    i, j = (0, 1) if tokens < xs[0] else (-2, -1)
    slope = (ys[j] - ys[i]) / (xs[j] - xs[i])
    return max(float(ys[i] + slope * (tokens - xs[i])), float(ys.min()) * 0.5)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, caches
    samples = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@torch.inference_mode()
def measure(lm, prompt_lengths: list[int], *, decode_steps: int = 8, repeats: int = 3,
            command: str = "") -> LatencyProfile:
    """Time prefill at each prompt length and the per-token decode cost after it.

    Prefill is ``generation.prefill`` as the edge and the cloud's scout path run it (on CUDA
    the compiled fused forward, whose one-off compile the warm-up call absorbs), over a
    synthetic prompt of that length.
    """
    from ray_scout.core.llm.generation import prefill as run_prefill
    from ray_scout.core.llm.prompt import synthetic_layout

    device = lm.device
    vocab = lm.model.config.vocab_size
    prefill, decode = [], []
    for n in sorted(prompt_lengths):
        layout = synthetic_layout(n, vocab, seed=n)
        prefill.append((n, _median_seconds(lambda: run_prefill(lm, layout, capture="none"),
                                           device, repeats)))
        cache = run_prefill(lm, layout, capture="none").snapshot.to_cache()
        step_ids = layout.input_ids[-1:].view(1, 1).to(device)

        def run_decode():
            extra = cache.get_seq_length() - n
            if extra:  # back to the prefilled prompt, so every repeat decodes alike
                cache.crop(-extra)
            for step in range(decode_steps):
                lm.model(step_ids, cache=cache, use_cache=True,
                         position_ids=torch.tensor([[n + step]], device=device))

        decode.append((n, _median_seconds(run_decode, device, repeats) / decode_steps))
    # The same fields as every bench result file (ray_scout.provenance), on one line.
    where = record()
    gpu = f"{torch.cuda.get_device_name(device)} on " if device.type == "cuda" else ""
    provenance = (f"{gpu}{where['machine']}; commit {where['commit']}; {where['date']}; "
                  f"{command}").strip("; ")
    return LatencyProfile(lm.model_id, device.type, tuple(prefill), tuple(decode), provenance)
