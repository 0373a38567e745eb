"""Sockets from a named network namespace: a real veth pair between two namespaces of our own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ray_scout.transport.client import Connection, ConnectionLost
from ray_scout.transport.netns import NetnsError, socket_in_netns
from ray_scout.transport.server import Server

REPO = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creating and entering network namespaces needs root")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def own_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


@pytest.fixture
def netns_pair():
    """Two namespaces joined by a veth pair, 10.79.<pid-derived>.1 <-> .2; removed afterwards."""
    pid = os.getpid()
    edge, cloud = f"rsedge{pid}", f"rscloud{pid}"
    subnet = f"10.79.{pid % 250}"
    created: list[str] = []
    try:
        for name in (edge, cloud):
            ip("netns", "add", name)
            created.append(name)
        ip("link", "add", f"rse{pid}", "netns", edge, "type", "veth", "peer", "name", f"rsc{pid}", "netns", cloud)
        for name, dev, host in ((edge, f"rse{pid}", 1), (cloud, f"rsc{pid}", 2)):
            ip("-n", name, "addr", "add", f"{subnet}.{host}/24", "dev", dev)
            ip("-n", name, "link", "set", dev, "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield edge, cloud, f"{subnet}.1", f"{subnet}.2"
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.mark.root
@needs_root
def test_client_in_edge_namespace_reaches_server_in_cloud_namespace(netns_pair):
    edge, cloud, edge_ip, cloud_ip = netns_pair
    before = own_netns()
    with Server(lambda r: r.peer[0].encode(), host=cloud_ip, netns=cloud) as server:
        with Connection(server.address, source_netns=edge, congestion_control="cubic") as conn:
            response = conn.request(b"hi", deadline_s=5)
    assert response.body == edge_ip.encode()  # the server saw the edge namespace's address
    assert own_netns() == before  # this thread never moved


@pytest.mark.root
@needs_root
def test_cloud_address_is_unreachable_from_the_root_namespace(netns_pair):
    _, cloud, _, cloud_ip = netns_pair
    with Server(lambda r: b"", host=cloud_ip, netns=cloud) as server:
        # The address lives only in the namespaces: without source_netns there is no route.
        with pytest.raises(ConnectionLost):
            Connection(server.address, connect_timeout_s=1)


@pytest.mark.root
@needs_root
def test_socket_keeps_its_namespace_when_used_from_another_thread(netns_pair):
    edge, _, edge_ip, _ = netns_pair
    sock = socket_in_netns(edge)
    try:
        sock.bind((edge_ip, 0))  # only possible inside the edge namespace
        assert sock.getsockname()[0] == edge_ip
    finally:
        sock.close()


def test_missing_namespace_says_how_to_create_it():
    with pytest.raises(NetnsError, match="ip netns add"):
        socket_in_netns(f"rs-missing-{os.getpid()}")


@pytest.mark.parametrize("name", ["", "../etc", "a/b"])
def test_namespace_name_must_be_a_bare_name(name):
    with pytest.raises(NetnsError, match="bare name"):
        socket_in_netns(name)


NON_ROOT_ATTEMPT = textwrap.dedent(
    """
    import os, sys
    from ray_scout.transport.netns import NetnsError, socket_in_netns
    # Imports first: the interpreter's files may not be readable by nobody.
    os.setgid(65534); os.setuid(65534)
    try:
        socket_in_netns(sys.argv[1])
    except NetnsError as exc:
        print(exc)
    """
)


@pytest.mark.root
@needs_root
def test_non_root_gets_told_to_run_as_root(netns_pair):
    edge = netns_pair[0]
    out = subprocess.run(
        [sys.executable, "-c", NON_ROOT_ATTEMPT, edge], capture_output=True, text=True, timeout=30, cwd=REPO
    )
    assert "run as root" in out.stdout, out.stderr
