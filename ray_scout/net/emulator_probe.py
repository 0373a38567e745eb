"""Traffic probes for the emulator: a UDP echo and RTT client, a bulk TCP sender and sink.

Each probe runs as its own process inside a namespace (``spawn``), so its timing never
shares a GIL with the emulator's pump thread, and prints one JSON object on stdout. Only
timestamps and counts are measured here; judging them against a configuration is the
caller's job (the tests and ``bench/emulator_fidelity.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time

from ray_scout.net.namespaces import enter_netns

_HEADER = struct.Struct("!Qd")  # sequence number, send time (monotonic seconds)
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def spawn(netns: str, *args: str, realtime_priority: int | None = None) -> subprocess.Popen:
    """Start ``python -m ray_scout.net.emulator_probe --netns NETNS ARGS...``."""
    rt = [] if realtime_priority is None else ["--realtime-priority", str(realtime_priority)]
    env = dict(os.environ, PYTHONPATH=_REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "ray_scout.net.emulator_probe", "--netns", netns, *rt, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def finish(proc: subprocess.Popen, timeout_s: float) -> dict:
    """Wait for a probe and return its JSON result; raise with its stderr if it failed."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"probe {proc.args[4:]} ran past {timeout_s} s: {err.strip()}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"probe {proc.args[4:]} failed ({proc.returncode}): {err.strip()}")
    return json.loads(out)


def udp_round_trips(
    client_netns: str, server_netns: str, dst: str, port: int, *, count: int, interval_s: float,
    size_bytes: int = 64, wait_s: float = 0.5, realtime_priority: int | None = None,
) -> dict:
    """Run an echo in ``server_netns`` and the RTT client in ``client_netns``; the client's result."""
    duration_s = count * interval_s + wait_s + 2.0
    echo = spawn(server_netns, "udp-echo", "--port", str(port), "--duration-s", str(duration_s),
                 realtime_priority=realtime_priority)
    try:
        time.sleep(0.3)  # the echo binds in its own process
        client = spawn(
            client_netns, "udp-rtt", "--dst", dst, "--port", str(port), "--count", str(count),
            "--interval-s", str(interval_s), "--size-bytes", str(size_bytes), "--wait-s", str(wait_s),
            realtime_priority=realtime_priority,
        )
        return finish(client, duration_s + 10)
    finally:
        finish(echo, duration_s + 10)


def tcp_transfer(
    sender_netns: str, receiver_netns: str, dst: str, port: int, *,
    duration_s: float, congestion: str,
) -> tuple[dict, dict]:
    """One bulk TCP flow for ``duration_s``; the sender's and the sink's results."""
    sink = spawn(receiver_netns, "tcp-sink", "--port", str(port),
                 "--duration-s", str(duration_s + 10))
    try:
        bulk = spawn(sender_netns, "tcp-bulk", "--dst", dst, "--port", str(port),
                     "--duration-s", str(duration_s), "--congestion", congestion)
        sent = finish(bulk, duration_s + 20)
    finally:
        received = finish(sink, duration_s + 20)
    return sent, received


def udp_echo(port: int, duration_s: float) -> dict:
    """Echo every datagram back to its sender for ``duration_s``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("0.0.0.0", port))
    deadline = time.monotonic() + duration_s
    echoed = 0
    while (left := deadline - time.monotonic()) > 0:
        if select.select([sock], [], [], left)[0]:
            data, peer = sock.recvfrom(65535)
            sock.sendto(data, peer)
            echoed += 1
    return {"echoed": echoed}


def udp_rtt(
    dst: str, port: int, count: int, interval_s: float, size_bytes: int, wait_s: float
) -> dict:
    """Send ``count`` datagrams every ``interval_s``; return per-sequence round-trip times.

    One thread: sending on schedule and receiving between sends, so the timestamps never wait
    on a GIL hand-over.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect((dst, port))
    pad = b"\0" * max(0, size_bytes - _HEADER.size)
    rtts: dict[int, float] = {}
    start = time.monotonic()
    sent = 0
    end = start + count * interval_s + wait_s
    while True:
        now = time.monotonic()
        if sent < count and now >= start + sent * interval_s:
            sock.send(_HEADER.pack(sent, now) + pad)
            sent += 1
            continue
        if sent >= count and (now >= end or len(rtts) == count):
            break
        next_send = start + sent * interval_s if sent < count else end
        if select.select([sock], [], [], max(0.0, next_send - now))[0]:
            data = sock.recv(65535)
            seq, sent_at = _HEADER.unpack_from(data)
            rtts[seq] = time.monotonic() - sent_at
    return {"sent": sent, "received": len(rtts), "rtts_s": [rtts[k] for k in sorted(rtts)]}


def tcp_sink(port: int, duration_s: float) -> dict:
    """Accept one connection and count bytes; goodput is measured here, at the receiver."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen(1)
    server.settimeout(duration_s)
    conn, _ = server.accept()
    conn.settimeout(duration_s)
    total = 0
    first = last = time.monotonic()
    while data := conn.recv(1 << 20):
        last = time.monotonic()
        if total == 0:
            first = last
        total += len(data)
    return {"bytes": total, "first_s": first, "last_s": last}


def tcp_bulk(dst: str, port: int, duration_s: float, congestion: str) -> dict:
    """Send as fast as the socket allows for ``duration_s`` with congestion control pinned."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
    for attempt in range(50):  # the sink may still be binding in its own process
        try:
            sock.connect((dst, port))
            break
        except ConnectionRefusedError:
            time.sleep(0.05)
    else:
        raise ConnectionRefusedError(f"no TCP sink at {dst}:{port}")
    used = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()
    chunk = b"\0" * (256 << 10)
    deadline = time.monotonic() + duration_s
    sent = 0
    while time.monotonic() < deadline:
        sent += sock.send(chunk)
    sock.close()
    return {"bytes_sent": sent, "congestion": used}


# Each probe's command-line arguments, named as its function's parameters.
PROBES = {
    "udp-echo": (udp_echo, {"port": int, "duration_s": float}),
    "udp-rtt": (
        udp_rtt,
        {"dst": str, "port": int, "count": int, "interval_s": float,
         "size_bytes": int, "wait_s": float},
    ),
    "tcp-sink": (tcp_sink, {"port": int, "duration_s": float}),
    "tcp-bulk": (tcp_bulk, {"dst": str, "port": int, "duration_s": float, "congestion": str}),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--netns", required=True)
    parser.add_argument(
        "--realtime-priority", type=int,
        help="run under SCHED_FIFO at this priority (UDP probes only: they block between packets)",
    )
    sub = parser.add_subparsers(dest="probe", required=True)
    for name, (_, params) in PROBES.items():
        probe_parser = sub.add_parser(name)
        for param, kind in params.items():
            probe_parser.add_argument("--" + param.replace("_", "-"), type=kind, required=True)
    args = parser.parse_args(argv)
    enter_netns(args.netns)
    if args.realtime_priority is not None:
        if args.probe.startswith("tcp"):
            parser.error("--realtime-priority would let a bulk TCP probe starve the host")
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.realtime_priority))
    fn, params = PROBES[args.probe]
    json.dump(fn(**{param: getattr(args, param) for param in params}), sys.stdout)


if __name__ == "__main__":
    main()
