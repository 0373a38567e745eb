"""Where a 4K-token prefill's GPU time goes, and what the fused prefill takes off it.

    PYTHONPATH=. python3 bench/gpu_prefill.py --preset qwen2.5-7b --tokens 4096
    PYTHONPATH=. python3 bench/gpu_prefill.py --device cpu --preset tiny --tokens 256   # smoke

Paths (``capture="none"``, the same random prompt): ``transformers`` is
``generation.prefill(fused=False)`` (the model's own modules, SDPA); ``fused-eager`` is
``fused_prefill.forward`` uncompiled (fused projections, last layer's MLP on one row);
``fused`` is ``generation.prefill`` as it runs on CUDA (the same, compiled). The first call
of ``fused`` compiles; its time is reported apart (``compile s``) and the medians are taken
after it, interleaved across paths (10 rounds, each starting one path later) to cancel
drift. Each path's GPU time is
split by kernel class with the profiler (GEMM, attention, elementwise/norm/RoPE, copies).
Floors measured in the same run: the bf16 8192^3 matmul rate, the prefill's own matrix
products alone at their exact shapes (fused and separate projections) and the attention
alone under each SDPA backend (with the time of its first call
at a length not seen before: cuDNN builds a plan per shape). Agreement: both bf16 paths against a float32 run of the same
weights, and against each other (keys and values of the first and last layer, last-layer
queries, logits: relative L2, same argmax). Prints a table last; writes gpu_prefill.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time

import torch
import torch.nn.functional as F

from gpu_common import (device_busy_ms, device_events, interleaved_ms, matmul_tflops, median_ms,
                        print_table, provenance, sync, write_results)
from ray_scout.core.llm.prompt import synthetic_layout
from ray_scout.core.llm import fused_prefill, generation, models

CLASSES = ("gemm", "attention", "elementwise", "copy")


def kernel_class(name: str) -> str:
    """GEMM, attention, elementwise (norms, RoPE, SiLU, residuals, inductor's fused
    kernels) or copy, from a CUDA kernel's name."""
    name = name.lower()
    if name.startswith("triton_"):
        return "elementwise"
    if any(s in name for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")):
        return "gemm"
    if any(s in name for s in ("flash", "fmha", "attention", "cudnn")):
        return "attention"
    if any(s in name for s in ("memcpy", "memset", "copy", "cat")):
        return "copy"
    return "elementwise"


def profile_classes(fn, device: torch.device) -> dict:
    """GPU ms per call of each kernel class, and the ten costliest kernels."""
    events = device_events(fn, device, repeats=3)
    if not events:
        return {}
    per_class = dict.fromkeys(CLASSES, 0.0)
    for ms, _, name in events:
        per_class[kernel_class(name)] += ms
    return {"class_ms": per_class, "top_kernels": [(ms, n, name[:90]) for ms, n, name in events[:10]]}


def linear_ms(tokens: int, rows: int, cols: int, device, dtype, bias: bool = False) -> float:
    """One ``F.linear`` of ``[tokens, cols]`` by a ``[rows, cols]`` weight."""
    x = torch.randn(tokens, cols, device=device, dtype=dtype)
    w = torch.randn(rows, cols, device=device, dtype=dtype) * cols**-0.5
    b = torch.randn(rows, device=device, dtype=dtype) if bias else None
    return median_ms(lambda: F.linear(x, w, b), device, warmup=3, repeats=20)


def gemm_floor(config, tokens: int, device, dtype) -> dict:
    """The prefill's matrix products alone at their exact shapes, summed over layers (the
    last layer's o/MLP products on one row are left out, as the fused path does), fused and
    as separate projections; and their FLOP rate."""
    h, i = config.hidden_size, config.intermediate_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d
    layers = config.num_hidden_layers
    bias = config.model_type == "qwen2"
    qkv = linear_ms(tokens, q_rows + 2 * kv_rows, h, device, dtype, bias)
    qkv_apart = (linear_ms(tokens, q_rows, h, device, dtype, bias)
                 + 2 * linear_ms(tokens, kv_rows, h, device, dtype, bias))
    o = linear_ms(tokens, h, q_rows, device, dtype)
    gate_up = linear_ms(tokens, 2 * i, h, device, dtype)
    gate_up_apart = 2 * linear_ms(tokens, i, h, device, dtype)
    down = linear_ms(tokens, h, i, device, dtype)
    flops = 2 * tokens * ((q_rows + 2 * kv_rows) * h * layers
                          + (q_rows * h + 3 * i * h) * (layers - 1))
    fused_ms = qkv * layers + (o + gate_up + down) * (layers - 1)
    apart_ms = qkv_apart * layers + (o + gate_up_apart + down) * (layers - 1)
    return {"per_layer_ms": {"qkv": qkv, "qkv_apart": qkv_apart, "o": o, "gate_up": gate_up,
                             "gate_up_apart": gate_up_apart, "down": down},
            "gemm_ms": fused_ms, "gemm_apart_ms": apart_ms, "gemm_tflops": flops / fused_ms / 1e9}


def attention_floor(config, tokens: int, device, dtype) -> dict:
    """Causal GQA attention of one layer, times layers, under each SDPA backend that runs
    (backends without GQA get the key/value heads expanded, as transformers would)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    q = torch.randn(1, heads, tokens, d, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, tokens, d, device=device, dtype=dtype)
    v = torch.randn(1, kv_heads, tokens, d, device=device, dtype=dtype)
    k_all, v_all = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    out = {}
    backends = (("default", None, True), ("flash", SDPBackend.FLASH_ATTENTION, True),
                ("cudnn", SDPBackend.CUDNN_ATTENTION, False),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION, False))
    for index, (name, backend, gqa) in enumerate(backends):
        keys, values = (k, v) if gqa else (k_all, v_all)
        # A length no call has used yet: what the first request of a new length pays.
        fresh = tokens + 16 * (index + 1)
        first_q, first_k, first_v = (t[:, :, :1].expand(-1, -1, fresh, -1).contiguous()
                                     for t in (q, keys, values))

        def call(q=q, keys=keys, values=values, gqa=gqa):
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True,
                                                  enable_gqa=gqa)
        try:
            with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                sync(device)
                begin = time.perf_counter()
                call(first_q, first_k, first_v)
                sync(device)
                first_ms = (time.perf_counter() - begin) * 1e3
                ms = median_ms(call, device, warmup=3, repeats=20)
        except RuntimeError as error:  # backend not available for this shape or device
            out[name] = {"error": str(error).splitlines()[0][:120]}
            continue
        flops = 2 * heads * tokens * tokens * d  # QK^T + PV over the causal half
        out[name] = {"ms_all_layers": ms * config.num_hidden_layers, "tflops": flops / ms / 1e9,
                     "first_call_new_length_ms": first_ms}
    return out


def relative_l2(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def agreement(lm, layout) -> dict:
    """Both bf16 paths (compiled fused, the model's own forward) against the same weights in
    float32 (``fused_prefill`` uncompiled, which equals the model's float32 forward:
    tests/test_fused_prefill.py), and against each other: relative L2 of the first and last
    layer's keys and values, the last layer's queries and the logits; same argmax."""
    fused = generation.prefill(lm, layout, capture="last", fused=True)
    plain = generation.prefill(lm, layout, capture="last", fused=False)
    last = fused.last_layer
    reference_model = copy.deepcopy(lm.model).float()
    out = fused_prefill.forward(reference_model, layout.input_ids.to(lm.device), [last],
                                compiled=False)
    reference = {"keys": out.keys, "values": out.values, "query": out.queries[last],
                 "logits": out.logits}
    del reference_model, out

    def parts(pre) -> dict:
        return {"keys": pre.snapshot.keys, "values": pre.snapshot.values,
                "query": pre.queries[last], "logits": pre.logits}

    def compare(a, b) -> dict:
        row = {f"{kind}_{name}": relative_l2(a[kind][layer], b[kind][layer])
               for kind in ("keys", "values") for name, layer in (("first", 0), ("last", last))}
        row.update(query=relative_l2(a["query"], b["query"]),
                   logits=relative_l2(a["logits"], b["logits"]),
                   same_argmax=int(a["logits"].argmax()) == int(b["logits"].argmax()))
        return row

    fused, plain = parts(fused), parts(plain)
    result = {"fused_vs_fp32": compare(fused, reference),
              "transformers_vs_fp32": compare(plain, reference),
              "fused_vs_transformers": compare(fused, plain)}
    if lm.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen2.5-7b")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    tflops = matmul_tflops(device)
    lm = models.random_model(args.preset, device=device)
    config = lm.model.config
    dtype = next(lm.model.parameters()).dtype
    layout = synthetic_layout(args.tokens, config.vocab_size, seed=args.tokens)
    ids = layout.input_ids.to(device)
    compiled = device.type == "cuda"

    begin = time.perf_counter()
    generation.prefill(lm, layout, capture="none", fused=True)
    sync(device)
    first_call_s = time.perf_counter() - begin

    paths = {
        "transformers": lambda: generation.prefill(lm, layout, capture="none", fused=False),
        "fused-eager": lambda: fused_prefill.forward(lm.model, ids, [], compiled=False),
        "fused": lambda: generation.prefill(lm, layout, capture="none", fused=True),
    }
    times = interleaved_ms(paths, device, args.repeats)
    floor = gemm_floor(config, args.tokens, device, dtype)
    attention = attention_floor(config, args.tokens, device, dtype) if compiled else {}
    prefill_flops = 2 * args.tokens * sum(
        p.numel() for n, p in lm.model.named_parameters() if "embed" not in n and "lm_head" not in n
    ) + 2 * config.num_hidden_layers * config.hidden_size * args.tokens**2
    rows = []
    for name, fn in paths.items():
        ms = times[name]
        row = {"path": name, "ms": ms, "gpu_ms": device_busy_ms(fn, device),
               "tflops": prefill_flops / ms / 1e9, **profile_classes(fn, device)}
        row["of_matmul"] = row["tflops"] / tflops
        row.update({f"{c}_ms": row.get("class_ms", {}).get(c) for c in CLASSES})
        rows.append(row)
    check = agreement(lm, layout)
    write_results("gpu_prefill", {**provenance(device), "preset": args.preset,
                                  "tokens": args.tokens, "matmul_tflops": tflops,
                                  "first_fused_call_s": first_call_s, "gemm_floor": floor,
                                  "attention_floor": attention, "agreement": check,
                                  "rows": rows})
    for row in rows:
        for ms, count, name in row.get("top_kernels", []):
            print(f"{row['path']:>13} {ms:8.3f} ms x{count:<4} {name}")
    print(f"attention alone (all layers): {attention}")
    print(f"matrix products alone: {floor}")
    for pair, values in check.items():
        print(f"agreement {pair}: " + ", ".join(
            f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))
    print(f"{args.preset}, {args.tokens} tokens on {device}; bf16 matmul {tflops:.0f} TFLOP/s; "
          f"first fused call (compile included) {first_call_s:.1f} s")
    print_table(rows, [("path", "path", "s"), ("ms", "ms", ".1f"), ("gpu_ms", "GPU ms", ".1f"),
                       ("gemm_ms", "GEMM ms", ".1f"), ("attention_ms", "attn ms", ".1f"),
                       ("elementwise_ms", "elementwise ms", ".1f"), ("copy_ms", "copy ms", ".1f"),
                       ("tflops", "TFLOP/s", ".0f"), ("of_matmul", "of mm", ".2f")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
