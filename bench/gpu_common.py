"""Shared pieces of the bench/gpu_*.py scripts: timing, the two ceilings, inputs, output.

What lives here: median timing with CUDA events after warm-up (host clock with a
synchronize on the CPU), the device's measured copy bandwidth and bf16 matrix rate (the
floors every table divides by), a synthetic prompt layout of random token ids (random
weights make the text irrelevant; only the spans matter), KV snapshots with realistic
outlier channels, and where results go ($OUT on the device machine, else bench/results).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ray_scout.core.llm.kv import KVSnapshot
from ray_scout import provenance as _provenance

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, *, warmup: int = 2, repeats: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sync(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def interleaved_ms(fns: dict, device: torch.device, repeats: int) -> dict:
    """Median ms of each function, timed in alternation so clock and thermal drift hit all;
    each round starts one function later, so none always runs right after the same one (a
    power-hungry call can lower the clock of the next)."""
    samples = {name: [] for name in fns}
    names = list(fns)
    for fn in fns.values():
        fn()
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            samples[name].append(median_ms(fns[name], device, warmup=0, repeats=1))
    return {name: statistics.median(values) for name, values in samples.items()}


def device_events(fn, device: torch.device, *, repeats: int = 5) -> list[tuple[float, int, str]]:
    """(GPU ms per call, launches per call, name) of every kernel and copy ``fn()`` runs
    (profiler, CUDA activity only), costliest first; empty on the CPU."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        sync(device)
    return sorted(((e.self_device_time_total / 1e3 / repeats, e.count // repeats, e.key)
                   for e in prof.key_averages()), reverse=True)


def device_busy_ms(fn, device: torch.device, *, repeats: int = 5) -> float | None:
    """Mean GPU time of ``fn()``'s kernels and copies (profiler), without host gaps; None on
    the CPU. Beside ``median_ms`` it tells kernel cost from launch and Python overhead."""
    if device.type != "cuda":
        return None
    return sum(ms for ms, _, _ in device_events(fn, device, repeats=repeats))


def copy_bandwidth_gbps(device: torch.device, size_bytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, bytes read plus bytes written, in GB/s (1e9)."""
    size_bytes = size_bytes if device.type == "cuda" else size_bytes // 16
    src = torch.randn(size_bytes // 2, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, repeats=20)
    return 2 * size_bytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """bf16 n x n x n matrix product rate on random data, in TFLOP/s."""
    n = n if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{_provenance.cpu_name()}, torch {torch.__version__}"


def outlier_kv(num_layers: int, heads: int, tokens: int, head_dim: int, device,
               *, seed: int) -> KVSnapshot:
    """bf16 KV with the structure quantizers meet in real models: keys with a few large
    fixed channels per head (x10..x30) and a per-channel offset; values roughly Gaussian."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(keys: bool) -> torch.Tensor:
        x = torch.randn(heads, tokens, head_dim, device=device, generator=generator)
        if keys:
            x += torch.randn(heads, 1, head_dim, device=device, generator=generator) * 2
            channels = torch.randint(0, head_dim, (heads, 4), device=device, generator=generator)
            boost = 10 + 20 * torch.rand(heads, 4, device=device, generator=generator)
            x.scatter_(2, channels.unsqueeze(1).expand(-1, tokens, -1),
                       x.gather(2, channels.unsqueeze(1).expand(-1, tokens, -1))
                       * boost.unsqueeze(1))
        return x.to(torch.bfloat16)

    keys = tuple(draw(True) for _ in range(num_layers))
    values = tuple(draw(False) for _ in range(num_layers))
    return KVSnapshot(keys, values, torch.arange(tokens))


def provenance(device: torch.device) -> dict:
    """``ray_scout.provenance.record()`` (the host as measured, the commit, the date, the
    load) with the device and the command."""
    return {
        **_provenance.record(),
        "device": device_label(device),
        "command": "python3 " + " ".join(sys.argv),
    }


def write_results(name: str, data: dict) -> Path:
    """JSON under $OUT (the device machine's return folder) or bench/results."""
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def shape_arguments(parser, *, presets: list[str], tokens: int, repeats: int) -> None:
    """The options every shape benchmark shares: presets, tokens, device, repeats."""
    parser.add_argument("--presets", nargs="+", default=presets)
    parser.add_argument("--tokens", type=int, default=tokens)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=repeats)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """``columns``: (key, header, format spec); a missing value prints as '-'."""
    print("  ".join(f"{header:>{max(len(header), 8)}}" for _, header, _ in columns))
    for row in rows:
        cells = []
        for key, header, spec in columns:
            value = row.get(key)
            text = "-" if value is None else format(value, spec)
            cells.append(f"{text:>{max(len(header), 8)}}")
        print("  ".join(cells))
