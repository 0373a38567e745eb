"""The client on loopback: dead and silent servers, deadlines, timelines, counters, TCP options."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ray_scout.transport.client import Connection, ConnectionLost, DeadlineExceeded
from ray_scout.transport.framing import HEADER_SIZE
from ray_scout.transport.server import Request, Server

REPO = Path(__file__).resolve().parents[1]
SLOW_SERVER = textwrap.dedent(
    """
    import sys, time
    from ray_scout.transport.server import Server
    server = Server(lambda request: time.sleep(60) or b"")
    print(server.address[1], flush=True)
    time.sleep(60)
    """
)


def test_server_killed_mid_request_raises_connection_lost_quickly():
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        port = int(proc.stdout.readline())
        with Connection(("127.0.0.1", port)) as conn:
            killer = threading.Timer(0.3, proc.kill)
            killer.start()
            started = time.monotonic()
            with pytest.raises(ConnectionLost, match="lost while waiting"):
                conn.request(b"payload", deadline_s=30)
            assert time.monotonic() - started < 2.0
            assert not conn.connected
            proc.wait(5)  # the listener closes only once the process has fully exited
            with pytest.raises(ConnectionLost, match="is the server running"):
                conn.request(b"again", deadline_s=5)  # reconnect is tried, and refused
    finally:
        proc.kill()
        proc.wait(5)


def test_nothing_listening_is_connection_lost_not_a_hang():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionLost, match="cannot connect"):
        Connection(("127.0.0.1", port), connect_timeout_s=2)


def test_silent_server_gives_deadline_exceeded_at_the_deadline():
    """A peer that accepts and never answers (a link at rate 0 looks the same)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        conn = Connection(listener.getsockname())
        accepted, _ = listener.accept()
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="sent CANCEL"):
            conn.request(b"hello", deadline_s=0.3)
        assert 0.29 < time.monotonic() - started < 0.8
        assert conn.connected  # nothing of the answer was read: the stream is still in step
        accepted.settimeout(2)
        data = b""
        while len(data) < 2 * HEADER_SIZE + 5:
            data += accepted.recv(4096)
        assert data[HEADER_SIZE + 5 + 5] == 4  # the second frame's type byte is CANCEL
        accepted.close()
        conn.close()


