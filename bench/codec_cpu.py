"""KV codec figures on the CPU: payload sizes, zstd ratios on real KV, throughput, bottleneck.

Prints Markdown tables (the ones in docs/CODECS.md) and writes the raw numbers as JSON.

    PYTHONPATH=. nice python3 bench/codec_cpu.py --json bench/results/codec_cpu.json

Sections: (1) payload bytes per mode from the size formula for the embedded model and the
Qwen2.5 presets at 170/1K/4K tokens, each checked against real encoded bytes where the
input fits in memory; (2) zstd ratio per mode on real KV of the embedded model; (3) encode
and decode throughput for INT8/INT4 at the Qwen2.5-7B shape, 4K tokens, beside the memory
copy bandwidth of the same tensors; (4) the embedded model's bottleneck layers.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path

import torch

from ray_scout import provenance
from ray_scout.core.llm import bottleneck, wire
from ray_scout.core.llm.kv import KVSnapshot
from ray_scout.core.llm.kvcodec import codec_for, relative_error
from ray_scout.core.llm.models import facts_for, load_model
from ray_scout.core.modes import KV_MODES, Mode

MODELS = ("embedded", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b")
LENGTHS = (170, 1024, 4096)
VERIFY_LIMIT_BYTES = 120_000_000  # encode for real only where bf16 KV stays this small
# Paper B's operating-mode table (README of the research repository): payload in MB.
PAPER_B_MB = {Mode.BF16: 9.7, Mode.INT8: 4.7, Mode.INT4: 2.3, Mode.MIXED_INT4: 2.6}


def random_snapshot(facts, tokens: int, dtype=torch.bfloat16, seed: int = 0) -> KVSnapshot:
    gen = torch.Generator().manual_seed(seed)
    shape = (facts.num_kv_heads, tokens, facts.head_dim)
    draw = lambda: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    return KVSnapshot(tuple(draw() for _ in range(facts.num_layers)),
                      tuple(draw() for _ in range(facts.num_layers)), torch.arange(tokens))


def sizes(protected_by_model: dict[str, tuple[int, ...]]) -> list[dict]:
    rows = []
    for name in MODELS:
        facts = facts_for(name)
        for tokens in LENGTHS:
            verify = facts.bf16_bytes_per_token() * tokens <= VERIFY_LIMIT_BYTES
            snap = random_snapshot(facts, tokens) if verify else None
            for mode in KV_MODES:
                protected = protected_by_model[name] if mode == Mode.MIXED_INT4 else ()
                formula = wire.payload_size_bytes(mode, facts, tokens, protected_layers=protected)
                measured = None
                if snap is not None:
                    encoded = codec_for(mode, protected_layers=protected).encode(snap)
                    measured = len(wire.encode_kv(encoded, facts.model_id))
                rows.append(dict(model=name, tokens=tokens, mode=mode.value,
                                 protected=list(protected), formula_bytes=formula,
                                 wire_bytes=measured,
                                 bf16_data_bytes=facts.bf16_bytes_per_token() * tokens))
    return rows


def natural_text() -> str:
    # Deterministic English prose shipped with Python: stdlib module documentation.
    import argparse as a, collections as c, email as e, json as j, logging as lo, \
        subprocess as s, threading as t, unittest as u, zipfile as z
    return "\n\n".join(inspect.getdoc(m) or "" for m in (lo, s, u, a, j, c, t, z, e))


def real_kv(lm, tokens: int) -> KVSnapshot:
    ids = lm.tokenizer(natural_text(), return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"calibration text has only {ids.shape[1]} tokens, need {tokens}")
    with torch.no_grad():
        return KVSnapshot.from_cache(lm.model(ids, use_cache=True).cache)


def zstd_ratios(lm, snap: KVSnapshot, protected: tuple[int, ...]) -> list[dict]:
    rows = []
    for mode in KV_MODES:
        codec = codec_for(mode, protected_layers=protected if mode == Mode.MIXED_INT4 else ())
        encoded = codec.encode(snap)
        plain = wire.encode_kv(encoded, lm.model_id)
        start = time.perf_counter()
        packed = wire.encode_kv(encoded, lm.model_id, compress=True)
        zstd_s = time.perf_counter() - start
        payload = wire.decode_payload(packed, expected_model=lm.facts)
        error = relative_error(snap, codec.decode(encoded))
        rows.append(dict(mode=mode.value, tokens=snap.num_tokens, wire_bytes=len(plain),
                         zstd_bytes=len(packed), body_ratio=payload.compression_ratio,
                         wire_ratio=len(plain) / len(packed), zstd_encode_s=zstd_s,
                         relative_error=error))
    return rows


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(repeats: int) -> list[dict]:
    facts = facts_for("qwen2.5-7b")
    snap = random_snapshot(facts, 4096)
    input_bytes = sum(t.numel() * t.element_size() for t in snap.keys + snap.values)
    tensors = snap.keys + snap.values
    copy_s = timed(lambda: [t.clone() for t in tensors], repeats)
    rows = [dict(op="memory copy (clone)", mode="-", seconds=copy_s,
                 gb_per_s=input_bytes / copy_s / 1e9, input_bytes=input_bytes)]
    for mode in (Mode.INT8, Mode.INT4):
        codec = codec_for(mode)
        encoded = codec.encode(snap)
        enc_s = timed(lambda: codec.encode(snap), repeats)
        dec_s = timed(lambda: codec.decode(encoded, dtype=torch.bfloat16), repeats)
        for op, seconds in (("encode", enc_s), ("decode", dec_s)):
            rows.append(dict(op=op, mode=mode.value, seconds=seconds,
                             gb_per_s=input_bytes / seconds / 1e9, input_bytes=input_bytes,
                             ratio_to_copy=copy_s / seconds))
    return rows


def markdown(results: dict) -> str:
    load = " ".join(f"{x:.1f}" for x in results["load_average_1_5_15"])
    out = [f"machine: {results['machine']}; commit: {results['commit']}; date: "
           f"{results['date']}; torch threads: {results['threads']}; load average at start: "
           f"{load}", ""]
    out += ["### Payload bytes (uncompressed wire = formula)", "",
            "| model | tokens | bf16 | int8 | int4 | mixed_int4 (protected) | checked |",
            "|---|---|---|---|---|---|---|"]
    by_key = {}
    for row in results["sizes"]:
        by_key.setdefault((row["model"], row["tokens"]), []).append(row)
    for (name, tokens), rows in by_key.items():
        cells = {r["mode"]: r for r in rows}
        checked = all(r["wire_bytes"] == r["formula_bytes"] for r in rows
                      if r["wire_bytes"] is not None)
        encoded = rows[0]["wire_bytes"] is not None
        mixed = cells["mixed_int4"]
        out.append(f"| {name} | {tokens} | " + " | ".join(
            f"{cells[m]['formula_bytes']:,}" for m in ("bf16", "int8", "int4"))
            + f" | {mixed['formula_bytes']:,} ({mixed['protected']}) | "
            + ("encoded, equal" if encoded and checked else "formula only" if not encoded
               else "MISMATCH") + " |")
    seven = {r["mode"]: r for r in results["sizes"]
             if r["model"] == "qwen2.5-7b" and r["tokens"] == 170}
    out += ["", "### Beside Paper B (Qwen2.5-7B, 170 tokens)", "",
            "| mode | Paper B | ours (MB = 1e6 B) | ratio to our bf16 |", "|---|---|---|---|"]
    for mode in KV_MODES:
        ours = seven[mode.value]["formula_bytes"]
        out.append(f"| {mode.value} | {PAPER_B_MB[mode]} MB | {ours / 1e6:.2f} | "
                   f"{ours / seven['bf16']['formula_bytes']:.3f} |")
    out += ["", f"### zstd (level 3) on real KV of the embedded model "
            f"({results['zstd'][0]['tokens']} tokens)", "",
            "| mode | wire bytes | with zstd | ratio | zstd time (s) | relative error |",
            "|---|---|---|---|---|---|"]
    for r in results["zstd"]:
        out.append(f"| {r['mode']} | {r['wire_bytes']:,} | {r['zstd_bytes']:,} | "
                   f"{r['wire_ratio']:.3f} | {r['zstd_encode_s']:.3f} | "
                   f"{r['relative_error']:.4f} |")
    out += ["", "### Throughput (Qwen2.5-7B shape, 4096 tokens, bf16 input "
            f"{results['throughput'][0]['input_bytes'] / 1e6:.0f} MB; median of "
            f"{results['repeats']})", "",
            "| op | mode | seconds | GB/s of bf16 input | copy time / op time |",
            "|---|---|---|---|---|"]
    for r in results["throughput"]:
        ratio = f"{r['ratio_to_copy']:.3f}" if "ratio_to_copy" in r else "1"
        out.append(f"| {r['op']} | {r['mode']} | {r['seconds']:.3f} | {r['gb_per_s']:.3f} | "
                   f"{ratio} |")
    b = results["bottleneck"]
    top = ", ".join(f"{layer} ({b['scores'][layer]:.2e})" for layer in b["ranking"][:5])
    out += ["", "### Bottleneck layers of the embedded model", "",
            f"metric: {b['metric']}; {b['num_prompts']} calibration prompts; "
            f"group size {b['group_size']}", "",
            f"top-5 layers (score): {top}; median layer score "
            f"{statistics.median(b['scores']):.2e}; all layers INT4 at once: "
            f"{b['all_layers_score']:.2e}"]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--zstd-tokens", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # record() runs before the model loads: its load average is the one at the start.
    results = dict(**provenance.record(), threads=args.threads, repeats=args.repeats)
    lm = load_model("embedded")
    # Reuses the per-model cache when it was computed for the same prompts and group size.
    bottleneck.protected_layers_for(lm)
    report = bottleneck.load_report(lm.model_id)
    results["bottleneck"] = dict(report.__dict__)
    protected = {name: (0,) for name in MODELS}  # presets: Paper B's one protected layer
    protected["embedded"] = report.top(1)
    results["sizes"] = sizes(protected)
    results["zstd"] = zstd_ratios(lm, real_kv(lm, args.zstd_tokens), report.top(1))
    results["throughput"] = throughput(args.repeats)
    text = markdown(results)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
