"""The receiving side: a threaded TCP server that turns framed requests into handler calls.

What lives here: `Server` (accept loop, one reader thread per connection, a worker pool for
the handler) and `Request`, the value a handler receives.
What it knows: frames, deadlines anchored at the first byte of a request, cancellation, the
experiment's token, and bounds on what a peer can make it hold:
- memory per connection: at most one request body is held per connection at a time (the
  reader waits for the previous answer before it reads the next body, so TCP pushes back on a
  sender that pipelines), and a body buffer grows with the bytes that arrived (framing), never
  past `max_body_bytes`;
- connections: at most `max_connections` in total and `max_connections_per_peer` from one IP
  address; one over either cap gets a BUSY error and is closed at once;
- time: a connection that starts no frame for `idle_timeout_s` is closed; a frame must be
  whole within `frame_timeout_s` of its first byte (a REQUEST with a deadline: within its
  budget plus `late_grace_s`, since nobody waits for its answer after that); with a `token`,
  a HELLO carrying it must be whole within `hello_timeout_s` of the accept.
So what hostile peers can hold is about max_connections x (one thread + the bytes they sent),
and only for as long as the timeouts allow (docs/RELIABILITY.md).
What it leaves to others: what the body means (the handler; the CloudActor decodes the core's
wire format) and which namespace the listening socket lives in (`netns`).

Threads rather than selectors: a connection's reader blocks in recv_into, which keeps the
code a straight line, and 32-256 agents cost as many mostly idle threads; the handler runs on
a pool so slow handlers never stop a reader from seeing a CANCEL.
"""

from __future__ import annotations

