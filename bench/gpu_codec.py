"""KV codec throughput at Qwen2.5 3B/7B/14B shapes on the GPU: torch path vs Triton kernels.

    PYTHONPATH=. python3 bench/gpu_codec.py --presets qwen2.5-3b qwen2.5-7b qwen2.5-14b
    PYTHONPATH=. python3 bench/gpu_codec.py --device cpu --presets tiny --tokens 256   # smoke

For each preset, mode (int8, int4, mixed_int4) and path (torch, triton): median time of a
whole ``codec.encode``/``codec.decode`` call on a snapshot already on the device (wall: CUDA
events around the call, so host work before the launch and the kernel both count; host:
the Python call alone, which returns before the GPU is done), the kernels' GPU time
(profiler), and each over the floor: the bytes a perfect kernel moves (input read once +
output written once; at encode, mixed_int4's bf16 layers copied into the encoded buffer
too) over the copy bandwidth measured in the same run. The first Triton
call of each shape picks the launch shape for this device (``triton_kernels.launch_shape``);
its time and the shapes picked are reported. For each Triton row, also the bare launch
(the compiled kernel's launcher, what a call does after its checks) against the same launch
replayed from a CUDA graph: host microseconds and wall time. Every run first checks, on fresh random KV
with outlier channels, that every decoded element lies within the quantization bound of a
float64 reference (|x̂ - x| <= step/2 + fp16 zero rounding + bf16 output rounding), that
the Triton scales equal the torch ones and the codes differ by at most one, and explains
each differing code (how far from the rounding boundary its exact value lies, and which
rounding of the bias reproduces it). Prints a table last; writes gpu_codec.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from gpu_common import (
    copy_bandwidth_gbps,
    device_busy_ms,
    device_events,
    median_ms,
    outlier_kv,
    print_table,
    provenance,
    shape_arguments,
    sync,
    write_results,
)

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


def _codes(encoded, shape) -> torch.Tensor:
    if encoded.bits == 4:
        return base.quant.unpack_int4(encoded.data, shape)
    return encoded.data.reshape(shape)


def explain_code_differences(snapshot, fast, slow) -> dict:
    """Each code where the Triton path and the torch path differ: how far its exact value
    (x - zero) / scale + 0.5 lies from the integer between the two codes (in fp32 units in
    the last place there; 0 = an exact tie), and which arithmetic gives each path's code.

    Both paths compute code = trunc(fma(x, inverse, bias)) with bias = 0.5 - zero * inverse.
    Emulated here in float64 and rounded to fp32 where the hardware rounds: ``torch``
    rounds zero * inverse, then subtracts (two kernels); ``fused`` rounds once, as an fma
    (what a compiler that contracts the multiply and subtract produces).
    """
    layout = fast.layout
    shape = layout.tensor_shape
    out = {"differing": 0, "exact_ties": 0, "max_ulps": 0.0, "torch_matches_rounded_bias": 0,
           "triton_matches_fused_bias": 0, "triton_matches_rounded_bias": 0}
    for dim, originals, fast_side, slow_side in (
            (base.KEY_GROUP_DIM, snapshot.keys, fast.keys, slow.keys),
            (base.VALUE_GROUP_DIM, snapshot.values, fast.values, slow.values)):
        for x, a, b in zip(originals, fast_side, slow_side):
            if a.bits == base.RAW_BITS:
                continue
            ca, cb = _codes(a, shape), _codes(b, shape)
            where = (ca != cb).nonzero(as_tuple=True)
            if not where[0].numel():
                continue
            qmax = (1 << a.bits) - 1
            step, zero = expand_steps(b, shape, layout.group_size, dim)
            s, z = step[where].float(), zero[where].float()
            xv = x[where].float()
            inverse = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
            rounded = 0.5 - z * inverse
            fused = (0.5 - z.double() * inverse.double()).float()

            def code(bias, xv=xv, inverse=inverse, qmax=qmax):
                # fma(x, inverse, bias) rounded once to fp32, then truncated
                t = (xv.double() * inverse.double() + bias.double()).float()
                return t.clamp(0, qmax).floor().to(torch.uint8)

            exact = (xv.double() - z.double()) / s.double() + 0.5
            boundary = torch.maximum(ca[where], cb[where]).double()
            ulp = torch.exp2(torch.floor(torch.log2(boundary)) - 23)
            out["differing"] += int(where[0].numel())
            out["exact_ties"] += int((exact == boundary).sum())
            out["max_ulps"] = max(out["max_ulps"], float(((exact - boundary).abs() / ulp).max()))
            out["torch_matches_rounded_bias"] += int((code(rounded) == cb[where]).sum())
            out["triton_matches_fused_bias"] += int((code(fused) == ca[where]).sum())
            out["triton_matches_rounded_bias"] += int((code(rounded) == ca[where]).sum())
    return out


def poison_allocator(size_bytes: int, device: torch.device) -> None:
    """Leave NaN in the block the next allocation of this size reuses, so an unwritten
    decode output shows up as non-finite."""
    if device.type == "cuda":
        torch.full((size_bytes // 2,), float("nan"), dtype=torch.bfloat16, device=device)


def host_ms(fn, device: torch.device, repeats: int) -> float:
    """Median time the calling thread spends in ``fn()`` (no wait for the GPU after it)."""
    samples = []
    for _ in range(repeats):
        sync(device)
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def first_call_ms(fn, device: torch.device) -> float:
    sync(device)
    begin = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - begin) * 1e3


TORCH_REPEATS = 3  # the torch path is 20 to 60 ms a call and only a reference here
LAUNCH_REPEATS = 50  # bare launches and graph replays: tens of microseconds each


def launch_costs(codec, kv, device: torch.device) -> dict:
    """What one bare encode and decode launch costs, straight through the compiled kernel's
    launcher (what ``codec.encode``/``decode`` do after their checks) and replayed from a
    CUDA graph that holds the same launch, captured once: host microseconds of the call
    and wall milliseconds between CUDA events. A graph saves per-call host work only where
    it replaces several launches; each call here is one launch (issue 15 asked whether
    graphs would pay)."""
    kernels = base.triton_kernels
    layout = codec.layout_for(kv)
    device = kv.keys[0].device  # indexed, as the codec's own calls key their plan
    plan = base.plan_for(layout, device)
    if device.type != "cuda" or plan.encoder is None:
        return {}
    encoder, decoder = plan.encoder, plan.decoder
    tensors = plan.inputs(kv.keys, kv.values)
    data = torch.empty(plan.size_bytes, dtype=torch.uint8, device=device)
    encoder(tensors, data).failed()  # tuned and compiled by now
    out = decoder(data)
    table = kernels.address_table(device, tensors)
    ring = kernels.flag_ring(device)
    _, slot = ring.acquire()
    dims = (encoder.layers, *encoder.shape, encoder.group_size)
    enc_shape = kernels.launch_shape("encode", encoder.bits, device, dims, None)
    dec_shape = kernels.launch_shape("decode", decoder.bits, device, dims, None)
    aligned = data.data_ptr() % kernels.ALIGN_BYTES == 0
    launches = {
        "enc": lambda: encoder.launch_at(enc_shape, None, aligned, table, data, ring.values, slot),
        "dec": lambda: decoder.launch_at(dec_shape, data.data_ptr() % kernels.ALIGN_BYTES == 0,
                                       data, out)}
    result = {}
    for stage, launch in launches.items():
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            launch()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launch()
        result[f"{stage}_launch_host_us"] = host_ms(launch, device, LAUNCH_REPEATS) * 1e3
        result[f"{stage}_replay_host_us"] = host_ms(graph.replay, device, LAUNCH_REPEATS) * 1e3
        result[f"{stage}_launch_wall_ms"] = median_ms(launch, device, repeats=LAUNCH_REPEATS)
        result[f"{stage}_replay_wall_ms"] = median_ms(graph.replay, device,
                                                      repeats=LAUNCH_REPEATS)
    sync(device)
    return result


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
            reps = TORCH_REPEATS if path == "torch" else repeats

            def encode(codec=codec):
                return codec.encode(timing_kv)

            with scope:
                # The first calls on a new shape choose the launch shapes (Triton path).
                enc_first = first_call_ms(encode, device)
                timed = codec.encode(timing_kv)
                timed.check_finite()

                def decode(codec=codec, timed=timed):
                    return codec.decode(timed, dtype=torch.bfloat16, device=device)

                dec_first = first_call_ms(decode, device)
                poison_allocator(input_bytes, device)
                encoded = codec.encode(check_kv)
                encoded.check_finite()
                poison_allocator(input_bytes, device)
                decoded = codec.decode(encoded, dtype=torch.bfloat16, device=device)
                check = check_against_float64(check_kv, encoded, decoded)
                per_path[path] = (encoded, decoded)
                enc_ms = median_ms(encode, device, repeats=reps)
                dec_ms = median_ms(decode, device, repeats=reps)
                enc_host = host_ms(encode, device, reps)
                dec_host = host_ms(decode, device, reps)
                enc_busy = device_busy_ms(encode, device)
                dec_busy = device_busy_ms(decode, device)
            quantized = sum(1 for b in encoded.layout.layer_bits() if b != base.RAW_BITS)
            moved_in = input_bytes * quantized // facts.num_layers  # raw layers: no kernel
            encoded_bytes = sum(t.size_bytes for t in timed.keys + timed.values
                                if t.bits != base.RAW_BITS)
            moved = moved_in + encoded_bytes  # read bf16 once, write codes+scales+zeros once
            # Encode also copies the raw (bf16) layers into the encoded buffer; decode hands
            # out views of them.
            raw_bytes = input_bytes - moved_in
            floor_ms = moved / copy_gbps / 1e6
            enc_floor_ms = (moved + 2 * raw_bytes) / copy_gbps / 1e6
            row = {"preset": preset, "mode": mode.value, "path": path, "tokens": tokens,
                   "input_mb": input_bytes / 1e6, "encoded_mb": timed.size_bytes / 1e6,
                   "moved_mb": moved / 1e6, "enc_floor_ms": enc_floor_ms, "floor_ms": floor_ms,
                   "enc_first_ms": enc_first, "dec_first_ms": dec_first,
                   "enc_ms": enc_ms, "dec_ms": dec_ms, "enc_host_ms": enc_host,
                   "dec_host_ms": dec_host,
                   "enc_in_gbps": input_bytes / enc_ms / 1e6, "dec_in_gbps": input_bytes / dec_ms / 1e6,
                   "enc_wall_ratio": enc_floor_ms / enc_ms, "dec_wall_ratio": floor_ms / dec_ms,
                   "enc_busy_ms": enc_busy, "dec_busy_ms": dec_busy, **check}
            if enc_busy:
                row["enc_busy_ratio"] = enc_floor_ms / enc_busy
                row["dec_busy_ratio"] = floor_ms / dec_busy
            if path == "triton":  # what each call's GPU time is made of
                row["enc_events"] = device_events(encode, device)
                row["dec_events"] = device_events(decode, device)
                row.update(launch_costs(codec, timing_kv, device))
            rows.append(row)
        if "triton" in per_path:
            agree = compare_paths(per_path["triton"][0], per_path["torch"][0],
                                  per_path["triton"][1], per_path["torch"][1])
            agree["differences"] = explain_code_differences(check_kv, per_path["triton"][0],
                                                            per_path["torch"][0])
            rows[-1].update(agree)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(parser, presets=["qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b"], tokens=4096,
                    repeats=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    copy_gbps = copy_bandwidth_gbps(device)
    print(provenance(device)["device"], f"copy {copy_gbps:.0f} GB/s", flush=True)
    rows = []
    for preset in args.presets:
        rows += bench_preset(preset, args.tokens, device, args.repeats, copy_gbps)
    kernels = base.triton_kernels
    tuned = ([{"device": key[0], "stage": key[1], "bits": key[2], "layers": key[3],
               "heads": key[4], "token_bucket": key[5], "shape": list(shape)}
              for key, shape in kernels.tuned().items()] if kernels else [])
    write_results("gpu_codec", {**provenance(device), "copy_gbps": copy_gbps,
                                "tuned": tuned, "triton": kernels is not None, "rows": rows})
    for entry in tuned:
        print("launch shape", entry)
    for row in rows:
        if "differences" in row:
            print(row["preset"], row["mode"], "code differences:", row["differences"])
    print(f"copy bandwidth (read+write): {copy_gbps:.0f} GB/s")
    print_table(rows, [("preset", "preset", "s"), ("mode", "mode", "s"), ("path", "path", "s"),
                       ("enc_floor_ms", "enc floor", ".3f"), ("floor_ms", "dec floor", ".3f"),
                       ("enc_ms", "enc ms", ".3f"), ("enc_host_ms", "enc host", ".3f"),
                       ("enc_busy_ms", "enc gpu", ".3f"), ("enc_busy_ratio", "gpu/floor", ".2f"),
                       ("enc_wall_ratio", "wall/floor", ".2f"),
                       ("dec_ms", "dec ms", ".3f"), ("dec_host_ms", "dec host", ".3f"),
                       ("dec_busy_ms", "dec gpu", ".3f"), ("dec_busy_ratio", "gpu/floor", ".2f"),
                       ("dec_wall_ratio", "wall/floor", ".2f"),
                       ("enc_first_ms", "enc 1st", ".0f"), ("dec_first_ms", "dec 1st", ".0f"),
                       ("enc_launch_host_us", "enc launch us", ".0f"),
                       ("enc_replay_host_us", "enc replay us", ".0f"),
                       ("dec_launch_host_us", "dec launch us", ".0f"),
                       ("dec_replay_host_us", "dec replay us", ".0f"),
                       ("relative_error", "rel err", ".4f"), ("bound_ratio_max", "bound", ".2f"),
                       ("code_mismatches", "code diff", "d"),
                       ("decode_beyond_1ulp", ">1ulp", "d")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
