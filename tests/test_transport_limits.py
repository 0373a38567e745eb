"""The server against hostile peers: what they can make it hold, and for how long.

Every test here runs the server in this process and reads this process's resident memory
(its peak, VmHWM: tests/resident.py) to show that a peer's declared lengths and held connections cost what the module
doc says, not what the peer asks for.
"""

from __future__ import annotations

import socket
import threading
import time
import zlib

import pytest
from resident import MIB, peak_rss_bytes, reset_peak

from ray_scout.transport.client import Connection, RemoteError
from ray_scout.transport.framing import (
    HEADER,
    HEADER_CRC,
    MAGIC,
    VERSION,
    ErrorCode,
    MessageType,
    decode_error_body,
    encode_frame,
    encode_header,
    read_frame,
)
from ray_scout.transport.server import Request, Server

DECLARED = 255 * MIB


def echo(request: Request) -> bytes:
    return bytes(request.body)


def big_header(request_id: int = 1, deadline_ms: int = 0) -> bytes:
    """A valid REQUEST header that declares a 255 MiB body (none of which is sent)."""
    fields = HEADER.pack(MAGIC, VERSION, MessageType.REQUEST, 0, request_id, deadline_ms, DECLARED, 0)
    return fields + HEADER_CRC.pack(zlib.crc32(fields))


def error_of(sock: socket.socket) -> ErrorCode:
    """The code of the ERROR frame the server sent before closing ``sock``."""
    sock.settimeout(10)
    received = read_frame(sock.recv_into, max_body_bytes=1 << 16)
    assert received is not None and received.frame.header.msg_type is MessageType.ERROR
    code, _ = decode_error_body(bytes(received.frame.body))
    assert sock.recv(1) == b""  # and the connection is closed
    return code


def test_a_declared_body_costs_memory_only_as_its_bytes_arrive():
    # Defect 1 of issue 17: 10 such headers took a server from 16 MB to 2.5 GB resident.
    with Server(echo) as server:
        before = reset_peak()
        socks = [socket.create_connection(server.address, timeout=5) for _ in range(10)]
        for sock in socks:
            sock.sendall(big_header())
        time.sleep(0.5)  # the readers have parsed the headers and wait for the bodies
        grown = peak_rss_bytes() - before
        for sock in socks:
            sock.close()
    assert grown < 32 * MIB, f"10 headers declaring 255 MiB each grew RSS by {grown / MIB:.0f} MiB"


def test_connections_over_the_per_peer_cap_get_busy_and_are_closed():
    with Server(echo, max_connections=10, max_connections_per_peer=3) as server:
        held = [socket.create_connection(server.address, timeout=5) for _ in range(3)]
        extra = socket.create_connection(server.address, timeout=5)
        assert error_of(extra) is ErrorCode.BUSY
        # Another address of the same host is another peer: it still gets in.
        other = socket.create_connection(server.address, timeout=5, source_address=("127.0.0.2", 0))
        other.sendall(encode_frame(MessageType.REQUEST, 7, b"hi"))
        other.settimeout(5)
        assert bytes(read_frame(other.recv_into).frame.body) == b"hi"
        # A freed slot is given back to its peer (once the server has seen the close).
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:
            again = socket.create_connection(server.address, timeout=5)
            again.sendall(encode_frame(MessageType.REQUEST, 8, b"ok"))
            again.settimeout(5)
            answer = read_frame(again.recv_into, max_body_bytes=1 << 16)
            if answer.frame.header.msg_type is MessageType.RESPONSE or time.monotonic() > deadline:
                break
            again.close()
            time.sleep(0.05)
        assert answer.frame.header.msg_type is MessageType.RESPONSE
        for sock in held + [other, again]:
            sock.close()


def test_connections_over_the_total_cap_get_busy_from_any_peer():
    with Server(echo, max_connections=2, max_connections_per_peer=2) as server:
        held = [socket.create_connection(server.address, timeout=5, source_address=(f"127.0.0.{i}", 0))
                for i in (2, 3)]
        extra = socket.create_connection(server.address, timeout=5, source_address=("127.0.0.4", 0))
        assert error_of(extra) is ErrorCode.BUSY
        assert server.stats().refused == 1
        for sock in held:
            sock.close()


