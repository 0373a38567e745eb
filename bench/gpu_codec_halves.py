"""Which half of the one-launch encode kernel costs what: keys and values timed apart.

    PYTHONPATH=. python3 bench/gpu_codec_halves.py                          # 7B, tuned shapes
    PYTHONPATH=. python3 bench/gpu_codec_halves.py --shapes 64/32/4 32/32/4 --presets qwen2.5-14b

The encode kernel quantizes keys (groups of tokens per channel, KIVI) and values (groups of
channels per token) in one launch. For each preset, bit width (8, 4) and launch shape (key
tokens / value tokens per program / warps): the GPU time (profiler, kernel only) of the
launch with only the key tiles, only the value tiles, and both, each against its own floor
(the bytes that half must move: bf16 read once, codes, scales and zeros written once, over
the copy bandwidth measured in the same run). Before timing, each half alone must write
exactly what the whole launch writes for it. Prints a table; writes gpu_codec_halves.json.
"""

from __future__ import annotations

import argparse

import torch
from gpu_common import (
    copy_bandwidth_gbps,
    device_busy_ms,
    outlier_kv,
    print_table,
    provenance,
    shape_arguments,
    write_results,
)

from ray_scout.core.llm import models
from ray_scout.core.llm.kvcodec import KVLayout, base
from ray_scout.core.modes import Mode

GROUP_SIZE = 32
HALVES = ("keys", "values", None)  # None: both halves, the production launch


def half_bytes(layers: int, heads: int, tokens: int, head_dim: int, bits: int,
               group_size: int = GROUP_SIZE) -> dict:
    """Bytes each half must move: bf16 in, codes out, fp16 scales and zeros out."""
    count = layers * heads * tokens * head_dim
    moved = count * 2 + count * bits // 8
    key_groups = layers * heads * -(-tokens // group_size) * head_dim
    value_groups = layers * heads * tokens * (head_dim // group_size)
    return {"keys": moved + 4 * key_groups, "values": moved + 4 * value_groups,
            None: 2 * moved + 4 * (key_groups + value_groups)}


def encoded_buffer(kernels, kv, bits: int) -> tuple:
    """(layout, an empty encoded buffer, the encode launch of ``kernels`` for it)."""
    layers, (heads, tokens, head_dim) = len(kv.keys), kv.keys[0].shape
    device = kv.keys[0].device
    layout = KVLayout(Mode.INT8 if bits == 8 else Mode.INT4, layers, heads, tokens, head_dim,
                      GROUP_SIZE)
    data = torch.empty(base.data_size_bytes(layout), dtype=torch.uint8, device=device)
    plan = base.plan_for(layout, device)  # its offset table
    encoder = kernels.Encoder(device, layers, 0, (heads, tokens, head_dim), bits, GROUP_SIZE,
                              base.quant.SCALE_SLACK / ((1 << bits) - 1),
                              plan.encoder.offsets, plan.encoder.aligned_parts)
    return layout, data, encoder


def encode(kv, buffer, only=None) -> None:
    _, data, encoder = buffer
    encoder(list(kv.keys) + list(kv.values), data, only=only)


def check_halves(kernels, kv, bits: int) -> None:
    """Each half launched alone writes exactly what the whole launch writes for it."""
    whole = encoded_buffer(kernels, kv, bits)
    encode(kv, whole)
    spans = base.part_spans(whole[0])
    for first, only in ((0, "keys"), (3, "values")):
        alone = encoded_buffer(kernels, kv, bits)
        encode(kv, alone, only=only)
        for layer in spans:
            for start, length in layer[first:first + 3]:
                if not torch.equal(alone[1][start:start + length],
                                   whole[1][start:start + length]):
                    raise AssertionError(f"the {only} half alone differs from the whole launch")


def time_halves(kernels, kv, bits: int, device: torch.device, repeats: int) -> dict:
    """GPU ms of the launch with the key tiles only, the value tiles only, and both."""
    check_halves(kernels, kv, bits)
    buffer = encoded_buffer(kernels, kv, bits)
    return {only: device_busy_ms(lambda only=only: encode(kv, buffer, only=only),
                                 device,
                                 repeats=repeats) for only in HALVES}


def measure(kernels, presets: list[str], tokens: int, shapes, device: torch.device,
            repeats: int, copy_gbps: float, label: str = "") -> list[dict]:
    """One row per preset, bit width and launch shape (forced through ``kernels.LAUNCH``;
    None: the shape ``launch_shape`` picks on this device)."""
    saved = dict(kernels.LAUNCH)
    rows = []
    try:
        for preset in presets:
            facts = models.facts_for(f"random:{preset}")
            kv = outlier_kv(facts.num_layers, facts.num_kv_heads, tokens, facts.head_dim,
                            device, seed=4)
            for shape in shapes:
                for bits in (8, 4):
                    if shape is None:
                        kernels.LAUNCH.pop(("encode", bits), None)
                    else:
                        kernels.LAUNCH[("encode", bits)] = shape
                    ms = time_halves(kernels, kv, bits, device, repeats)
                    shape_used = shape or next(
                        chosen for key, chosen in kernels.tuned().items()
                        if key[1:5] == ("encode", bits, facts.num_layers, facts.num_kv_heads))
                    moved = half_bytes(facts.num_layers, facts.num_kv_heads, tokens,
                                       facts.head_dim, bits)
                    row = {"kernels": label, "preset": preset, "bits": bits,
                           "key_tokens": shape_used[0], "value_tokens": shape_used[1],
                           "warps": shape_used[2]}
                    for only, name in (("keys", "keys"), ("values", "values"), (None, "both")):
                        row[f"{name}_ms"] = ms[only]
                        row[f"{name}_ratio"] = moved[only] / ms[only] / 1e6 / copy_gbps
                    rows.append(row)
    finally:
        kernels.LAUNCH.clear()
        kernels.LAUNCH.update(saved)
    return rows


COLUMNS = [("kernels", "kernels", "s"), ("preset", "preset", "s"), ("bits", "bits", "d"),
           ("key_tokens", "key tok", "d"), ("value_tokens", "val tok", "d"),
           ("warps", "warps", "d"),
           ("keys_ms", "keys ms", ".4f"), ("keys_ratio", "keys/copy", ".3f"),
           ("values_ms", "values ms", ".4f"), ("values_ratio", "values/copy", ".3f"),
           ("both_ms", "both ms", ".4f"), ("both_ratio", "both/copy", ".3f")]


def launch_shape(text: str) -> tuple[int, int, int]:
    try:
        key_tokens, value_tokens, warps = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"launch shape {text!r}: write key tokens/value tokens/warps, e.g. 64/32/4") from None
    return key_tokens, value_tokens, warps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(parser, presets=["qwen2.5-7b"], tokens=4096, repeats=20)
    parser.add_argument("--shapes", nargs="+", type=launch_shape, default=None,
                        help="launch shapes key_tokens/value_tokens/warps (default: the "
                             "shape each width's encode picks on this device)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" or base.triton_kernels is None:
        parser.error("times kernels with the CUDA profiler: needs Triton and --device cuda")
    kernels = base.triton_kernels
    copy_gbps = copy_bandwidth_gbps(device)
    rows = measure(kernels, args.presets, args.tokens, args.shapes or [None], device,
                   args.repeats, copy_gbps)
    write_results("gpu_codec_halves", {**provenance(device), "copy_gbps": copy_gbps,
                                       "rows": rows})
    print(f"copy bandwidth (read+write): {copy_gbps:.0f} GB/s")
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
