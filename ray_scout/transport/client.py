"""The sending side: a persistent connection that sends one request at a time under a deadline.

What lives here: `Connection` (connect, optionally from a network namespace and with a chosen
TCP congestion control; `request`), the `Response` and `Timeline` values, `TcpInfo`, and the
errors a caller handles: `DeadlineExceeded`, `ConnectionLost`, `RemoteError`.
What it knows: deadlines (every blocking socket call gets the time that is left), cancellation
(a CANCEL frame for a request given up on), and when the bytes left: `tx_end_unix_s` is when the
last byte was handed to the kernel (sendall returned); `tx_acked_unix_s` is when the kernel's
unacknowledged-byte count for the socket (ioctl SIOCOUTQ: bytes written but not yet acked by the
peer) reached zero, i.e. the receiver's TCP had every byte. SIOCOUTQ rather than TCP_INFO's
tcpi_unacked because the latter counts segments, not bytes. It is polled with a back-off from
50 us to 2 ms, so it carries that much jitter on long transfers; it is None where the response
started to arrive first.
What it leaves to others: the body (the core's wire format), retries and mode choice (the agent).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import math
import select
import socket
import struct
import sys
import termios
import time
from dataclasses import dataclass

from ray_scout.transport.framing import (
    DEFAULT_MAX_BODY_BYTES,
    ErrorCode,
    FrameError,
    MessageType,
    decode_error_body,
    deadline_ms_from_budget,
    read_frame,
    write_frame,
)
from ray_scout.transport.netns import socket_in_netns


class TransportError(Exception):
    """Base of what `Connection.request` raises."""


class ConnectionLost(TransportError, ConnectionError):
    """The server went away (closed, reset, refused); the next request reconnects."""


class DeadlineExceeded(TransportError, TimeoutError):
    """The request's deadline passed; `remote` is True when the server said so.

    Given up while the body was still being sent, `acked_bytes` of it had been acknowledged
    in `sending_s` seconds from its first byte (the sender was backlogged all along, so that
    is the path's rate over the interval: what a bandwidth estimator needs from a transfer
    that never finished); None where unknown.
    """

    def __init__(self, message: str, *, remote: bool = False, acked_bytes: int | None = None,
                 sending_s: float | None = None):
        super().__init__(message)
        self.remote = remote
        self.acked_bytes = acked_bytes
        self.sending_s = sending_s


class RemoteError(TransportError):
    """The server answered ERROR (handler failure, frame too large, shutdown)."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"server error {code.name}: {message}")
        self.code = code


class ProtocolError(TransportError):
    """The server sent bytes that are not a valid frame; the connection was dropped."""


@dataclass(frozen=True)
class TcpInfo:
    """A few fields of Linux struct tcp_info, in the project's units."""

    rtt_s: float
    min_rtt_s: float
    snd_cwnd_segments: int
    delivery_rate_bps: float  # bits per second, the kernel's latest delivery-rate sample
    total_retrans: int
    bytes_acked: int  # since the connection opened


_TCP_INFO_SIZE = 168  # through tcpi_delivery_rate