def test_a_client_over_the_cap_gets_a_remote_error_naming_the_cap():
    with Server(echo, max_connections=1) as server:
        held = socket.create_connection(server.address, timeout=5)
        time.sleep(0.1)
        with Connection(server.address) as conn:
            with pytest.raises(RemoteError, match="cap of 1 connections") as caught:
                conn.request(b"x", deadline_s=5)
            assert caught.value.code is ErrorCode.BUSY and not conn.connected
        held.close()


def test_an_idle_connection_is_closed_after_the_idle_timeout():
    with Server(echo, idle_timeout_s=0.3) as server:
        sock = socket.create_connection(server.address, timeout=5)
        started = time.monotonic()
        assert error_of(sock) is ErrorCode.TIMEOUT
        assert 0.25 < time.monotonic() - started < 2
        assert server.stats().timeouts == 1


def test_a_frame_trickled_slower_than_the_frame_timeout_is_cut():
    with Server(echo, frame_timeout_s=0.5) as server:
        sock = socket.create_connection(server.address, timeout=5)
        started = time.monotonic()
        sock.sendall(big_header())
        code = None
        for _ in range(40):  # one byte each 50 ms: 20 bytes/s, far below the 255 MiB declared
            try:
                sock.sendall(b"x")
            except OSError:
                break
            time.sleep(0.05)
            if time.monotonic() - started > 1.0:
                break
        code = error_of(sock)
        assert code is ErrorCode.TIMEOUT
        assert server.stats().timeouts == 1 and server.stats().requests == 0


def test_a_body_is_not_awaited_past_its_deadline_plus_the_grace():
    with Server(echo, frame_timeout_s=30, late_grace_s=0.2) as server:
        sock = socket.create_connection(server.address, timeout=5)
        started = time.monotonic()
        sock.sendall(big_header(deadline_ms=200))
        assert error_of(sock) is ErrorCode.TIMEOUT
        assert time.monotonic() - started < 2


TOKEN = b"k" * 32


def test_with_a_token_a_request_without_hello_is_refused_before_its_body_is_read():
    calls = []
    with Server(lambda r: calls.append(r) or b"", token=TOKEN) as server:
        sock = socket.create_connection(server.address, timeout=5)
        sock.sendall(big_header())
        assert error_of(sock) is ErrorCode.UNAUTHORIZED
        assert calls == [] and server.stats().unauthorized == 1
        assert server.stats().bytes_received == 0


def test_with_a_token_a_wrong_token_is_refused():
    with Server(echo, token=TOKEN) as server:
        with Connection(server.address, token=b"x" * 32) as conn:
            with pytest.raises(RemoteError, match="wrong token") as caught:
                conn.request(b"x", deadline_s=5)
            assert caught.value.code is ErrorCode.UNAUTHORIZED


def test_with_a_token_a_silent_connection_is_closed_after_the_hello_timeout():
    with Server(echo, token=TOKEN, hello_timeout_s=0.3, idle_timeout_s=600) as server:
        sock = socket.create_connection(server.address, timeout=5)
        started = time.monotonic()
        assert error_of(sock) is ErrorCode.TIMEOUT
        assert time.monotonic() - started < 2


def test_with_a_token_a_hello_trickled_in_is_cut_at_the_hello_timeout_from_the_accept():
    with Server(echo, token=TOKEN, hello_timeout_s=0.5) as server:
        sock = socket.create_connection(server.address, timeout=5)
        hello = encode_frame(MessageType.HELLO, 0, TOKEN)
        started = time.monotonic()
        for byte in hello[:20]:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
        assert error_of(sock) is ErrorCode.TIMEOUT
        assert time.monotonic() - started < 2.5


def test_with_the_right_token_requests_are_served_and_reconnects_greet_again():
    with Server(echo, token=TOKEN) as server:
        with Connection(server.address, token=TOKEN) as conn:
            assert bytes(conn.request(b"one", deadline_s=5).body) == b"one"
            conn.close()
            assert bytes(conn.request(b"two", deadline_s=5).body) == b"two"
        assert server.stats().unauthorized == 0


def test_a_hello_body_over_64_bytes_is_refused_from_its_header():
    with Server(echo, token=TOKEN) as server:
        sock = socket.create_connection(server.address, timeout=5)
        sock.sendall(encode_header(MessageType.HELLO, 0, b"x" * 65))
        assert error_of(sock) is ErrorCode.TOO_LARGE


def test_server_rejects_bad_limits():
    with pytest.raises(ValueError, match="connection caps"):
        Server(echo, max_connections=0)
    with pytest.raises(ValueError, match="idle_timeout_s"):
        Server(echo, idle_timeout_s=0)
    with pytest.raises(ValueError, match="token"):
        Server(echo, token=b"x" * 65)


