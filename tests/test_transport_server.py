"""The server on loopback: concurrency, size limits, deadlines, cancellation, shutdown."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from ray_scout.transport.client import Connection, DeadlineExceeded, RemoteError
from ray_scout.transport.framing import (
    ErrorCode,
    MessageType,
    decode_error_body,
    encode_frame,
    encode_header,
    read_frame,
)
from ray_scout.transport.server import Request, Server


def raw_connect(server: Server) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=5)
    return sock


def read_one(sock: socket.socket):
    return read_frame(sock.recv_into, max_body_bytes=1 << 20)


def echo(request: Request) -> bytes:
    return bytes(request.body)


def test_port_zero_binds_an_os_chosen_port_exposed_as_address():
    with Server(echo) as server:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0


def test_32_clients_at_once_each_get_their_own_answers():
    peers: set[tuple[str, int]] = set()
    lock = threading.Lock()
    inside = threading.Barrier(32, timeout=10)

    def handler(request: Request) -> bytes:
        with lock:
            peers.add(request.peer)
        if request.body.endswith(b"first"):
            inside.wait()  # all 32 first requests are in the handler together
        return b"re:" + bytes(request.body)

    failures: list[BaseException] = []

    def agent(i: int) -> None:
        try:
            with Connection(server.address) as conn:
                for k, tag in enumerate([b"first", b"second", b"third"]):
                    body = f"agent{i}-{k}-".encode() + tag
                    assert bytes(conn.request(body, deadline_s=10).body) == b"re:" + body
        except BaseException as exc:  # collected and re-raised in the test thread
            failures.append(exc)

    with Server(handler, workers=32) as server:
        threads = [threading.Thread(target=agent, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads)
        assert not failures, failures[0]
        assert len(peers) == 32
        stats = server.stats()
        assert stats.connections == 32 and stats.responses == 96


def test_oversize_frame_gets_too_large_error_and_the_connection_is_closed():
    calls = []
    with Server(lambda r: calls.append(r) or b"", max_body_bytes=1000) as server:
        with raw_connect(server) as sock:
            # Only the header: the server must answer without waiting for 10 MB of body.
            sock.sendall(encode_header(MessageType.REQUEST, 9, b"\0" * 10_000_000))
            answer = read_one(sock)
            assert answer.frame.header.msg_type is MessageType.ERROR
            assert answer.frame.header.request_id == 9
            code, message = decode_error_body(answer.frame.body)
            assert code is ErrorCode.TOO_LARGE and "max_body_bytes=1000" in message
            assert sock.recv(1) == b""
        assert calls == [] and server.stats().frame_errors == 1


def test_client_sending_oversize_body_gets_an_error_not_a_hang():
    with Server(echo, max_body_bytes=1000) as server, Connection(server.address) as conn:
        started = time.monotonic()
        with pytest.raises(RemoteError) as info:
            conn.request(b"x" * 5_000_000, deadline_s=5)
        assert info.value.code is ErrorCode.TOO_LARGE
        assert time.monotonic() - started < 2
        assert not conn.connected


def test_garbage_gets_bad_frame_error_and_close():
    with Server(echo) as server, raw_connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 20)
        code, message = decode_error_body(read_one(sock).frame.body)
        assert code is ErrorCode.BAD_FRAME and "bad magic" in message
        assert sock.recv(1) == b""


class BlockOnFirst:
    """A handler that holds its worker on a b"block" request until `release` is set."""

    def __init__(self):
        self.release = threading.Event()
        self.seen: list[bytes] = []

    def __call__(self, request: Request) -> bytes:
        self.seen.append(bytes(request.body))
        if request.body == b"block":
            self.release.wait(5)
        return b"ok"


def occupy_the_only_worker(sock: socket.socket, handler: BlockOnFirst) -> None:
    sock.sendall(encode_frame(MessageType.REQUEST, 1, b"block"))
    for _ in range(1000):
        if handler.seen:
            return
        time.sleep(0.005)
    raise AssertionError("the blocking request never reached the handler")


def test_request_past_its_deadline_gets_deadline_error_without_running_the_handler():
    handler = BlockOnFirst()
    release, seen = handler.release, handler.seen
    with Server(handler, workers=1) as server, raw_connect(server) as a, raw_connect(server) as b:
        occupy_the_only_worker(a, handler)
        b.sendall(encode_frame(MessageType.REQUEST, 2, b"late", deadline_ms=50))
        time.sleep(0.2)  # the only worker is busy well past the 50 ms budget
        release.set()
        answer = read_one(b)
        code, message = decode_error_body(answer.frame.body)
        assert answer.frame.header.request_id == 2 and code is ErrorCode.DEADLINE
        assert "handler was not run" in message
        assert read_one(a).frame.body == b"ok"
        assert seen == [b"block"]
        assert server.stats().deadline_errors == 1


def budget_seen_by_handler(request: Request) -> bytes:
    if request.deadline_unix_s is None:
        return b"none"
    return repr(request.deadline_unix_s - request.first_byte_unix_s).encode()


def test_request_deadline_is_anchored_at_its_first_byte_and_zero_means_none():
    with Server(budget_seen_by_handler) as server, raw_connect(server) as sock:
        sock.sendall(encode_frame(MessageType.REQUEST, 1, b"", deadline_ms=1500))
        assert float(read_one(sock).frame.body) == pytest.approx(1.5)
        sock.sendall(encode_frame(MessageType.REQUEST, 2, b""))
        assert read_one(sock).frame.body == b"none"


def test_cancel_drops_a_request_that_has_not_started():
    handler = BlockOnFirst()
    release, seen = handler.release, handler.seen
    with Server(handler, workers=1) as server, raw_connect(server) as a, raw_connect(server) as b:
        occupy_the_only_worker(a, handler)
        b.sendall(encode_frame(MessageType.REQUEST, 5, b"doomed", deadline_ms=60_000))
        b.sendall(encode_frame(MessageType.CANCEL, 5))
        b.sendall(encode_frame(MessageType.REQUEST, 6, b"after"))
        time.sleep(0.1)
        release.set()
        answer = read_one(b)  # nothing is sent for the cancelled request
        assert (answer.frame.header.request_id, bytes(answer.frame.body)) == (6, b"ok")
        assert seen == [b"block", b"after"]
        assert server.stats().cancelled == 1


def test_client_deadline_cancels_the_queued_request_on_the_server():
    handler = BlockOnFirst()
    release, seen = handler.release, handler.seen
    with Server(handler, workers=1) as server, raw_connect(server) as a, Connection(server.address) as conn:
        occupy_the_only_worker(a, handler)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as info:
            conn.request(b"queued", deadline_s=0.2)
        assert 0.19 < time.monotonic() - started < 1.0 and not info.value.remote
        time.sleep(0.05)  # let the CANCEL arrive before the worker frees up
        release.set()
        assert bytes(conn.request(b"next", deadline_s=5).body) == b"ok"
        assert seen == [b"block", b"next"]
        assert server.stats().cancelled == 1


def test_handler_exception_reaches_the_client_as_remote_error():
    def broken(request: Request) -> bytes:
        raise KeyError("layer 7")

    with Server(broken) as server, Connection(server.address) as conn:
        with pytest.raises(RemoteError, match="KeyError") as info:
            conn.request(b"x", deadline_s=5)
        assert info.value.code is ErrorCode.HANDLER
        assert conn.connected  # a handler failure does not cost the connection


def test_handler_returning_non_bytes_is_reported():
    with Server(lambda r: "text") as server, Connection(server.address) as conn:
        with pytest.raises(RemoteError, match="expected bytes"):
            conn.request(b"x", deadline_s=5)


def test_pipelined_requests_are_read_one_body_at_a_time():
    """A second body is not read off the socket while the first request is unanswered."""
    release = threading.Event()
    bodies_in_memory: list[int] = []
    lock = threading.Lock()
    live = [0]

    def handler(request: Request) -> bytes:
        with lock:
            live[0] += 1
            bodies_in_memory.append(live[0])
        release.wait(5)
        with lock:
            live[0] -= 1
        return b"ok"

    with Server(handler, workers=4) as server, raw_connect(server) as sock:
        for i in range(1, 4):
            sock.sendall(encode_frame(MessageType.REQUEST, i, b"b" * 100))
        time.sleep(0.2)
        release.set()
        assert [read_one(sock).frame.header.request_id for _ in range(3)] == [1, 2, 3]
        assert max(bodies_in_memory) == 1


def test_close_returns_promptly_with_a_handler_stuck_and_clients_connected():
    stuck = threading.Event()

    def handler(request: Request) -> bytes:
        stuck.wait(10)
        return b""

    server = Server(handler)
    clients = [raw_connect(server) for _ in range(4)]
    clients[0].sendall(encode_frame(MessageType.REQUEST, 1, b"x"))
    time.sleep(0.05)
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 1.0
    for c in clients:
        c.settimeout(2)
        assert c.recv(1) == b""
        c.close()
    stuck.set()
    with pytest.raises(OSError):
        socket.create_connection(server.address, timeout=1)


def test_server_rejects_zero_workers():
    with pytest.raises(ValueError, match="workers"):
        Server(echo, workers=0)


def test_a_handler_may_answer_later_from_the_thread_that_completes_its_future():
    from concurrent.futures import Future

    waiting: list[tuple[Request, Future]] = []

    def later(request: Request) -> Future:
        future: Future = Future()
        waiting.append((request, future))
        return future

    def complete() -> None:  # another thread, as the cloud's compute threads
        while len(waiting) < 2:
            time.sleep(0.01)
        (first, f1), (second, f2) = waiting
        f1.set_result(b"late:" + bytes(first.body))
        f2.set_exception(ValueError("no answer for this one"))

    with Server(later, workers=1) as server, Connection(server.address) as a, \
            Connection(server.address) as b:
        threading.Thread(target=complete, daemon=True).start()
        replies: dict = {}
        sender = threading.Thread(target=lambda: replies.update(
            a=a.request(b"one", deadline_s=5).body))
        sender.start()
        while not waiting:
            time.sleep(0.01)
        # One worker, yet the second request is served: no worker waits for the first.
        with pytest.raises(RemoteError, match="no answer for this one"):
            b.request(b"two", deadline_s=5)
        sender.join(5)
        assert bytes(replies["a"]) == b"late:one"
        stats = server.stats()
    assert stats.responses == 1 and stats.handler_errors == 1
