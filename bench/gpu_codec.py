"""KV codec throughput at Qwen2.5-7B/14B shapes on the GPU: torch path vs Triton kernels.

    PYTHONPATH=. python3 bench/gpu_codec.py --presets qwen2.5-7b qwen2.5-14b --tokens 4096
    PYTHONPATH=. python3 bench/gpu_codec.py --device cpu --presets tiny --tokens 256   # smoke

For each preset, mode (int8, int4, mixed_int4) and path (torch, triton): median encode and
decode time of a whole snapshot already on the device, as GB/s of bf16 input, and the bytes
actually moved (input read once + output written once) over the copy bandwidth measured in
the same run. Every run first checks, on fresh random KV with outlier channels, that every
decoded element lies within the quantization bound of a float64 reference
(|x̂ - x| <= step/2 + fp16 zero rounding + bf16 output rounding), and that the Triton codes
and scales equal the torch ones (decode within one bf16 ulp). Prints a table last; writes
gpu_codec.json.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from gpu_common import (copy_bandwidth_gbps, device_busy_ms, device_events, median_ms,
                        outlier_kv, print_table, provenance, shape_arguments, write_results)
from ray_scout.core.llm import models
from ray_scout.core.llm.kvcodec import base, codec_for
from ray_scout.core.modes import Mode

MODES = (Mode.INT8, Mode.INT4, Mode.MIXED_INT4)


@contextlib.contextmanager
def torch_path():
    """Route the codecs through ``quant`` even where Triton could run."""
    saved = base.triton_kernels
    base.triton_kernels = None
    try:
        yield
    finally:
        base.triton_kernels = saved


def protected_for(mode: Mode, num_layers: int) -> tuple[int, ...]:
    # Three bf16 layers, as the bottleneck diagnosis typically returns (first two, last).
    return (0, 1, num_layers - 1) if mode == Mode.MIXED_INT4 else ()


def expand_steps(encoded, shape, group_size: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element step and zero (float64) of one encoded tensor."""
    length = shape[dim]
    steps = encoded.scales.double().repeat_interleave(group_size, dim=dim).narrow(dim, 0, length)
    zeros = encoded.zeros.double().repeat_interleave(group_size, dim=dim).narrow(dim, 0, length)
    return steps, zeros


def check_against_float64(snapshot, encoded, decoded) -> dict:
    """Worst ratio of |x̂ - x| to its bound over all quantized elements; relative error."""
    layout = encoded.layout
    worst, num, den = 0.0, 0.0, 0.0
    for dim, originals, codes, outs in ((base.KEY_GROUP_DIM, snapshot.keys, encoded.keys, decoded.keys),
                                        (base.VALUE_GROUP_DIM, snapshot.values, encoded.values,
                                         decoded.values)):
        for x, enc, y in zip(originals, codes, outs):
            x, y = x.double(), y.double()
            if not bool(torch.isfinite(y).all()):
                raise AssertionError("decoded KV holds non-finite values (unwritten output?)")
            num += float((y - x).square().sum())
            den += float(x.square().sum())
            if enc.bits == base.RAW_BITS:
                if not torch.equal(x, y):
                    raise AssertionError("a bf16 layer did not round-trip exactly")
                continue
            step, zero = expand_steps(enc, layout.tensor_shape, layout.group_size, dim)
            bound = step * (0.5 + 1e-4) + zero.abs() * 2**-11 + y.abs() * 2**-8 + 1e-30
            worst = max(worst, float(((y - x).abs() / bound).max()))
    if worst > 1.0:
        raise AssertionError(f"decoded KV exceeds the quantization bound by {worst:.3f}x")
    return {"bound_ratio_max": worst, "relative_error": (num / den) ** 0.5}


def compare_paths(fast, slow, fast_dec, slow_dec) -> dict:
    """Triton vs torch: code mismatches, scale equality, decode ulps."""
    mismatched, total, scales_equal, off_ulp = 0, 0, True, 0
    for a, b in zip(fast.keys + fast.values, slow.keys + slow.values):
        mismatched += int((a.data != b.data).sum())
        total += a.data.numel()
        if a.scales is not None:
            scales_equal &= torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    for a, b in zip(fast_dec.keys + fast_dec.values, slow_dec.keys + slow_dec.values):
        a, b = a.float(), b.float()
        ulp = torch.maximum(a.abs(), b.abs()) * 2**-7
        off_ulp += int(((a - b).abs() > ulp).sum())
    return {"code_mismatches": mismatched, "codes": total, "scales_equal": bool(scales_equal),
            "decode_beyond_1ulp": off_ulp}


