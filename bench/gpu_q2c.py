"""Q2C overhead at Qwen2.5-7B shape: SDPA prefill with and without Q2C vs eager attention.

    PYTHONPATH=. python3 bench/gpu_q2c.py --preset qwen2.5-7b --lengths 512 2048 4096 8192
    PYTHONPATH=. python3 bench/gpu_q2c.py --device cpu --preset tiny --lengths 128 256   # smoke

Per prompt length (random ids, a 32-token question before a 16-token template tail):
``sdpa``: ``generation.prefill(capture="none")`` as the edge runs it (on CUDA the compiled
``fused_prefill``; its first call compiles, and that time is reported apart, never in a
median; the first call at each further length shows no recompile happens); ``hf``: the same
through the model's own modules (``fused=False``, the previous production path); ``edge``:
``prefill(capture="last")`` (the last layer's queries kept) plus ``selection.q2c`` (the
whole edge stage); these four are timed interleaved; ``q2c``: the scoring alone on a
captured prefill; ``eager``: the papers' approach, ``selection.q2c_eager_reference``
(eager attention, ``output_attentions``; the baseline, unchanged). Goals: Q2C's added work
(q2c alone, and the difference edge - sdpa) <= 3% of sdpa at 4K; eager / edge >= 3 at 4K.
Each length also checks Q2C against the eager reference (relative L2 of the scores, overlap
of the top 10%). Achieved TFLOP/s of the prefill (2 x parameters x tokens + causal
attention) is set beside the measured bf16 matmul rate. Prints a table last; writes gpu_q2c.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from gpu_common import (device_busy_ms, interleaved_ms, matmul_tflops, median_ms, print_table,
                        provenance, sync, write_results)
from ray_scout.core.llm.prompt import synthetic_layout
from ray_scout.core.llm import generation, models, selection


def prefill_flops(lm, tokens: int) -> float:
    """Matmul FLOPs of one prefill without the vocab projection (logits_to_keep=1)."""
    config = lm.model.config
    params = sum(p.numel() for name, p in lm.model.named_parameters()
                 if "embed" not in name and "lm_head" not in name)
    attention = 2 * config.num_hidden_layers * config.hidden_size * tokens * tokens  # QK^T + PV, causal half
    return 2 * params * tokens + attention


def overlap_top(a: torch.Tensor, b: torch.Tensor, share: float = 0.1) -> float:
    k = max(1, round(share * a.numel()))
    top_a = set(torch.topk(a, k).indices.tolist())
    top_b = set(torch.topk(b, k).indices.tolist())
    return len(top_a & top_b) / k


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def bench_length(lm, tokens: int, device: torch.device, repeats: int, tflops: float) -> dict:
    layout = synthetic_layout(tokens, lm.model.config.vocab_size, seed=tokens)
    begin = time.perf_counter()  # a new length must not recompile the fused prefill
    generation.prefill(lm, layout, capture="none")
    sync(device)
    first_call_ms = (time.perf_counter() - begin) * 1e3
    times = interleaved_ms({
        "transformers": lambda: generation.prefill(lm, layout, capture="none", fused=False),
        "sdpa": lambda: generation.prefill(lm, layout, capture="none"),
        "captured": lambda: generation.prefill(lm, layout, capture="last"),
        "edge": lambda: selection.q2c(generation.prefill(lm, layout, capture="last")),
    }, device, repeats)
    sdpa_again = [median_ms(lambda: generation.prefill(lm, layout, capture="none"), device,
                            warmup=0, repeats=1) for _ in range(5)]
    pre = generation.prefill(lm, layout, capture="last")
    q2c_ms = median_ms(lambda: selection.q2c(pre), device, repeats=repeats)
    scores = selection.q2c(pre)
    del pre
    sdpa_ms, edge_ms = times["sdpa"], times["edge"]
    busy = {name: device_busy_ms(lambda capture=capture: generation.prefill(lm, layout,
                                                                             capture=capture),
                                 device)
            for name, capture in (("sdpa", "none"), ("captured", "last"))}
    row = {"tokens": tokens, "first_call_ms": first_call_ms, "graphs": compiled_graphs(),
           "sdpa_gpu_ms": busy["sdpa"], "captured_gpu_ms": busy["captured"], "transformers_ms": times["transformers"],
           "sdpa_ms": sdpa_ms, "captured_ms": times["captured"],
           "edge_ms": edge_ms, "q2c_ms": q2c_ms,
           "q2c_share": (edge_ms - sdpa_ms) / sdpa_ms,
           "q2c_share_parts": q2c_ms / sdpa_ms,
           "sdpa_spread": spread(sdpa_again),
           "tflops": prefill_flops(lm, tokens) / (sdpa_ms * 1e-3) / 1e12}
    row["mfu"] = row["tflops"] / tflops
    try:
        eager_ms = median_ms(lambda: selection.q2c_eager_reference(lm, layout), device,
                             warmup=1, repeats=max(3, repeats // 3))
        reference = selection.q2c_eager_reference(lm, layout).cpu()
        row.update(eager_ms=eager_ms, eager_over_edge=eager_ms / edge_ms,
                   eager_over_sdpa=eager_ms / sdpa_ms,
                   q2c_rel_l2=float((scores.double() - reference.double()).norm()
                                    / reference.double().norm()),
                   top10_overlap=overlap_top(scores, reference))
    except torch.OutOfMemoryError:
        row["eager_ms"] = None  # [layers, heads, T, T] attention of every layer does not fit
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen2.5-7b")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out-name", default="gpu_q2c", help="results file name (no .json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    tflops = matmul_tflops(device)
    lm = models.random_model(args.preset, device=device)
    begin = time.perf_counter()
    generation.prefill(lm, synthetic_layout(args.lengths[0], lm.model.config.vocab_size),
                       capture="none")
    sync(device)
    compile_s = time.perf_counter() - begin  # the fused prefill compiles on its first call
    rows = [bench_length(lm, n, device, args.repeats, tflops) for n in args.lengths]
    write_results(args.out_name, {**provenance(device), "preset": args.preset,
                              "matmul_tflops": tflops, "first_call_s": compile_s,
                              "fused": generation.uses_fused_prefill(lm),
                                 "env": {k: v for k, v in os.environ.items()
                                         if k.startswith("TORCH_CUDNN")},
                                 "rows": rows})
    print(f"{args.preset} on {device}; bf16 matmul {tflops:.0f} TFLOP/s; fused prefill: "
          f"{generation.uses_fused_prefill(lm)}, first call (compile) {compile_s:.1f} s")
    print_table(rows, [("tokens", "tokens", "d"), ("first_call_ms", "1st call ms", ".0f"),
                       ("graphs", "graphs", "d"),
                       ("transformers_ms", "hf ms", ".1f"), ("sdpa_ms", "sdpa ms", ".1f"),
                       ("captured_ms", "+capture ms", ".1f"), ("sdpa_gpu_ms", "sdpa gpu", ".1f"),
                       ("captured_gpu_ms", "+capture gpu", ".1f"), ("q2c_ms", "q2c ms", ".2f"),
                       ("edge_ms", "edge ms", ".1f"),
                       ("q2c_share", "(e-s)/s", ".3f"), ("q2c_share_parts", "parts/s", ".4f"),
                       ("sdpa_spread", "spread", ".3f"),
                       ("eager_ms", "eager ms", ".1f"), ("eager_over_edge", "eager/edge", ".2f"),
                       ("tflops", "TFLOP/s", ".0f"), ("mfu", "of mm", ".2f"),
                       ("q2c_rel_l2", "vs eager", ".1e"), ("top10_overlap", "top10", ".2f")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
