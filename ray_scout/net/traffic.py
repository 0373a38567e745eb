"""A bulk TCP flow and a TCP ping-pong between two nodes of a topology, for measuring what the
links deliver.

A topology here is anything with ``socket(node)`` (a TCP socket in that node's namespace) and
``address(node)``: a ``LabTopology``, or a pair of namespaces a test built.

An iperf-like pair in threads: the receiver timestamps every ``recv`` on the monotonic clock,
so goodput over any window and per-bin rates (for rate-change timing) come from one record.
Socket calls release the GIL, so two threads reach a few hundred Mbit/s on one core; beyond
that the CPU, not the shaping, is the limit (the benchmark says where).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from ray_scout.net.errors import NetError

CHUNK_BYTES = 128 * 1024
# <asm-generic/socket.h>; Python 3.11's socket module lacks both names.
SO_TIMESTAMPNS = 35  # also the SCM type of its stamps
SO_RCVBUFFORCE = 33


class Nodes(Protocol):
    """What the flows need of a topology."""

    def socket(self, node: str, kind: int = socket.SOCK_STREAM) -> socket.socket: ...

    def address(self, node: str) -> str: ...


def tcp_round_trips_s(topology: Nodes, src: str, dst: str = "cloud", port: int = 5301,
                      count: int = 30) -> list[float]:
    """``count`` one-byte request/response exchanges on one TCP connection (Nagle off); seconds each.

    What an RPC sees: the path's round trip both ways, plus a retransmission timeout for any
    exchange whose packet was lost (take the median for the path's delay).
    """
    server = topology.socket(dst)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((topology.address(dst), port))
    server.listen(1)
    client = topology.socket(src)
    client.settimeout(10)
    rtts = []
    try:
        client.connect((topology.address(dst), port))
        conn, _ = server.accept()
        with conn:
            for sock in (client, conn):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(count):
                start = time.perf_counter()
                client.sendall(b"p")
                conn.recv(1)
                conn.sendall(b"q")
                client.recv(1)
                rtts.append(time.perf_counter() - start)
    finally:
        client.close()
        server.close()
    return rtts


def udp_one_way_delays_s(topology: Nodes, src: str, dst: str = "cloud", port: int = 5310,
                         count: int = 100, gap_s: float = 0.005) -> list[float]:
    """One-way delays of ``count`` datagrams ``src`` -> ``dst``: the receiving kernel's arrival
    stamp (SO_TIMESTAMPNS) less the sender's clock just before ``sendto``, both CLOCK_REALTIME
    of one kernel (namespaces share it). What a qdisc adds, without the receiving process's
    wake-up; datagrams that never arrive are left out.
    """
    receiver = topology.socket(dst, socket.SOCK_DGRAM)
    sender = topology.socket(src, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    receiver.bind((topology.address(dst), port))
    receiver.settimeout(2.0)
    delays: list[float] = []
    done = threading.Event()

    def receive() -> None:
        while not done.is_set() or len(delays) < count:
            try:
                data, ancillary, _, _ = receiver.recvmsg(64, 64)
            except TimeoutError:
                return
            for level, kind, stamp in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS):
                    seconds, nanoseconds = struct.unpack("qq", stamp[:16])
                    delays.append((seconds * 10**9 + nanoseconds - int.from_bytes(data[:8], "big")) / 1e9)

    thread = threading.Thread(target=receive)
    thread.start()
    try:
        for _ in range(count):
            sender.sendto(time.time_ns().to_bytes(8, "big"), (topology.address(dst), port))
            time.sleep(gap_s)
        done.set()
        thread.join()
    finally:
        sender.close()
        receiver.close()
    return delays


def udp_received(topology: Nodes, src: str, dst: str = "cloud", port: int = 5400, count: int = 10_000,
                 gap_s: float = 0.0, burst: int = 1) -> list[int]:
    """Send ``count`` numbered datagrams ``src`` -> ``dst`` (``burst`` of them, then ``gap_s``);
    return the numbers that arrived, in arrival order (loss, duplicates and reordering show).

    The receiver's buffer is forced past ``rmem_max`` (root), so a slow receiving thread loses
    nothing at its socket: what is missing was lost on the path.
    """
    receiver = topology.socket(dst, socket.SOCK_DGRAM)
    sender = topology.socket(src, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    receiver.bind((topology.address(dst), port))
    receiver.settimeout(1.0)
    got: list[int] = []

    def receive() -> None:
        while True:
            try:
                got.append(int.from_bytes(receiver.recv(64)[:4], "big"))
            except TimeoutError:
                return

    thread = threading.Thread(target=receive)
    thread.start()
    try:
        for n in range(count):
            sender.sendto(n.to_bytes(4, "big") + b"\0" * 60, (topology.address(dst), port))
            if gap_s and n % burst == burst - 1:
                time.sleep(gap_s)
    finally:
        thread.join()
        sender.close()
        receiver.close()
    return got


@dataclass
class BulkFlow:
    """Send as fast as TCP allows from ``src`` to ``dst`` (node names of the topology)."""

    topology: Nodes
    src: str
    dst: str = "cloud"
    port: int = 5201
    samples: list[tuple[float, int]] = field(default_factory=list)

    def __enter__(self) -> BulkFlow:
        address = self.topology.address(self.dst)
        self._stop = threading.Event()
        server = self.topology.socket(self.dst)
        server.setsockopt(1, 2, 1)  # SOL_SOCKET, SO_REUSEADDR: reruns on the same port
        server.bind((address, self.port))
        server.listen(1)
        self._client = self.topology.socket(self.src)
        self._client.settimeout(5)
        self._client.connect((address, self.port))
        self._conn, _ = server.accept()
        server.close()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def _send(self) -> None:
        payload = b"\0" * CHUNK_BYTES
        try:
            while not self._stop.is_set():
                self._client.sendall(payload)
        except OSError:
            if not self._stop.is_set():
                raise

    def _receive(self) -> None:
        self._conn.settimeout(1)
        buffer = bytearray(CHUNK_BYTES)
        while not self._stop.is_set():
            try:
                n = self._conn.recv_into(buffer)
            except TimeoutError:
                continue
            if n == 0:
                return
            self.samples.append((time.monotonic(), n))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._client.close()
        for thread in self._threads:
            thread.join(5)
        self._conn.close()

    def goodput_bps(self, t_from: float, t_to: float) -> float:
        """Application goodput (bit/s) in [t_from, t_to] on the monotonic clock.

        Measured between the first and last ``recv`` inside the window, counting the bytes
        that arrived after the first: each sample's bytes arrived since the previous sample, so
        window edges cut no chunk in half (a 128 KB chunk is 4% of 4 s at 5 Mbit/s).
        """
        inside = [(t, n) for t, n in self.samples if t_from <= t <= t_to]
        if len(inside) < 2:
            raise NetError("fewer than two receives in the goodput window; measure longer")
        (t_first, _), (t_last, _) = inside[0], inside[-1]
        return sum(n for _, n in inside[1:]) * 8 / (t_last - t_first)