def poison_allocator(size_bytes: int, device: torch.device) -> None:
    """Leave NaN in the block the next allocation of this size reuses, so an unwritten
    decode output shows up as non-finite."""
    if device.type == "cuda":
        torch.full((size_bytes // 2,), float("nan"), dtype=torch.bfloat16, device=device)


def bench_preset(preset: str, tokens: int, device: torch.device, repeats: int,
                 copy_gbps: float) -> list[dict]:
    facts = models.facts_for(f"random:{preset}")
    rows = []
    check_kv = outlier_kv(facts.num_layers, facts.num_kv_heads, tokens, facts.head_dim, device,
                          seed=1)
    timing_kv = outlier_kv(facts.num_layers, facts.num_kv_heads, tokens, facts.head_dim, device,
                           seed=2)
    input_bytes = facts.bf16_bytes_per_token() * tokens  # bf16 keys + values, all layers
    for mode in MODES:
        codec = codec_for(mode, protected_layers=protected_for(mode, facts.num_layers))
        per_path = {}
        for path in ("torch", "triton"):
            if path == "triton" and base.triton_kernels is None:
                continue
            scope = torch_path() if path == "torch" else contextlib.nullcontext()
            with scope:
                poison_allocator(input_bytes, device)
                encoded = codec.encode(check_kv)
                poison_allocator(input_bytes, device)
                decoded = codec.decode(encoded, dtype=torch.bfloat16, device=device)
                check = check_against_float64(check_kv, encoded, decoded)
                per_path[path] = (encoded, decoded)
                timed = codec.encode(timing_kv)
                enc_ms = median_ms(lambda: codec.encode(timing_kv), device, repeats=repeats)
                dec_ms = median_ms(lambda: codec.decode(timed, dtype=torch.bfloat16, device=device),
                                   device, repeats=repeats)
                enc_busy = device_busy_ms(lambda: codec.encode(timing_kv), device)
                dec_busy = device_busy_ms(
                    lambda: codec.decode(timed, dtype=torch.bfloat16, device=device), device)
            quantized = sum(1 for b in encoded.layout.layer_bits() if b != base.RAW_BITS)
            moved_in = input_bytes * quantized // facts.num_layers  # raw layers are not copied
            encoded_bytes = sum(t.size_bytes for t in timed.keys + timed.values
                                if t.bits != base.RAW_BITS)
            moved = moved_in + encoded_bytes  # read bf16 once, write codes+scales+zeros once
            row = {"preset": preset, "mode": mode.value, "path": path, "tokens": tokens,
                   "input_mb": input_bytes / 1e6, "encoded_mb": timed.size_bytes / 1e6,
                   "enc_ms": enc_ms, "dec_ms": dec_ms,
                   "enc_in_gbps": input_bytes / enc_ms / 1e6, "dec_in_gbps": input_bytes / dec_ms / 1e6,
                   "enc_moved_ratio": moved / enc_ms / 1e6 / copy_gbps,
                   "dec_moved_ratio": moved / dec_ms / 1e6 / copy_gbps,
                   "enc_busy_ms": enc_busy, "dec_busy_ms": dec_busy, **check}
            if enc_busy:
                row["enc_busy_ratio"] = moved / enc_busy / 1e6 / copy_gbps
                row["dec_busy_ratio"] = moved / dec_busy / 1e6 / copy_gbps
            if path == "triton":  # what each call's GPU time is made of
                with scope:
                    row["enc_events"] = device_events(lambda: codec.encode(timing_kv), device)
                    row["dec_events"] = device_events(
                        lambda: codec.decode(timed, dtype=torch.bfloat16, device=device), device)
            rows.append(row)
        if "triton" in per_path:
            agree = compare_paths(per_path["triton"][0], per_path["torch"][0],
                                  per_path["triton"][1], per_path["torch"][1])
            rows[-1].update(agree)
    return rows


# (key tokens per program, value tokens per program, warps). Programs that loop over tiles
# (grid-stride, 4 to 16 per SM) were swept too and lost at every shape (docs/PERFORMANCE.md).
# Six shapes were swept in earlier runs; these three were the fastest (gpu_codec_run4.json),
# and 32/32/4 the fastest 4-bit encode of seven once value loads were vectors
# (gpu_codec_halves_explore.json). Streaming eviction hints on the encoder were swept too
# and did not help (gpu_codec_run5.json, round 3's final run, made at commit 806dbe1).
SWEEP = ((32, 16, 2), (32, 32, 2), (32, 32, 4), (64, 32, 4))


def sweep_launch(presets: list[str], tokens: int, device: torch.device) -> list[dict]:
    """GPU time of the encode and decode kernels (int8 and int4, keys and values in one
    launch; the flag on the device, so only the kernel is timed) at every preset under
    every launch shape in SWEEP; installs in ``triton_kernels.LAUNCH``, for each kernel and
    width, the shape whose time relative to each preset's fastest sums lowest over presets."""
    kernels = base.triton_kernels
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    rows = []
    for preset in presets:
        facts = models.facts_for(f"random:{preset}")
        kv = outlier_kv(facts.num_layers, facts.num_kv_heads, tokens, facts.head_dim, device,
                        seed=4)
        shape = (facts.num_kv_heads, tokens, facts.head_dim)
        for config in SWEEP:
            kernels.LAUNCH = {stage: {8: config, 4: config} for stage in ("encode", "decode")}
            row = {"preset": preset, "key_tokens": config[0], "value_tokens": config[1],
                   "warps": config[2]}
            for bits in (8, 4):
                factor = base.quant.SCALE_SLACK / ((1 << bits) - 1)
                halves = kernels.quantize_kv(kv.keys, kv.values, bits, 32, factor, flag)
                row[f"enc{bits}_ms"] = device_busy_ms(
                    lambda: kernels.quantize_kv(kv.keys, kv.values, bits, 32, factor, flag),
                    device)
                parts = [tuple(tuple(t.unbind()) for t in half) for half in halves]
                row[f"dec{bits}_ms"] = device_busy_ms(
                    lambda: kernels.dequantize_kv(*parts, shape, bits, 32), device)
            rows.append(row)
    for stage, name in (("enc", "encode"), ("dec", "decode")):
        for bits in (8, 4):
            score = {}
            for preset in presets:
                mine = [r for r in rows if r["preset"] == preset]
                best = min(r[f"{stage}{bits}_ms"] for r in mine)
                for r in mine:
                    choice = (r["key_tokens"], r["value_tokens"], r["warps"])
                    score[choice] = score.get(choice, 0.0) + r[f"{stage}{bits}_ms"] / best
            kernels.LAUNCH[name][bits] = min(score, key=score.get)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(parser, presets=["qwen2.5-7b", "qwen2.5-14b"], tokens=4096, repeats=20)
    parser.add_argument("--sweep", action="store_true",
                        help="first time each kernel's launch shapes and keep the fastest")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.sweep and device.type != "cuda":
        parser.error("--sweep times kernels with the CUDA profiler; it needs --device cuda")
    copy_gbps = copy_bandwidth_gbps(device)
    sweep = sweep_launch(args.presets, args.tokens, device) if args.sweep else []
    if sweep:
        print_table(sweep, [("preset", "preset", "s"), ("key_tokens", "key tokens", "d"),
                            ("value_tokens", "value tokens", "d"),
                            ("warps", "warps", "d"), ("enc8_ms", "enc8 ms", ".3f"),
                            ("enc4_ms", "enc4 ms", ".3f"), ("dec8_ms", "dec8 ms", ".3f"),
                            ("dec4_ms", "dec4 ms", ".3f")])
        print("launch shapes used:", base.triton_kernels.LAUNCH)
    rows = []
    for preset in args.presets:
        rows += bench_preset(preset, args.tokens, device, args.repeats, copy_gbps)
    launch = base.triton_kernels.LAUNCH if base.triton_kernels else None
    write_results("gpu_codec", {**provenance(device), "copy_gbps": copy_gbps, "sweep": sweep,
                                "launch": launch,
                                "triton": base.triton_kernels is not None, "rows": rows})
    print(f"copy bandwidth (read+write): {copy_gbps:.0f} GB/s")
    print_table(rows, [("preset", "preset", "s"), ("mode", "mode", "s"), ("path", "path", "s"),
                       ("input_mb", "in MB", ".0f"), ("enc_ms", "enc ms", ".3f"),
                       ("enc_in_gbps", "enc GB/s", ".0f"), ("enc_moved_ratio", "enc/copy", ".2f"),
                       ("dec_ms", "dec ms", ".3f"), ("dec_in_gbps", "dec GB/s", ".0f"),
                       ("dec_moved_ratio", "dec/copy", ".2f"),
                       ("enc_busy_ms", "enc gpu ms", ".3f"), ("enc_busy_ratio", "gpu/copy", ".2f"),
                       ("dec_busy_ms", "dec gpu ms", ".3f"), ("dec_busy_ratio", "gpu/copy", ".2f"),
                       ("relative_error", "rel err", ".4f"), ("bound_ratio_max", "bound", ".2f"),
                       ("code_mismatches", "code diff", "d"),
                       ("decode_beyond_1ulp", ">1ulp", "d")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
