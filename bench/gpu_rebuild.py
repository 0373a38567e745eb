"""The cloud's rebuild from a KV payload, as requests per second under concurrency.

    PYTHONPATH=. python3 bench/gpu_rebuild.py --presets qwen2.5-7b --tokens 4096
    PYTHONPATH=. python3 bench/gpu_rebuild.py --device cpu --presets tiny --tokens 256   # smoke

A KV payload (the edge's encoded prompt KV, all tokens but the tail, as ``wire.encode_kv``
frames it) arrives as bytes; the cloud parses it (``wire.decode_kv``: header, checksum,
sections; on a GPU with ``pin_memory=True``, as ``CloudStage`` does, so the encoded KV
lands in pinned memory), decodes it onto the GPU (``codec.decode``: one host-to-device
copy of the encoded buffer, one kernel) and wraps it as a transformers cache
(``to_cache``, which copies each layer once more). Timed: decode + cache from a parsed
payload whose KV is in pinned memory (the issue's "decode + cache build"), and from one in
pageable memory (what ``wire.decode_kv`` gives without ``pin_memory``: the decoder stages
it through pinned memory on the calling thread), each for 1, 8 and 64 payloads in flight
(one thread each, on the default stream and on a stream per thread; a request is done
when its cache is complete on the GPU); the whole path from bytes once. Every run first
checks that the rebuilt cache holds the decoded KV of a float64-checked decode. The floor
of any rebuild from host memory is the encoded buffer's host-to-device copy, timed in the
same run (pageable and pinned): ``dma_floor_rps`` = pinned rate / payload size. Also the
edge's side for reference (``codec.encode`` + ``wire.encode_kv`` to bytes). Prints a
table last; writes gpu_rebuild.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import threading
import time

import torch
from gpu_codec import check_against_float64, host_ms, protected_for
from gpu_common import (
    median_ms,
    outlier_kv,
    print_table,
    provenance,
    sync,
    write_results,
)

from ray_scout.core.llm import models, wire
from ray_scout.core.llm.kvcodec import codec_for
from ray_scout.core.modes import Mode

CONCURRENCY = (1, 8, 64)
MODES = (Mode.INT8, Mode.INT4, Mode.MIXED_INT4)


def requests_per_s(work, payloads: int, requests: int, device: torch.device,
                   streams: bool = False) -> float:
    """``requests`` calls of ``work()`` from ``payloads`` threads (each on a stream of its
    own if ``streams``), per second of wall time until the last one's GPU work has
    completed."""
    local = threading.local()

    def call():
        if not streams or device.type != "cuda":
            return work()
        if not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(local.stream):
            return work()

    with concurrent.futures.ThreadPoolExecutor(max_workers=payloads) as pool:
        list(pool.map(lambda _: call(), range(payloads)))  # warm-up: pinned buffers, tables
        sync(device)
        begin = time.perf_counter()
        for future in [pool.submit(call) for _ in range(requests)]:
            future.result()
        sync(device)
        return requests / (time.perf_counter() - begin)


def bench_mode(preset: str, mode: Mode, tokens: int, device: torch.device,
               repeats: int) -> list[dict]:
    facts = models.facts_for(f"random:{preset}")
    codec = codec_for(mode, protected_layers=protected_for(mode, facts.num_layers))
    snapshot = outlier_kv(facts.num_layers, facts.num_kv_heads, tokens - 1, facts.head_dim,
                          device, seed=5)
    tail = (7,)
    pin = device.type == "cuda"

    def edge() -> bytes:
        return wire.encode_kv(codec.encode(snapshot), facts.model_id, tail_ids=tail)

    data = edge()
    parsed = wire.decode_kv(data, facts=facts)  # pageable
    pinned = wire.decode_kv(data, facts=facts, pin_memory=pin)
    if pin and not pinned.encoded.data.is_pinned():
        raise AssertionError("wire.decode_kv(pin_memory=True) gave pageable memory")

    def rebuild(encoded):
        restored = codec.decode(encoded, dtype=torch.bfloat16, device=device)
        return restored.to_cache()

    def from_bytes():
        return rebuild(wire.decode_kv(data, facts=facts, pin_memory=pin).encoded)

    def from_pinned():
        return rebuild(pinned.encoded)

    def from_pageable():
        return rebuild(parsed.encoded)

    # Correctness: the cache built from the bytes holds exactly what decode returns, and
    # that is within the quantization bound of the original KV.
    decoded = codec.decode(pinned.encoded, dtype=torch.bfloat16, device=device)
    check = check_against_float64(snapshot, codec.encode(snapshot), decoded)
    for build in (from_bytes, from_pageable):
        cache = build()
        for layer, (k, v) in enumerate(zip(decoded.keys, decoded.values)):
            if not (torch.equal(cache.layers[layer].keys[0], k)
                    and torch.equal(cache.layers[layer].values[0], v)):
                raise AssertionError(f"layer {layer}: the rebuilt cache differs from the decode")
        del cache
    del decoded
    restored = codec.decode(pinned.encoded, dtype=torch.bfloat16, device=device)
    # The floor of a rebuild from host memory: the encoded buffer's host-to-device copy.
    host, host_pinned = parsed.encoded.data, pinned.encoded.data
    copy_pageable_ms = median_ms(lambda: host.to(device, copy=True), device, repeats=repeats)
    copy_pinned_ms = median_ms(lambda: host_pinned.to(device, non_blocking=True, copy=True),
                               device, repeats=repeats)
    row = {"preset": preset, "mode": mode.value, "tokens": tokens - 1,
           "payload_mb": len(data) / 1e6, "kv_mb": host.numel() / 1e6, **check,
           "h2d_pageable_gbps": host.numel() / copy_pageable_ms / 1e6,
           "h2d_pinned_gbps": host.numel() / copy_pinned_ms / 1e6,
           "dma_floor_rps": 1e3 / copy_pinned_ms,
           "edge_ms": median_ms(edge, device, repeats=repeats),
           "parse_ms": median_ms(lambda: wire.decode_kv(data, facts=facts, pin_memory=pin),
                                 device, repeats=repeats),
           "decode_ms": median_ms(lambda: codec.decode(pinned.encoded, dtype=torch.bfloat16,
                                                       device=device), device, repeats=repeats),
           "from_pinned_ms": median_ms(from_pinned, device, repeats=repeats),
           "from_pageable_ms": median_ms(from_pageable, device, repeats=repeats),
           "from_bytes_ms": median_ms(from_bytes, device, repeats=repeats),
           # Host time of each step with the GPU idle at the start: a step whose host time
           # reaches the copy's waits for it somewhere inside.
           "decode_host_ms": host_ms(lambda: codec.decode(pinned.encoded, dtype=torch.bfloat16,
                                                          device=device), device, repeats),
           "from_pinned_host_ms": host_ms(from_pinned, device, repeats),
           "to_cache_host_ms": host_ms(restored.to_cache, device, repeats)}
    for payloads in CONCURRENCY:
        requests = max(2 * payloads, 32)
        for name, work in (("pinned", from_pinned), ("pageable", from_pageable)):
            row[f"{name}_rps_{payloads}"] = requests_per_s(work, payloads, requests, device)
            if payloads > 1:
                row[f"{name}_streams_rps_{payloads}"] = requests_per_s(
                    work, payloads, requests, device, streams=True)
        print(preset, mode.value, payloads, "in flight:",
              {key: round(value, 1) for key, value in row.items()
               if key.endswith(f"rps_{payloads}")}, flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [row]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["qwen2.5-7b"])
    parser.add_argument("--modes", nargs="+", default=[m.value for m in MODES])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(provenance(device)["device"], flush=True)
    rows = []
    for preset in args.presets:
        for mode in args.modes:
            rows += bench_mode(preset, Mode(mode), args.tokens, device, args.repeats)
    write_results("gpu_rebuild", {**provenance(device), "concurrency": list(CONCURRENCY),
                                  "rows": rows})
    columns = [("preset", "preset", "s"), ("mode", "mode", "s"),
               ("kv_mb", "KV MB", ".1f"), ("h2d_pageable_gbps", "H2D GB/s", ".1f"),
               ("h2d_pinned_gbps", "pinned GB/s", ".1f"), ("dma_floor_rps", "DMA floor rps", ".0f"),
               ("edge_ms", "edge ms", ".2f"), ("parse_ms", "parse ms", ".2f"),
               ("decode_ms", "decode ms", ".2f"), ("from_pinned_ms", "pinned→cache", ".2f"),
               ("from_pageable_ms", "pageable→cache", ".2f"),
               ("from_bytes_ms", "bytes→cache", ".2f"), ("decode_host_ms", "decode host", ".2f"),
               ("from_pinned_host_ms", "pinned→cache host", ".2f"),
               ("to_cache_host_ms", "to_cache host", ".2f")]
    for payloads in CONCURRENCY:
        columns += [(f"pinned_rps_{payloads}", f"rps {payloads} pinned", ".1f")]
        if payloads > 1:
            columns += [(f"pinned_streams_rps_{payloads}", f"rps {payloads} pinned streams",
                         ".1f")]
        columns += [(f"pageable_rps_{payloads}", f"rps {payloads} pageable", ".1f")]
    print_table(rows, columns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