import hmac
import math
import select
import selectors
import socket
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from ray_scout.transport.framing import (
    DEFAULT_MAX_BODY_BYTES,
    MAX_HELLO_BYTES,
    ErrorCode,
    FrameError,
    FrameTooLarge,
    Header,
    MessageType,
    encode_error_body,
    encode_frame,
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


# A handler answers with bytes, or with a Future of bytes that another thread completes
# (the cloud's compute threads): the answer is then sent from the thread that completes it.
Handler = Callable[[Request], "bytes | Future[bytes]"]


@dataclass(frozen=True)
class ServerStats:
    connections: int
    requests: int
    responses: int  # counted before the write, so a client holding its answer sees it counted
    deadline_errors: int
    handler_errors: int
    cancelled: int
    frame_errors: int
    bytes_received: int
    bytes_sent: int
    refused: int  # over a connection cap
    unauthorized: int  # no HELLO with the token first
    timeouts: int  # idle, or a frame or HELLO too slow


class _Closing(Exception):
    """The server is shutting down; a reader abandons its frame."""


class _Unauthorized(Exception):
    """The first frame was not a HELLO with the server's token."""


class _TooSlow(Exception):
    """The peer let a time limit pass (idle, a frame, the HELLO); the message says which."""


class _Receiver:
    """recv_into that waits at most until `until_monotonic`, without a socket timeout.

    A socket timeout would also bound the workers' sends on the same socket; poll does not.
    `start_frame` arms the idle limit for the next frame's first byte; that first byte
    switches to the frame limit (unless `fixed`, the HELLO's limit from the accept, is set).
    """

    def __init__(self, sock: socket.socket, frame_timeout_s: float):
        self.sock = sock
        self.frame_timeout_s = frame_timeout_s
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.until_monotonic = 0.0
        self.started = False
        self.fixed = False
        self.what = ""

    def start_frame(self, limit_s: float, what: str, *, fixed: bool = False) -> None:
        self.until_monotonic = time.monotonic() + limit_s
        self.started = False
        self.fixed = fixed
        self.what = what

    def limit(self, limit_s: float, what: str) -> None:
        self.until_monotonic = time.monotonic() + limit_s
        self.what = what

    def __call__(self, view: memoryview) -> int:
        left_s = self.until_monotonic - time.monotonic()
        if left_s <= 0 or not self.poller.poll(max(1, math.ceil(left_s * 1000))):
            raise _TooSlow(self.what)
        n = self.sock.recv_into(view)
        if n and not self.started:
            self.started = True
            if not self.fixed:
                self.limit(self.frame_timeout_s,
                           f"a frame was not whole {self.frame_timeout_s:g} s after its first byte")
        return n


@dataclass
class _Pending:
    request: Request
    started: bool = False
    cancelled: bool = False


class _Connection:
    def __init__(self, sock: socket.socket, peer: tuple[str, int], authorized: bool):
        self.sock = sock
        self.peer = peer
        self.authorized = authorized
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
    stopped reading) before its connection is dropped. `token` (bytes, at most 64) makes every
    connection present it in a HELLO first. The caps and timeouts are in the module doc.
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
        max_connections: int = 256,
        max_connections_per_peer: int = 64,
        idle_timeout_s: float = 600.0,
        frame_timeout_s: float = 120.0,
        late_grace_s: float = 2.0,
        token: bytes | None = None,
        hello_timeout_s: float = 5.0,
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be >= 0, got {max_body_bytes}")
        if min(max_connections, max_connections_per_peer) < 1:
            raise ValueError(f"connection caps must be >= 1, got max_connections={max_connections} "
                             f"and max_connections_per_peer={max_connections_per_peer}")
        limits = dict(idle_timeout_s=idle_timeout_s, frame_timeout_s=frame_timeout_s,
                      hello_timeout_s=hello_timeout_s, late_grace_s=late_grace_s)
        for key, value in limits.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a positive number of seconds, got {value!r}")
        if token is not None and not 0 < len(token) <= MAX_HELLO_BYTES:
            raise ValueError(f"token must be 1..{MAX_HELLO_BYTES} bytes, got {len(token)}")
        self._handler = handler
        self._max_body_bytes = max_body_bytes
        self._send_stall_timeout_s = send_stall_timeout_s
        self._max_connections = max_connections
        self._max_per_peer = max_connections_per_peer
        self._idle_timeout_s = idle_timeout_s
        self._frame_timeout_s = frame_timeout_s
        self._late_grace_s = late_grace_s
        self._token = token
        self._hello_timeout_s = hello_timeout_s
        self._per_peer: dict[str, int] = {}
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

    def _admit(self, peer_host: str) -> str | None:
        """Count a new connection in, or say which cap it is over (nothing counted then)."""
        with self._lock:
            if len(self._connections) >= self._max_connections:
                return f"the server holds its cap of {self._max_connections} connections"
            if self._per_peer.get(peer_host, 0) >= self._max_per_peer:
                return (f"{peer_host} holds its cap of {self._max_per_peer} connections "
                        "(max_connections_per_peer)")
            self._per_peer[peer_host] = self._per_peer.get(peer_host, 0) + 1
            return None

    def _refuse(self, sock: socket.socket, message: str) -> None:
        self._count("refused")
        try:
            sock.setblocking(False)  # a fresh socket's buffer takes the small ERROR at once
            sock.send(encode_frame(MessageType.ERROR, 0, encode_error_body(ErrorCode.BUSY, message)))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()

    def _start_reader(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        refusal = self._admit(peer[0])
        if refusal is not None:
            self._refuse(sock, refusal + "; try again later")
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # SO_SNDTIMEO bounds a send that makes no progress without putting a timeout on the
        # reader's recv (a Python-level settimeout would apply to both).
        sec = int(self._send_stall_timeout_s)
        usec = int((self._send_stall_timeout_s - sec) * 1e6)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(sec, usec))
        conn = _Connection(sock, peer[:2], authorized=self._token is None)
        reader = threading.Thread(target=self._read_loop, args=(conn,), name=f"transport-conn-{peer}", daemon=True)
        with self._lock:
            self._connections.add(conn)
            self._readers.add(reader)
            self._counts["connections"] += 1
        reader.start()

    def _gate(self, conn: _Connection, receiver: _Receiver, header: Header) -> None:
        if not conn.authorized:
            if header.msg_type is not MessageType.HELLO:
                raise _Unauthorized(f"the first frame was a {header.msg_type.name}, not a HELLO "
                                    "with the experiment's token")
            return
        if header.msg_type is not MessageType.REQUEST:
            return
        while not conn.body_slot.acquire(timeout=0.1):
            if self._closing.is_set():
                raise _Closing
        # Time waiting for the previous answer is the server's, not the sender's; from here
        # the body has the frame limit, or its own budget plus a grace when that is shorter.
        limit_s = self._frame_timeout_s
        if header.deadline_ms:
            limit_s = min(limit_s, header.deadline_ms / 1000 + self._late_grace_s)
        receiver.limit(limit_s, f"request {header.request_id}'s body was not whole within "
                                f"{limit_s:g} s (its budget plus late_grace_s, or frame_timeout_s)")

    def _read_loop(self, conn: _Connection) -> None:
        receiver = _Receiver(conn.sock, self._frame_timeout_s)
        try:
            while not self._closing.is_set():
                if conn.authorized:
                    receiver.start_frame(self._idle_timeout_s,
                                         f"no frame began for {self._idle_timeout_s:g} s (idle_timeout_s)")
                else:
                    receiver.start_frame(self._hello_timeout_s,
                                         f"no HELLO with the token within {self._hello_timeout_s:g} s "
                                         "of connecting", fixed=True)
                try:
                    received = read_frame(receiver, max_body_bytes=self._max_body_bytes,
                                          on_header=lambda h: self._gate(conn, receiver, h))
                except FrameTooLarge as exc:
                    self._count("frame_errors")
                    self._reply_error(conn, exc.header.request_id, ErrorCode.TOO_LARGE, str(exc))
                    return
                except FrameError as exc:
                    self._count("frame_errors")
                    self._reply_error(conn, 0, ErrorCode.BAD_FRAME, str(exc))
                    return
                except _Unauthorized as exc:
                    self._count("unauthorized")
                    self._reply_error(conn, 0, ErrorCode.UNAUTHORIZED, str(exc))
                    return
                except _TooSlow as exc:
                    self._count("timeouts")
                    self._reply_error(conn, 0, ErrorCode.TIMEOUT, f"{exc}; connection closed")
                    return
                except (OSError, _Closing):
                    return
                if received is None:
                    return
                self._count("bytes_received", received.size_bytes)
                header = received.frame.header
                if header.msg_type is MessageType.HELLO:
                    if not conn.authorized:
                        if not hmac.compare_digest(bytes(received.frame.body), self._token):
                            self._count("unauthorized")
                            self._reply_error(conn, 0, ErrorCode.UNAUTHORIZED,
                                              "wrong token in HELLO: this server belongs to another "
                                              "experiment (or the client was given a stale token)")
                            return
                        conn.authorized = True
                    continue  # a HELLO to a server without a token is harmless
                if header.msg_type is MessageType.CANCEL:
                    self._cancel(conn, header.request_id)
                    continue
                if header.msg_type is not MessageType.REQUEST:
                    self._count("frame_errors")
                    self._reply_error(
                        conn, header.request_id, ErrorCode.BAD_FRAME,
                        f"a server accepts HELLO, REQUEST and CANCEL frames, got {header.msg_type.name}",
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
        deferred = False
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
            except Exception as exc:  # the handler's failure goes back to the client, not to a log
                self._count("handler_errors")
                self._reply_error(conn, request.request_id, ErrorCode.HANDLER, f"{type(exc).__name__}: {exc}")
                return
            if isinstance(body, Future):
                # Answered later by whoever completes it, in that thread: no worker waits,
                # and the answer leaves without another thread's wake-up.
                deferred = True
                body.add_done_callback(lambda future: self._answer_later(conn, pending, future))
                return
            self._answer(conn, request.request_id, body)
        finally:
            if not deferred:
                self._done(conn, pending)

    def _answer(self, conn: _Connection, request_id: int, body) -> None:
        if not isinstance(body, (bytes, bytearray, memoryview)):
            self._count("handler_errors")
            self._reply_error(conn, request_id, ErrorCode.HANDLER,
                              f"TypeError: handler returned {type(body).__name__}, expected bytes")
            return
        self._count("responses")
        self._send(conn, MessageType.RESPONSE, request_id, body)

    def _answer_later(self, conn: _Connection, pending: _Pending, future: Future) -> None:
        request_id = pending.request.request_id
        try:
            try:
                body = future.result()
            except Exception as exc:  # noqa: BLE001 -- the handler's failure, as above
                self._count("handler_errors")
                self._reply_error(conn, request_id, ErrorCode.HANDLER, f"{type(exc).__name__}: {exc}")
                return
            self._answer(conn, request_id, body)
        finally:
            self._done(conn, pending)

    def _done(self, conn: _Connection, pending: _Pending) -> None:
        """The request is answered (or dropped): the connection may read its next body."""
        with conn.state_lock:
            conn.pending.pop(pending.request.request_id, None)
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
            left = self._per_peer.pop(conn.peer[0]) - 1
            if left:
                self._per_peer[conn.peer[0]] = left


def _timeval(sec: int, usec: int) -> bytes:
    return struct.pack("ll", sec, usec)
