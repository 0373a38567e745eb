"""Hostile peers and inputs against the data plane: the figures of docs/RELIABILITY.md.

- port: a `Server` in this process holds 400 hostile connections (100 silent, 100 that sent
  one header declaring a 255 MiB body and nothing more, 200 that sent such a header and then
  trickle one body byte a second) while a well-behaved client sends 20 requests with a 1 s
  deadline; its peak resident growth (VmHWM) and the client's latencies;
- declared bodies: 10 connections that each send one header declaring 255 MiB (issue 17's
  measurement: 16 MB -> 2,567 MB on the code before the fix);
- decoders: the largest scout bitmap the cap allows, and zstd frames declaring 2**40 bytes;
- fuzz: >= 10,000 mutated inputs per decoder (the mutator of tests/test_fuzz.py).

Memory and counts only: every time is reported as a count against its bound (requests within
their deadline, inputs over 1 s), so the figures do not depend on the machine's load and the
script need not wait for the benchmark lock.

    PYTHONPATH=. python3 bench/hostile.py --json bench/results/hostile.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

from ray_scout import provenance
from ray_scout.transport.server import Server

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the scenarios are the tests' own, held longer
from resident import MIB, peak_rss_bytes, reset_peak  # noqa: E402
from test_transport_limits import big_header, echo, hold_hostile_connections  # noqa: E402


def port(hold_s: float) -> dict:
    with Server(echo, max_connections=512, max_connections_per_peer=450) as server:
        figures = hold_hostile_connections(server, hold_s)
    figures["good_within_deadline"] = figures.pop("good_latency_max_s") < figures["good_deadline_s"]
    return figures


def declared_bodies() -> dict:
    with Server(echo) as server:
        before = reset_peak()
        socks = [socket.create_connection(server.address, timeout=5) for _ in range(10)]
        for i, sock in enumerate(socks):
            sock.sendall(big_header(i + 1))
        time.sleep(1.0)
        grown = peak_rss_bytes() - before
        for sock in socks:
            sock.close()
    return {"connections": 10, "declared_mib_each": 255, "rss_growth_mib": grown / MIB}


def decoders() -> dict:
    import struct

    from ray_scout.core.llm import wire
    from ray_scout.core.llm.scout import (
        BITMAP, MAX_CONTEXT_TOKENS, ScoutFormatError, ScoutPayload, decode_indices, document_hash,
    )

    data = bytes([BITMAP]) + b"\x55" * (MAX_CONTEXT_TOKENS // 8)
    started = time.perf_counter()
    positions = decode_indices(data, MAX_CONTEXT_TOKENS)
    bitmap_within_1s = time.perf_counter() - started < 1.0
    bomb = bytes.fromhex("28b52ffd") + bytes([0xE0]) + struct.pack("<Q", 1 << 40) + b"\x01\x00\x00"
    before = reset_peak()
    try:
        ScoutPayload(document_hash("x"), "q", 0, (), (), bomb).document()
        refused = None
    except ScoutFormatError as exc:
        refused = str(exc)
    return {"bitmap_tokens": MAX_CONTEXT_TOKENS, "bitmap_bytes": len(data) - 1,
            "bitmap_positions": int(positions.numel()), "bitmap_decoded_within_1s": bitmap_within_1s,
            "zstd_2_40_refused": refused, "zstd_2_40_rss_growth_mib": (peak_rss_bytes() - before) / MIB,
            "wire_default_max_bytes": wire.DEFAULT_MAX_BYTES}


def fuzz_all(count: int) -> dict:
    import test_fuzz

    out = {}
    for name, (decode, seeds, errors, reseal) in sorted(test_fuzz.DECODERS.items()):
        out[name] = test_fuzz.fuzz(decode, seeds(), errors, count, seed=17, reseal=reseal)
    out["spec loader (values)"] = test_fuzz.fuzz_spec_tree(count, seed=17)
    for figures in out.values():  # fuzz() fails on any input over 1 s: none was
        figures["inputs_over_1s"] = 0
        del figures["slowest_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hold-s", type=float, default=30.0)
    parser.add_argument("--fuzz-inputs", type=int, default=10_000)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    # At the start: record()'s load average is the one before the runs.
    meta = {**provenance.record(),
            "command": "PYTHONPATH=. python3 bench/hostile.py "
                       f"--hold-s {args.hold_s:g} --fuzz-inputs {args.fuzz_inputs}"}
    results = {"meta": meta, "declared_bodies": declared_bodies(), "port": port(args.hold_s),
               "decoders": decoders(), "fuzz": fuzz_all(args.fuzz_inputs)}
    results["meta"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
