"""Scratch driver (issue 15, run 2): the kernels before this issue against the current ones,
at the launch shapes the earlier H100 sweep picked, and the host time of a launch.

    PYTHONPATH=. python3 bench/results/issue15/ab_kernels.py OLD_TRITON_KERNELS.py

OLD_TRITON_KERNELS.py: ray_scout/core/llm/kvcodec/triton_kernels.py at commit 0b8d08c
(``git show 0b8d08c:ray_scout/core/llm/kvcodec/triton_kernels.py``). GPU ms from the
profiler (kernel only); host µs: the median time the calling thread spends in one call.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
from gpu_common import (
    device_busy_ms,
    outlier_kv,
    print_table,
    provenance,
    write_results,
)

from ray_scout.core.llm import models
from ray_scout.core.llm.kvcodec import KVLayout, base
from ray_scout.core.modes import Mode


def host_us(fn, repeats: int = 50) -> float:
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e6)
    return statistics.median(samples)


def main() -> int:
    spec = importlib.util.spec_from_file_location("old_kernels", sys.argv[1])
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    new = base.triton_kernels
    device = torch.device("cuda")
    print(provenance(device)["device"], flush=True)
    rows = []
    for preset in ("qwen2.5-7b", "qwen2.5-14b"):
        facts = models.facts_for(f"random:{preset}")
        layers, heads, dim = facts.num_layers, facts.num_kv_heads, facts.head_dim
        kv = outlier_kv(layers, heads, 4096, dim, device, seed=4)
        for bits in (8, 4):
            factor = base.quant.SCALE_SLACK / ((1 << bits) - 1)
            layout = KVLayout(Mode.INT8 if bits == 8 else Mode.INT4, layers, heads, 4096, dim, 32)
            data = torch.empty(base.data_size_bytes(layout), dtype=torch.uint8, device=device)
            offsets, aligned = base.offset_table(layout, data)
            flag = torch.zeros(1, dtype=torch.int32, device=device)
            for stage in ("encode", "decode"):
                new.LAUNCH[(stage, bits)] = old.LAUNCH[stage][bits]
            halves = old.quantize_kv(kv.keys, kv.values, bits, 32, factor, flag)
            parts = [tuple(tuple(t.unbind()) for t in half) for half in halves]
            shape = (heads, 4096, dim)
            calls = {
                "old_enc": lambda: old.quantize_kv(kv.keys, kv.values, bits, 32, factor, flag),
                "new_enc": lambda: new.quantize_kv(kv.keys, kv.values, data, offsets, aligned,
                                                   bits, 32, factor),
                "old_dec": lambda: old.dequantize_kv(*parts, shape, bits, 32),
                "new_dec": lambda: new.dequantize_kv(data, offsets, layers, shape, bits, 32)}
            row = {"preset": preset, "bits": bits, "enc_shape": str(old.LAUNCH["encode"][bits]),
                   "dec_shape": str(old.LAUNCH["decode"][bits])}
            for name, fn in calls.items():
                fn()
                row[f"{name}_gpu_ms"] = device_busy_ms(fn, device)
                row[f"{name}_host_us"] = host_us(fn)
            rows.append(row)
    write_results("ab_kernels", {**provenance(device), "rows": rows})
    print_table(rows, [("preset", "preset", "s"), ("bits", "bits", "d"),
                       ("enc_shape", "enc shape", "s"), ("dec_shape", "dec shape", "s")]
                + [(f"{n}_{m}", f"{n} {m}", ".3f" if m == "gpu_ms" else ".1f")
                   for n in ("old_enc", "new_enc", "old_dec", "new_dec")
                   for m in ("gpu_ms", "host_us")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
