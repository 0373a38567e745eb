"""The receiving side: a threaded TCP server that turns framed requests into handler calls.

What lives here: `Server` (accept loop, one reader thread per connection, a worker pool for
the handler) and `Request`, the value a handler receives.
What it knows: frames, deadlines anchored at the first byte of a request, cancellation, and a
memory bound per connection: at most one request body is held per connection at a time (the
reader waits for the previous answer before it reads the next body, so TCP pushes back on a
sender that pipelines) and no body over `max_body_bytes` is ever allocated.
What it leaves to others: what the body means (the handler; the CloudActor decodes the core's
wire format) and which namespace the listening socket lives in (`netns`).

Threads rather than selectors: a connection's reader blocks in recv_into, which keeps the
code a straight line, and 32-256 agents cost as many mostly idle threads; the handler runs on
a pool so slow handlers never stop a reader from seeing a CANCEL.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from ray_scout.transport.framing import (
    DEFAULT_MAX_BODY_BYTES,
    ErrorCode,
    FrameError,
    FrameTooLarge,
    Header,
    MessageType,
    encode_error_body,
    read_frame,
    write_frame,
)
from ray_scout.transport.netns import socket_in_netns


@dataclass(frozen=True)
class Request:
    """One received request, as the handler sees it (times are unix seconds)."""

    body: bytes | bytearray
    request_id: int
    # first_byte_unix_s + the frame's budget; None when the client sent no deadline.
    deadline_unix_s: float | None
    peer: tuple[str, int]
    first_byte_unix_s: float
    last_byte_unix_s: float
    size_bytes: int  # whole frame, header included


Handler = Callable[[Request], bytes]


@dataclass(frozen=True)
class ServerStats:
    connections: int
    requests: int
    responses: int
    deadline_errors: int
    handler_errors: int
    cancelled: int
    frame_errors: int
    bytes_received: int
    bytes_sent: int


class _Closing(Exception):
    """The server is shutting down; a reader abandons its frame."""


@dataclass
class _Pending:
    request: Request
    started: bool = False
    cancelled: bool = False


class _Connection:
    def __init__(self, sock: socket.socket, peer: tuple[str, int]):
        self.sock = sock
        self.peer = peer
        self.send_lock = threading.Lock()
        self.state_lock = threading.Lock()
        # One request body per connection: the reader takes it before reading a body,
        # the worker gives it back once the answer is written (or the request is dropped).
        self.body_slot = threading.Semaphore(1)
        self.pending: dict[int, _Pending] = {}


class Server:
    """Serve `handler(request) -> bytes` over framed TCP.

    `port=0` lets the OS pick; the bound address is `.address`. `netns` names a network
    namespace for the listening socket (the cloud side of an emulated topology).
    `send_stall_timeout_s` bounds how long a reply may make no progress (a client that
    stopped reading) before its connection is dropped.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        netns: str | None = None,
        workers: int = 4,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        backlog: int = 128,
        send_stall_timeout_s: float = 60.0,
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be >= 0, got {max_body_bytes}")
        self._handler = handler
        self._max_body_bytes = max_body_bytes
        self._send_stall_timeout_s = send_stall_timeout_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket_in_netns(netns, family) if netns is not None else socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(backlog)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.address: tuple[str, int] = listener.getsockname()[:2]
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="transport-handler")
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._readers: set[threading.Thread] = set()
        self._counts = dict.fromkeys(ServerStats.__dataclass_fields__, 0)
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="transport-accept", daemon=True)
        self._accept_thread.start()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def stats(self) -> ServerStats:
        with self._lock:
            return ServerStats(**self._counts)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop accepting, drop every connection, and return within about `timeout_s`.

        Handlers already running are not interrupted (Python cannot); their replies fail
        quietly on the closed sockets and the pool threads end when they return.
        """
        if self._closing.is_set():
            return
        self._closing.set()
        self._wake_w.send(b"x")
        self._accept_thread.join(timeout_s)
        with self._lock:
            connections = list(self._connections)
            readers = list(self._readers)
        for conn in connections:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)
        end = time.monotonic() + timeout_s
        for reader in readers:
            reader.join(max(0.0, end - time.monotonic()))
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closing.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r or self._closing.is_set():
                        return
                    try:
                        sock, peer = self._listener.accept()
                    except OSError:
                        continue
                    self._start_reader(sock, peer)

    def _start_reader(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # SO_SNDTIMEO bounds a send that makes no progress without putting a timeout on the
        # reader's recv (a Python-level settimeout would apply to both).
        sec = int(self._send_stall_timeout_s)
        usec = int((self._send_stall_timeout_s - sec) * 1e6)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(sec, usec))
        conn = _Connection(sock, peer[:2])
        reader = threading.Thread(target=self._read_loop, args=(conn,), name=f"transport-conn-{peer}", daemon=True)
        with self._lock:
            self._connections.add(conn)
            self._readers.add(reader)
            self._counts["connections"] += 1
        reader.start()

    def _gate(self, conn: _Connection, header: Header) -> None:
        if header.msg_type is not MessageType.REQUEST:
            return
        while not conn.body_slot.acquire(timeout=0.1):
            if self._closing.is_set():
                raise _Closing

    def _read_loop(self, conn: _Connection) -> None:
        try:
            while not self._closing.is_set():
                try:
                    received = read_frame(
                        conn.sock.recv_into,
                        max_body_bytes=self._max_body_bytes,
                        on_header=lambda h: self._gate(conn, h),
                    )
                except FrameTooLarge as exc:
                    self._count("frame_errors")
                    self._reply_error(conn, exc.header.request_id, ErrorCode.TOO_LARGE, str(exc))
                    return
                except FrameError as exc:
                    self._count("frame_errors")
                    self._reply_error(conn, 0, ErrorCode.BAD_FRAME, str(exc))
                    return
                except (OSError, _Closing):
                    return
                if received is None:
                    return
                self._count("bytes_received", received.size_bytes)
                header = received.frame.header
                if header.msg_type is MessageType.CANCEL:
                    self._cancel(conn, header.request_id)
                    continue
                if header.msg_type is not MessageType.REQUEST:
                    self._count("frame_errors")
                    self._reply_error(
                        conn, header.request_id, ErrorCode.BAD_FRAME,
                        f"a server accepts REQUEST and CANCEL frames, got {header.msg_type.name}",
                    )
                    return
                self._count("requests")
                deadline = (
                    received.first_byte_unix_s + header.deadline_ms / 1000 if header.deadline_ms else None
                )
                request = Request(
                    body=received.frame.body,
                    request_id=header.request_id,
                    deadline_unix_s=deadline,
                    peer=conn.peer,
                    first_byte_unix_s=received.first_byte_unix_s,
                    last_byte_unix_s=received.last_byte_unix_s,
                    size_bytes=received.size_bytes,
                )
                pending = _Pending(request)
                with conn.state_lock:
                    conn.pending[header.request_id] = pending
                try:
                    self._pool.submit(self._serve, conn, pending)
                except RuntimeError:
                    return  # the pool is shut down: we are closing
        finally:
            self._drop(conn)

    def _cancel(self, conn: _Connection, request_id: int) -> None:
        with conn.state_lock:
            pending = conn.pending.get(request_id)
            if pending is not None and not pending.started:
                pending.cancelled = True

    def _serve(self, conn: _Connection, pending: _Pending) -> None:
        request = pending.request
        try:
            with conn.state_lock:
                if pending.cancelled:
                    self._count("cancelled")
                    return
                pending.started = True
            if request.deadline_unix_s is not None and time.time() > request.deadline_unix_s:
                self._count("deadline_errors")
                late_ms = (time.time() - request.deadline_unix_s) * 1000
                self._reply_error(
                    conn, request.request_id, ErrorCode.DEADLINE,
                    f"request {request.request_id} reached the server's worker {late_ms:.1f} ms past its deadline; "
                    "the handler was not run",
                )
                return
            try:
                body = self._handler(request)
                if not isinstance(body, (bytes, bytearray, memoryview)):
                    raise TypeError(f"handler returned {type(body).__name__}, expected bytes")
            except Exception as exc:  # the handler's failure goes back to the client, not to a log
                self._count("handler_errors")
                self._reply_error(conn, request.request_id, ErrorCode.HANDLER, f"{type(exc).__name__}: {exc}")
                return
            self._send(conn, MessageType.RESPONSE, request.request_id, body)
            self._count("responses")
        finally:
            with conn.state_lock:
                conn.pending.pop(request.request_id, None)
            conn.body_slot.release()

    def _send(self, conn: _Connection, msg_type: MessageType, request_id: int, body: bytes) -> None:
        try:
            with conn.send_lock:
                sent = write_frame(conn.sock.sendall, msg_type, request_id, body)
        except OSError:
            # The client went away or stopped reading; its reader sees the same and cleans up.
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._count("bytes_sent", sent)

    def _reply_error(self, conn: _Connection, request_id: int, code: ErrorCode, message: str) -> None:
        self._send(conn, MessageType.ERROR, request_id, encode_error_body(code, message))

    def _drop(self, conn: _Connection) -> None:
        try:
            # Half-close first so an ERROR just written reaches the client before any RST.
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.sock.close()
        with self._lock:
            self._connections.discard(conn)
            self._readers.discard(threading.current_thread())


def _timeval(sec: int, usec: int) -> bytes:
    return struct.pack("ll", sec, usec)