# The bound the port test holds the server to: 400 held connections cost their threads
# (glibc stacks are mapped, not resident, beyond the pages touched) and at most 64 KiB of
# body buffer each; measured about 40-60 MiB on the 2-core dev box (docs/RELIABILITY.md).
HELD_RSS_BOUND = 160 * MIB


def hold_hostile_connections(server: Server, hold_s: float) -> dict:
    """400 hostile connections to ``server`` (100 silent, 100 silent after a header declaring
    255 MiB, 200 that trickle one body byte a second after such a header) while a
    well-behaved client sends a request with a 1 s deadline every 0.25 s for ``hold_s``.
    Returns the server process's peak RSS growth and the client's latencies
    (bench/hostile.py reports the same scenario held longer)."""
    before = reset_peak()
    hostile = []
    for i in range(400):
        sock = socket.create_connection(server.address, timeout=5)
        if i % 2 == 0 or i >= 200:  # the other 100 of the first 200 send nothing at all
            sock.sendall(big_header(request_id=i + 1))
        hostile.append(sock)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(1.0):
            for sock in hostile[200:]:
                try:
                    sock.send(b"x")
                except OSError:
                    pass

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    latencies = []
    try:
        with Connection(server.address) as good:
            end = time.monotonic() + hold_s
            while time.monotonic() < end:
                started = time.monotonic()
                body = f"request {len(latencies)}".encode() * 100
                assert bytes(good.request(body, deadline_s=1.0).body) == body
                latencies.append(time.monotonic() - started)
                time.sleep(0.25)
        accepted = server.stats().connections
        peak = peak_rss_bytes() - before
    finally:
        stop.set()
        sender.join(2)
        for sock in hostile:
            sock.close()
    return {"hostile_connections": 400, "held_s": hold_s, "accepted": accepted,
            "rss_growth_peak_mib": peak / MIB, "good_requests": len(latencies),
            "good_latency_max_s": max(latencies), "good_deadline_s": 1.0}


def test_400_silent_and_trickling_connections_hold_bounded_memory_and_a_good_agent_meets_deadlines():
    with Server(echo, max_connections=512, max_connections_per_peer=450, workers=4) as server:
        figures = hold_hostile_connections(server, hold_s=5.0)
    assert figures["accepted"] >= 401  # all held at once, not refused
    assert figures["good_latency_max_s"] < 1.0, figures
    assert figures["rss_growth_peak_mib"] * MIB < HELD_RSS_BOUND, figures


def test_with_the_default_caps_one_hostile_host_cannot_crowd_out_an_agent_on_another():
    # The 400-connection test raises the caps to hold them all; with the defaults a host
    # keeps at most 64 connections (each held by a header declaring 255 MiB), the rest are
    # refused at once, and an agent on another address is served within its deadlines.
    with Server(echo) as server:
        hostile = []
        for i in range(100):
            sock = socket.create_connection(server.address, timeout=5)
            sock.sendall(big_header(request_id=i + 1))
            hostile.append(sock)
        deadline = time.monotonic() + 10
        while server.stats().refused < 36 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.stats().refused == 36
        with Connection(server.address, source_address="127.0.0.2") as good:
            for k in range(10):
                started = time.monotonic()
                assert bytes(good.request(b"%d" % k, deadline_s=1.0).body) == b"%d" % k
                assert time.monotonic() - started < 1.0
        for sock in hostile:
            sock.close()


def test_the_cloud_actor_serves_only_connections_that_present_its_token():
    from ray_scout.actors.cloud import CloudActor

    cloud = CloudActor("c", [("127.0.0.1", 0)], None, lambda bodies: [{"text": "ok"} for _ in bodies],
                       token=TOKEN)
    try:
        address = cloud.ready()[0]
        # Bound where it is told (on a cluster, the cloud node's address), never 0.0.0.0.
        assert address[0] == "127.0.0.1"
        with Connection(address) as stranger:
            with pytest.raises(RemoteError) as caught:
                stranger.request(b"x", deadline_s=5)
            assert caught.value.code is ErrorCode.UNAUTHORIZED
        with Connection(address, token=TOKEN) as agent:
            assert b'"text": "ok"' in bytes(agent.request(b"x", deadline_s=5).body)
    finally:
        cloud.close()