def test_giving_up_with_body_bytes_unacknowledged_closes_instead_of_cancelling():
    """The body left the caller but not the kernel (a link whose rate fell): a CANCEL and the
    next request would queue behind it, so the connection is dropped, bytes and all."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the peer's window
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        conn = Connection(listener.getsockname())
        conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        accepted, _ = listener.accept()  # never reads
        with pytest.raises(DeadlineExceeded, match="still unacknowledged"):
            conn.request(b"k" * 200_000, deadline_s=0.3)  # fits the send buffer: sendall returns
        assert not conn.connected
        accepted.close()


def test_deadline_while_sending_closes_the_connection():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        conn = Connection(listener.getsockname())
        accepted, _ = listener.accept()  # never reads: the send buffer fills up
        body = b"k" * 50_000_000
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="while sending"):
            conn.request(body, deadline_s=0.3)
        assert time.monotonic() - started < 1.0
        assert not conn.connected
        accepted.close()


def test_a_send_cut_off_by_its_deadline_reports_what_the_peer_acknowledged():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        conn = Connection(listener.getsockname())
        accepted, _ = listener.accept()
        # The peer reads 1 MB and stops: its kernel then acknowledges only what fits its
        # receive buffer, so the acked count sits between the two.
        threading.Thread(target=lambda: accepted.recv(1 << 20, socket.MSG_WAITALL),
                         daemon=True).start()
        with pytest.raises(DeadlineExceeded) as caught:
            conn.request(b"k" * 50_000_000, deadline_s=0.5)
        receive_buffer = accepted.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        accepted.close()
    assert 1 << 20 <= caught.value.acked_bytes <= (1 << 20) + receive_buffer + HEADER_SIZE
    assert 0.3 < caught.value.sending_s <= 0.5 + 0.05
    assert str(caught.value.acked_bytes) in str(caught.value)


def test_an_answer_that_comes_too_late_carries_no_transfer_sample():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        conn = Connection(listener.getsockname())
        accepted, _ = listener.accept()
        threading.Thread(target=lambda: accepted.recv(1 << 16), daemon=True).start()
        with pytest.raises(DeadlineExceeded, match="no answer") as caught:
            conn.request(b"small", deadline_s=0.2)
        accepted.close()
    assert caught.value.acked_bytes is None and caught.value.sending_s is None


def test_late_answer_to_a_cancelled_request_is_discarded():
    def handler(request: Request) -> bytes:
        if request.body == b"slow":
            time.sleep(0.3)
        return b"answer:" + bytes(request.body)

    with Server(handler, workers=2) as server, Connection(server.address) as conn:
        with pytest.raises(DeadlineExceeded):
            conn.request(b"slow", deadline_s=0.1)  # already running: CANCEL cannot stop it
        response = conn.request(b"fast", deadline_s=5)
        assert bytes(response.body) == b"answer:fast" and response.request_id == 2


def test_timeline_is_ordered_and_counters_add_up():
    with Server(lambda r: b"r" * 10) as server:
        conn = Connection(server.address)
        first = conn.request(b"q" * 100, deadline_s=5)
        second = conn.request(b"q" * 100, deadline_s=5)
        t = first.timeline
        assert t.connect_start_unix_s <= t.connect_end_unix_s <= t.tx_start_unix_s <= t.tx_end_unix_s
        assert t.tx_acked_unix_s is None or t.tx_end_unix_s <= t.tx_acked_unix_s
        assert t.tx_end_unix_s <= t.rx_first_byte_unix_s <= t.rx_end_unix_s
        assert not t.reused_connection and second.timeline.reused_connection
        assert first.sent_bytes == HEADER_SIZE + 100 and first.received_bytes == HEADER_SIZE + 10
        assert conn.bytes_sent == 2 * (HEADER_SIZE + 100) and conn.bytes_received == 2 * (HEADER_SIZE + 10)
        assert server.stats().bytes_received == conn.bytes_sent
        assert first.tcp is not None and first.tcp.rtt_s > 0
        conn.close()


def test_large_body_is_acknowledged_before_the_answer():
    def slow_handler(request):
        # Longer than Linux's delayed-ACK timer (40-200 ms): an instant answer can carry the
        # last ACK itself, and then no moment of zero unacked bytes precedes it.
        time.sleep(0.3)
        return str(len(request.body)).encode()

    with Server(slow_handler) as server, Connection(server.address) as conn:
        response = conn.request(b"\x01" * 20_000_000, deadline_s=30)
        assert response.body == b"20000000"
        assert response.timeline.tx_acked_unix_s is not None


@pytest.mark.parametrize("algorithm", ["cubic", "reno"])
def test_congestion_control_is_set_and_recorded(algorithm):
    available = open("/proc/sys/net/ipv4/tcp_available_congestion_control").read().split()
    if algorithm not in available:
        pytest.skip(f"{algorithm} not in tcp_available_congestion_control ({available})")
    with Server(lambda r: b"") as server, Connection(server.address, congestion_control=algorithm) as conn:
        assert conn.congestion_control == algorithm
        conn.request(b"", deadline_s=5)


def test_default_congestion_control_is_recorded():
    default = open("/proc/sys/net/ipv4/tcp_congestion_control").read().strip()
    with Server(lambda r: b"") as server, Connection(server.address) as conn:
        assert conn.congestion_control == default


def test_unknown_congestion_control_says_where_to_look():
    with Server(lambda r: b"") as server:
        with pytest.raises(ValueError, match="tcp_available_congestion_control"):
            Connection(server.address, congestion_control="no-such-cc")


@pytest.mark.parametrize("deadline_s", [0, -1, float("nan")])
def test_request_refuses_a_meaningless_deadline(deadline_s):
    with Server(lambda r: b"") as server, Connection(server.address) as conn:
        with pytest.raises(ValueError, match="deadline_s"):
            conn.request(b"", deadline_s=deadline_s)


def test_abort_on_close_sets_a_zero_linger():
    import struct as _struct

    with socket.create_server(("127.0.0.1", 0)) as listener:
        conn = Connection(listener.getsockname(), abort_on_close=True)
        linger = conn._sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
        assert _struct.unpack("ii", linger) == (1, 0)
        conn.close()
