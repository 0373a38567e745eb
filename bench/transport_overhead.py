"""Per-request overhead of the transport on loopback, against a bare TCP baseline.

Both sides run in separate processes (the server in a child, like a CloudActor), so the GIL of
one does not slow the other. For each body size the client sends a request and waits for a
2-byte answer, N times on one persistent connection:

- transport: `Connection.request` to a `Server` (framing, checksums, deadline, worker pool,
  SIOCOUTQ drain, TCP_INFO sample);
- no CRC: the same with `body_checksum=False` (framing.NO_BODY_CRC);
- baseline: the same bytes behind an 8-byte length prefix, a thread per connection that reads
  the body and answers, no checksums: what bare sockets cost.

Overhead = transport - baseline (median and p99 over the requests). Loopback bytes move at
memory speed, so the baseline is close to "bytes on the wire" and the difference is the
transport's own cost.

    python3 bench/transport_overhead.py [--small-requests 2000] [--json bench/results/transport_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import struct
import sys
import threading
import time

from ray_scout import provenance
from ray_scout.transport.client import Connection
from ray_scout.transport.server import Server

SMALL_SIZES = [0, 1024, 64 * 1024]
LARGE_SIZES = [1_000_000, 10_000_000, 100_000_000]
LARGE_REPEATS = {1_000_000: 50, 10_000_000: 10, 100_000_000: 4}
LENGTH = struct.Struct(">Q")


def _ack(request) -> bytes:
    return b"ok"


def _run_transport_server(port_queue: mp.Queue, stop: mp.Event) -> None:
    with Server(_ack, max_body_bytes=200_000_000) as server:
        port_queue.put(server.address[1])
        stop.wait()


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _serve_baseline(sock: socket.socket) -> None:
    head = bytearray(LENGTH.size)
    with sock:
        while _recv_exact(sock, memoryview(head)):
            (length,) = LENGTH.unpack(head)
            if not _recv_exact(sock, memoryview(bytearray(length))):
                return
            sock.sendall(b"ok")


def _run_baseline_server(port_queue: mp.Queue, stop: mp.Event) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port_queue.put(listener.getsockname()[1])
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            sock, _ = listener.accept()
        except socket.timeout:
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve_baseline, args=(sock,), daemon=True).start()


class BaselineClient:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.answer = bytearray(2)

    def request(self, body: bytes) -> None:
        if len(body) <= 65536:
            self.sock.sendall(LENGTH.pack(len(body)) + body)
        else:
            self.sock.sendall(LENGTH.pack(len(body)))
            self.sock.sendall(body)
        if not _recv_exact(self.sock, memoryview(self.answer)):
            raise ConnectionError("baseline server went away")


def _time(fn, body: bytes, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn(body)
        samples.append(time.perf_counter() - start)
    return samples


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _child(target) -> tuple[mp.Process, mp.Event, int]:
    ctx = mp.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=target, args=(ports, stop), daemon=True)
    proc.start()
    return proc, stop, ports.get(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-requests", type=int, default=2000)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    t_proc, t_stop, t_port = _child(_run_transport_server)
    b_proc, b_stop, b_port = _child(_run_baseline_server)
    conn = Connection(("127.0.0.1", t_port))
    conn_nocrc = Connection(("127.0.0.1", t_port), body_checksum=False)
    base = BaselineClient(b_port)
    variants = {
        "transport": lambda body: conn.request(body, deadline_s=60),
        "nocrc": lambda body: conn_nocrc.request(body, deadline_s=60),
        "baseline": base.request,
    }

    rows = []
    for size in SMALL_SIZES + LARGE_SIZES:
        body = b"\xa5" * size
        n = args.small_requests if size in SMALL_SIZES else LARGE_REPEATS[size]
        for fn in variants.values():
            _time(fn, body, max(2, n // 20))  # warm-up: slow start, page faults
        # Interleave the variants in blocks so drift on a shared machine hits all alike.
        samples: dict[str, list[float]] = {name: [] for name in variants}
        block = max(1, n // 10)
        for _ in range(0, n, block):
            for name, fn in variants.items():
                samples[name] += _time(fn, body, block)
        row = {"size_bytes": size, "requests": len(samples["transport"])}
        for name, got in samples.items():
            row[f"{name}_median_ms"] = statistics.median(got) * 1e3
            row[f"{name}_p99_ms"] = _pct(got, 0.99) * 1e3
            row[f"{name}_throughput_gbps"] = size * 8 / statistics.median(got) / 1e9
        row["overhead_median_ms"] = row["transport_median_ms"] - row["baseline_median_ms"]
        row["overhead_nocrc_median_ms"] = row["nocrc_median_ms"] - row["baseline_median_ms"]
        rows.append(row)

    conn.close()
    conn_nocrc.close()
    for stop, proc in ((t_stop, t_proc), (b_stop, b_proc)):
        stop.set()
        proc.join(5)

    meta = {**provenance.record(), "congestion_control": conn.congestion_control,
            "command": "python3 bench/transport_overhead.py " + " ".join(sys.argv[1:])}
    print(json.dumps(meta))
    print("| body | requests | transport median / p99 (ms) | no body CRC median / p99 (ms) "
          "| bare TCP median / p99 (ms) | overhead median (ms): transport / no CRC "
          "| throughput (Gbit/s): transport / no CRC / bare |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size_bytes']:,} B | {r['requests']} "
            f"| {r['transport_median_ms']:.3f} / {r['transport_p99_ms']:.3f} "
            f"| {r['nocrc_median_ms']:.3f} / {r['nocrc_p99_ms']:.3f} "
            f"| {r['baseline_median_ms']:.3f} / {r['baseline_p99_ms']:.3f} "
            f"| {r['overhead_median_ms']:.3f} / {r['overhead_nocrc_median_ms']:.3f} "
            f"| {r['transport_throughput_gbps']:.2f} / {r['nocrc_throughput_gbps']:.2f} "
            f"/ {r['baseline_throughput_gbps']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