def tcp_info(sock: socket.socket) -> TcpInfo | None:
    """TCP_INFO for a connected socket, or None where the kernel gives too short a struct."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    if len(raw) < _TCP_INFO_SIZE:
        return None
    (rtt_us,) = struct.unpack_from("I", raw, 68)
    (cwnd,) = struct.unpack_from("I", raw, 80)
    (retrans,) = struct.unpack_from("I", raw, 100)
    (bytes_acked,) = struct.unpack_from("Q", raw, 120)
    (min_rtt_us,) = struct.unpack_from("I", raw, 148)
    (rate_bytes_per_s,) = struct.unpack_from("Q", raw, 160)
    return TcpInfo(rtt_us / 1e6, min_rtt_us / 1e6, cwnd, rate_bytes_per_s * 8.0, retrans,
                   bytes_acked)


@dataclass(frozen=True)
class Timeline:
    """When each phase of one request happened (unix seconds, this host's clock)."""

    connect_start_unix_s: float  # of the connection this request used
    connect_end_unix_s: float
    reused_connection: bool  # False when this request opened the connection
    tx_start_unix_s: float
    tx_end_unix_s: float  # last byte handed to the kernel
    tx_acked_unix_s: float | None  # kernel's unacked byte count reached 0 (see module doc)
    rx_first_byte_unix_s: float
    rx_end_unix_s: float

    @property
    def round_trip_s(self) -> float:
        return self.rx_end_unix_s - self.tx_start_unix_s


@dataclass(frozen=True)
class Response:
    body: bytes | bytearray
    request_id: int
    timeline: Timeline
    sent_bytes: int  # the request frame, header included
    received_bytes: int  # the response frame, header included
    tcp: TcpInfo | None  # sampled right after the response arrived


class _Deadline(Exception):
    pass


class _Receiver:
    """recv_into bounded by a deadline; remembers whether any byte of the frame was read."""

    def __init__(self, sock: socket.socket, deadline_unix_s: float):
        self.sock = sock
        self.deadline = deadline_unix_s
        self.consumed = 0

    def __call__(self, view: memoryview) -> int:
        left = self.deadline - time.time()
        if left <= 0:
            raise _Deadline
        self.sock.settimeout(left)
        try:
            n = self.sock.recv_into(view)
        except socket.timeout:
            raise _Deadline from None
        self.consumed += n
        return n


class Connection:
    """A persistent framed-TCP connection to a `Server`, one request at a time.

    `source_netns` creates the socket inside that network namespace (an agent's edge side);
    `source_address` binds it to that address first (agents that share a namespace each
    have their own, which their shaping classes match).
    `congestion_control` sets TCP_CONGESTION ("cubic", "bbr", "reno"); None keeps the
    kernel default. The algorithm in use is read back into `.congestion_control`.
    `body_checksum=False` sends request bodies without a CRC (framing.NO_BODY_CRC: saves
    about 1 ms per MB on each side; the header CRC stays). `token` is the experiment's
    token: sent in a HELLO right after each connect (a server with a token drops a connection
    that does not start with it).
    """

    def __init__(
        self,
        address: tuple[str, int],
        *,
        source_netns: str | None = None,
        source_address: str | None = None,
        connect_timeout_s: float = 5.0,
        congestion_control: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body_checksum: bool = True,
        abort_on_close: bool = False,
        token: bytes | None = None,
    ):
        self.token = token
        self.body_checksum = body_checksum
        self.abort_on_close = abort_on_close
        self.address = (address[0], int(address[1]))
        self.source_netns = source_netns
        self.source_address = source_address
        self.connect_timeout_s = connect_timeout_s
        self.requested_congestion_control = congestion_control
        self.max_body_bytes = max_body_bytes
        self.congestion_control: str | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.requests = 0
        self._ids = itertools.count(1)  # 0 is the server's "whole connection" id
        self._sock: socket.socket | None = None
        self._connect_start = self._connect_end = 0.0
        self._fresh = False
        self._connect(time.time() + connect_timeout_s)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _new_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        sock = socket_in_netns(self.source_netns, family) if self.source_netns is not None else socket.socket(family)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.source_address is not None:
            sock.bind((self.source_address, 0))
        if self.abort_on_close:
            # Close with RST, discarding unsent bytes: a payload cancelled at its deadline
            # must not keep draining through a shaped link ahead of the next request.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if self.requested_congestion_control is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, self.requested_congestion_control.encode())
            except OSError as exc:
                sock.close()
                raise ValueError(
                    f"TCP congestion control {self.requested_congestion_control!r} is not available ({exc}); "
                    "see /proc/sys/net/ipv4/tcp_available_congestion_control, or `modprobe tcp_<name>`"
                ) from None
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
        self.congestion_control = raw.split(b"\0", 1)[0].decode()
        return sock

    def _connect(self, deadline_unix_s: float) -> None:
        self._connect_start = time.time()
        sock = self._new_socket()
        timeout = min(self.connect_timeout_s, deadline_unix_s - self._connect_start)
        if timeout <= 0:
            sock.close()
            raise DeadlineExceeded(f"no time left to connect to {self.address}")
        sock.settimeout(timeout)
        try:
            sock.connect(self.address)
        except socket.timeout:
            sock.close()
            if time.time() >= deadline_unix_s:
                raise DeadlineExceeded(f"deadline passed while connecting to {self.address}") from None
            raise ConnectionLost(
                f"connecting to {self.address} timed out after {timeout:.2f} s: is the server up and the route right?"
            ) from None
        except OSError as exc:
            sock.close()
            raise ConnectionLost(f"cannot connect to {self.address}: {exc}; is the server running?") from None
        if self.token is not None:
            try:  # a few dozen bytes into a fresh socket's buffer: no wait for the peer
                self.bytes_sent += write_frame(sock.sendall, MessageType.HELLO, 0, self.token)
            except OSError as exc:
                sock.close()
                raise ConnectionLost(f"cannot greet {self.address}: {exc}") from None
        self._sock = sock
        self._connect_end = time.time()
        self._fresh = True

    def _lost(self, what: str, exc: BaseException | None = None) -> ConnectionLost:
        self.close()
        detail = f" ({exc})" if exc else ""
        return ConnectionLost(f"connection to {self.address} lost {what}{detail}; the next request reconnects")

    def request(self, body: bytes | bytearray | memoryview, *, deadline_s: float) -> Response:
        """Send `body`, wait for the answer; `deadline_s` is the budget in seconds from now."""
        if not math.isfinite(deadline_s) or deadline_s <= 0:
            raise ValueError(f"deadline_s must be a positive number of seconds, got {deadline_s!r}")
        deadline = time.time() + deadline_s
        if self._sock is None:
            self._connect(deadline)
        sock = self._sock
        reused = not self._fresh
        self._fresh = False
        request_id = next(self._ids)
        self.requests += 1
        left = deadline - time.time()
        if left <= 0:
            raise DeadlineExceeded(f"deadline of {deadline_s:.3f} s passed before request {request_id} was sent")
        tx_starts: list[float] = []
        before = tcp_info(sock)

        def sendall(data: bytes | bytearray | memoryview) -> None:
            # The body checksum is computed before the first call (about 1 ms per MB), so
            # the timeout is taken afresh here and tx_start is the first byte's hand-off.
            remaining = deadline - time.time()
            if remaining <= 0:
                raise socket.timeout
            if not tx_starts:
                tx_starts.append(time.time())
            sock.settimeout(remaining)
            sock.sendall(data)

        try:
            sent = write_frame(
                sendall, MessageType.REQUEST, request_id, body,
                deadline_ms=deadline_ms_from_budget(left), body_crc=self.body_checksum,
            )
        except socket.timeout:
            # Part of the frame is in flight: the stream cannot carry another frame.
            after = tcp_info(sock) if tx_starts else None
            self.close()
            acked = (after.bytes_acked - before.bytes_acked
                     if after is not None and before is not None else None)
            raise DeadlineExceeded(
                f"deadline of {deadline_s:.3f} s passed while sending request {request_id} "
                f"({len(body)} bytes, {acked if acked is not None else 'unknown'} acked); "
                "connection closed",
                acked_bytes=acked, sending_s=time.time() - tx_starts[0] if tx_starts else None,
            ) from None
        except OSError as exc:
            raise self._rejected_or_lost(request_id, deadline, exc) from None
        tx_start, tx_end = tx_starts[0], time.time()
        self.bytes_sent += sent
        tx_acked = self._wait_acked(sock, deadline)
        while True:
            receiver = _Receiver(sock, deadline)
            try:
                received = read_frame(receiver, max_body_bytes=self.max_body_bytes)
            except _Deadline:
                outcome = self._give_up(request_id, receiver.consumed)
                raise DeadlineExceeded(
                    f"no answer to request {request_id} within {deadline_s:.3f} s; {outcome}"
                ) from None
            except FrameError as exc:
                self.close()
                raise ProtocolError(f"bad frame from {self.address}: {exc}; connection dropped") from None
            except OSError as exc:
                raise self._lost(f"while waiting for the answer to request {request_id}", exc) from None
            if received is None:
                raise self._lost(f"while waiting for the answer to request {request_id} (server closed it)")
            self.bytes_received += received.size_bytes
            header = received.frame.header
            if header.request_id not in (request_id, 0):
                continue  # the late answer to a request given up on earlier
            if header.msg_type is MessageType.RESPONSE:
                timeline = Timeline(
                    self._connect_start, self._connect_end, reused, tx_start, tx_end, tx_acked,
                    received.first_byte_unix_s, received.last_byte_unix_s,
                )
                return Response(received.frame.body, request_id, timeline, sent, received.size_bytes, tcp_info(sock))
            if header.msg_type is MessageType.ERROR:
                raise self._remote_error(received.frame.body)
            self.close()
            raise ProtocolError(f"server sent a {header.msg_type.name} frame; connection dropped")

    def _remote_error(self, body: bytes | bytearray) -> TransportError:
        try:
            code, message = decode_error_body(bytes(body))
        except FrameError as exc:
            self.close()
            return ProtocolError(f"unreadable ERROR frame from {self.address}: {exc}")
        if code in (ErrorCode.TOO_LARGE, ErrorCode.BAD_FRAME, ErrorCode.SHUTDOWN, ErrorCode.BUSY,
                    ErrorCode.UNAUTHORIZED, ErrorCode.TIMEOUT):
            self.close()  # the server closes these connections
        if code is ErrorCode.DEADLINE:
            return DeadlineExceeded(message, remote=True)
        return RemoteError(code, message)

    def _rejected_or_lost(self, request_id: int, deadline: float, exc: OSError) -> TransportError:
        """A send failed: the server may have said why (TOO_LARGE) before closing."""
        sock = self._sock
        try:
            received = read_frame(_Receiver(sock, min(deadline, time.time() + 0.5)), max_body_bytes=1 << 16)
        except (_Deadline, FrameError, OSError):
            received = None
        if received is not None and received.frame.header.msg_type is MessageType.ERROR:
            return self._remote_error(received.frame.body)
        return self._lost(f"while sending request {request_id}", exc)

    def _give_up(self, request_id: int, consumed: int) -> str:
        """Tell the server to drop the request; returns what was done, for the error message."""
        if consumed:
            self.close()
            return "connection closed (an answer was half read, so the stream is out of step)"
        try:
            unacked = _unacked_bytes(self._sock)
        except OSError:
            unacked = None  # cannot say: the CANCEL goes, as before
        if unacked:
            # Part of the body still waits in the kernel: a CANCEL (and the next request)
            # would queue behind it, and a link whose rate fell since would carry it for
            # minutes. Closing with SO_LINGER 0 discards it, as a cancelled send does.
            self.close()
            return (f"connection closed ({unacked} bytes of the body were still unacknowledged; "
                    "a CANCEL would have queued behind them)")
        try:
            self._sock.settimeout(0.1)
            self.bytes_sent += write_frame(self._sock.sendall, MessageType.CANCEL, request_id)
        except OSError:
            self.close()
            return "connection closed (the CANCEL could not be sent)"
        return "sent CANCEL"

    @staticmethod
    def _wait_acked(sock: socket.socket, deadline: float) -> float | None:
        interval = 50e-6
        while True:
            unacked = _unacked_bytes(sock)
            if unacked is None:
                return None
            if unacked == 0:
                return time.time()
            left = deadline - time.time()
            if left <= 0:
                return None
            readable, _, _ = select.select([sock], [], [], min(interval, left))
            if readable:
                return None
            interval = min(interval * 2, 2e-3)


def _unacked_bytes(sock: socket.socket) -> int | None:
    """Bytes written to ``sock`` that its peer has not acknowledged (SIOCOUTQ); None where
    the socket cannot say."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL):
            return None
        raise
    return int.from_bytes(buf, sys.byteorder)
