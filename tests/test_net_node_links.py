"""NodeLinks on a real interface: two namespaces stand for an edge node and the cloud node.

The edge node's interface toward the cloud is a veth with its offloads left on, as a NIC's
are; agents are told apart by the cloud port they send to, and everything else (Ray, ssh)
must pass unshaped.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
from pyroute2 import IPRoute, netns

from ray_scout.net.errors import CapabilityError, NetError
from ray_scout.net.namespaces import add_veth, address_up, create_netns, in_netns
from ray_scout.net.node_links import AgentFlow, NodeLinks, egress_interface, path_impairment
from ray_scout.net.probe import probe
from ray_scout.net.profiles import Direction, Impairment, LinkProfile
from ray_scout.net.shaping import HTB_MAJOR
from ray_scout.net.topology import pid_run_id
from ray_scout.net.traffic import BulkFlow

EDGE_IP, CLOUD_IP = "10.79.0.1", "10.79.0.2"
EDGE_IP6, CLOUD_IP6 = "fd79::1", "fd79::2"
IFA_F_NODAD = 0x02
MBIT = 1_000_000
root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_NET_ADMIN) for namespaces and qdiscs")


def _profile(delay_s=0.0, jitter_s=0.0, loss=0.0, distribution="uniform") -> LinkProfile:
    direction = Direction(50 * MBIT, 100_000, Impairment(delay_s, jitter_s, distribution, loss))
    return LinkProfile("p", direction, direction)


def test_path_impairment_adds_round_trip_delays_and_compounds_uplink_losses():
    path = path_impairment(_profile(0.003, 0.002, 0.01), _profile(0.010, 0.0, 0.02))
    assert path.delay_s == pytest.approx(2 * 0.003 + 2 * 0.010)
    assert path.jitter_s == pytest.approx((2 * 0.002 ** 2) ** 0.5)
    assert path.loss == pytest.approx(1 - 0.99 * 0.98)
    assert path.jitter_distribution == "uniform"


def test_path_impairment_carries_one_hops_netem_only_parameters_and_refuses_two():
    reordering = LinkProfile("r", Direction(50 * MBIT, 100_000, Impairment(0.005, reorder=0.01, duplicate=0.02)),
                             Direction(50 * MBIT, 100_000))
    path = path_impairment(reordering, _profile(0.010))
    assert (path.reorder, path.duplicate, path.delay_s) == (0.01, 0.02, 0.005 + 2 * 0.010)
    with pytest.raises(NetError, match="one hop only"):
        path_impairment(reordering, reordering)


def test_path_impairment_of_rate_only_links_is_none():
    assert path_impairment(_profile(), _profile()).is_none


def test_path_impairment_refuses_mixed_jitter_distributions():
    with pytest.raises(NetError, match="same jitter_distribution"):
        path_impairment(_profile(jitter_s=0.002, distribution="normal"), _profile(jitter_s=0.001))


def test_flows_must_have_distinct_names_and_ports():
    with pytest.raises(NetError, match="unique"):
        NodeLinks(CLOUD_IP, [AgentFlow("a0", 7300, MBIT), AgentFlow("a1", 7300, MBIT)],
                  queue_bytes=100_000)
    with pytest.raises(NetError, match="not a TCP port"):
        NodeLinks(CLOUD_IP, [AgentFlow("a0", 70000, MBIT)], queue_bytes=100_000)


class TwoNodes:
    """An edge node and the cloud node, each a namespace, joined by one veth."""

    def __init__(self):
        run = pid_run_id()
        self.netns = {"edge": f"rs-{run}-ne", "cloud": f"rs-{run}-nc"}
        self.ip = {"edge": EDGE_IP, "cloud": CLOUD_IP}
        iprs = {node: create_netns(ns) for node, ns in self.netns.items()}
        try:
            add_veth(iprs["edge"], f"rs-{run}-en", 2, self.netns["cloud"], f"rs-{run}-cn", 2)
            for node in ("edge", "cloud"):
                address_up(iprs[node], 2, self.ip[node])
        except BaseException:
            self.remove()
            raise
        finally:
            for ipr in iprs.values():
                ipr.close()
        self.edge_ifname = f"rs-{run}-en"

    def socket(self, node: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
        with in_netns(self.netns[node]):
            return socket.socket(socket.AF_INET, kind)

    def address(self, node: str) -> str:
        return self.ip[node]

    def root_qdisc_handles(self) -> list[int]:
        with in_netns(self.netns["edge"]), IPRoute() as ipr:
            return [q["handle"] for q in ipr.get_qdiscs(index=2) if q["parent"] == 0xFFFFFFFF]

    def remove(self) -> None:
        for ns in self.netns.values():
            if ns in netns.listnetns():
                netns.remove(ns)


@pytest.fixture
def nodes():
    pair = TwoNodes()
    yield pair
    pair.remove()


def _goodput_bps(flow: BulkFlow, seconds: float = 2.0) -> float:
    time.sleep(0.5)  # slow start and the HTB bucket's first burst
    start = time.monotonic()
    time.sleep(seconds)
    return flow.goodput_bps(start, time.monotonic())


def _links(nodes: TwoNodes, **kw) -> NodeLinks:
    flows = [AgentFlow("a0", 5201, 20 * MBIT), AgentFlow("a1", 5202, 5 * MBIT)]
    return NodeLinks(CLOUD_IP, flows, queue_bytes=200_000, netns=nodes.netns["edge"], **kw).build()


@root
def test_the_interface_is_the_one_the_kernel_routes_to_the_cloud_by(nodes):
    with in_netns(nodes.netns["edge"]), IPRoute() as ipr:
        assert egress_interface(ipr, CLOUD_IP) == (nodes.edge_ifname, 2, EDGE_IP)
        with pytest.raises(NetError, match="this node itself"):
            egress_interface(ipr, EDGE_IP)
        with pytest.raises(NetError, match="no route"):
            egress_interface(ipr, "fd00::1")


@root
def test_each_agent_gets_its_guarantee_and_other_traffic_is_not_shaped(nodes):
    links = _links(nodes)
    try:
        with BulkFlow(nodes, "edge", port=5201) as a0, BulkFlow(nodes, "edge", port=5202) as a1:
            time.sleep(0.5)
            start = time.monotonic()
            time.sleep(2.0)
            end = time.monotonic()
            rates = a0.goodput_bps(start, end), a1.goodput_bps(start, end)
        with BulkFlow(nodes, "edge", port=5203) as other:
            unshaped = _goodput_bps(other)
    finally:
        links.teardown()
    # TCP goodput of a class is its rate less headers: 1448 of 1514 bytes per frame.
    assert rates[0] == pytest.approx(20 * MBIT * 1448 / 1514, rel=0.08)
    assert rates[1] == pytest.approx(5 * MBIT * 1448 / 1514, rel=0.08)
    assert unshaped > 100 * MBIT, "traffic to other ports (Ray, ssh) must not be shaped"


@root
def test_a_share_change_takes_effect_live(nodes):
    links = _links(nodes)
    try:
        call_s = links.set_share("a1", 15 * MBIT)
        with BulkFlow(nodes, "edge", port=5202) as a1:
            rate = _goodput_bps(a1)
        with pytest.raises(NetError, match="not on this node"):
            links.set_share("a9", MBIT)
    finally:
        links.teardown()
    assert call_s < 0.05
    assert rate == pytest.approx(15 * MBIT * 1448 / 1514, rel=0.08)


@root
def test_borrowing_classes_may_reach_the_ceiling_but_not_beyond(nodes):
    links = _links(nodes, borrow=True, ceil_bps=10 * MBIT)
    try:
        with BulkFlow(nodes, "edge", port=5202) as a1:  # a0 idle: a1 borrows up to 10 Mbit/s
            rate = _goodput_bps(a1)
    finally:
        links.teardown()
    assert rate == pytest.approx(10 * MBIT * 1448 / 1514, rel=0.08)


@root
def test_records_name_interface_destination_and_mechanism(nodes):
    links = _links(nodes)
    try:
        rows = [r.as_row() for r in links.shaping()]
    finally:
        links.teardown()
    assert [(r["link"], r["rate_bps"], r["mechanisms"]) for r in rows] == [
        (f"{nodes.edge_ifname}->{CLOUD_IP}:5201[a0]", 20 * MBIT, "htb"),
        (f"{nodes.edge_ifname}->{CLOUD_IP}:5202[a1]", 5 * MBIT, "htb")]


@root
def test_teardown_removes_only_our_root_qdisc(nodes):
    before = nodes.root_qdisc_handles()
    links = _links(nodes)
    assert nodes.root_qdisc_handles() == [HTB_MAJOR << 16]
    links.teardown()
    assert nodes.root_qdisc_handles() == before
    assert HTB_MAJOR << 16 not in before


@root
def test_an_interface_with_a_root_qdisc_of_its_own_is_left_alone(nodes):
    with in_netns(nodes.netns["edge"]), IPRoute() as ipr:
        ipr.tc("add", "htb", index=2, handle=0x10000, default=1)
    with pytest.raises(NetError, match="cannot install HTB"):
        _links(nodes)
    assert nodes.root_qdisc_handles() == [0x10000]


@root
def test_delay_is_refused_on_a_real_interface_without_netem(nodes):
    if probe().netem:
        pytest.skip("this kernel has netem: test_netem_under_one_agents_class_* covers the delay")
    flows = [AgentFlow("a0", 5201, 20 * MBIT, Impairment(delay_s=0.02, jitter_distribution="uniform"))]
    links = NodeLinks(CLOUD_IP, flows, queue_bytes=200_000, netns=nodes.netns["edge"])
    with pytest.raises(CapabilityError, match="sch_netem"):
        links.build()
    assert nodes.root_qdisc_handles() != [HTB_MAJOR << 16]


@root
@pytest.mark.netem
def test_netem_under_one_agents_class_delays_that_agent_alone_and_teardown_spares_foreign_qdiscs(nodes):
    from ray_scout.net.netem import NetemParams, read_netem
    from ray_scout.net.traffic import udp_one_way_delays_s

    with in_netns(nodes.netns["cloud"]), IPRoute() as ipr:  # someone else's qdisc on the cloud node
        ipr.tc("add", "netem", index=2, handle=0x10000, params=NetemParams(1000, 0.001))
    # And on the edge node itself: a clsact on the very interface NodeLinks shapes, and a netem
    # at the root of another interface (as a node's own tc set-up would have them).
    with in_netns(nodes.netns["edge"]), IPRoute() as ipr:
        ipr.tc("add", "clsact", index=2)
        ipr.link("add", ifname="rs-other", kind="veth", peer="rs-other-p")
        other = ipr.link_lookup(ifname="rs-other")[0]
        ipr.tc("add", "netem", index=other, handle=0x10000, params=NetemParams(1000, 0.001))
    flows = [AgentFlow("a0", 5201, 20 * MBIT, Impairment(delay_s=0.02, loss=0.001)),
             AgentFlow("a1", 5202, 20 * MBIT)]
    links = NodeLinks(CLOUD_IP, flows, queue_bytes=200_000, netns=nodes.netns["edge"]).build()
    try:
        assert [r.mechanisms for r in links.shaping()] == [("htb", "netem"), ("htb",)]
        with in_netns(nodes.netns["edge"]), IPRoute() as ipr:
            (netem,) = read_netem(ipr, 2)
        assert netem.parent == links.classes["a0"].classid and netem.delay_s == 0.02
        # Agents are told apart by cloud port: a0's datagrams wait in netem, a1's do not. A timer
        # is never early: the earliest datagram shows netem's delay (the median adds TCG's lateness).
        plain = min(udp_one_way_delays_s(nodes, "edge", "cloud", port=5202, count=40))
        delayed = min(udp_one_way_delays_s(nodes, "edge", "cloud", port=5201, count=40))
    finally:
        links.teardown()
    assert delayed - plain == pytest.approx(0.020, abs=0.0005 + 0.02 * 0.020)
    assert nodes.root_qdisc_handles() != [HTB_MAJOR << 16]
    with in_netns(nodes.netns["cloud"]), IPRoute() as ipr:
        assert [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=2) if q["parent"] == 0xFFFFFFFF] == ["netem"]
    with in_netns(nodes.netns["edge"]), IPRoute() as ipr:
        assert "clsact" in {q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=2)}
        assert [(q.get_attr("TCA_KIND"), q["handle"]) for q in ipr.get_qdiscs(index=other)
                if q["parent"] == 0xFFFFFFFF] == [("netem", 0x10000)]


class TwoNodes6(TwoNodes):
    """The same two nodes, talking IPv6 (addresses without duplicate detection, usable at once)."""

    def __init__(self):
        super().__init__()
        self.ip = {"edge": EDGE_IP6, "cloud": CLOUD_IP6}
        for node, ns in self.netns.items():
            with in_netns(ns), IPRoute() as ipr:
                ipr.addr("add", index=2, address=self.ip[node], prefixlen=64, flags=IFA_F_NODAD)

    def socket(self, node: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
        with in_netns(self.netns[node]):
            return socket.socket(socket.AF_INET6, kind)


@pytest.fixture
def nodes6():
    pair = TwoNodes6()
    yield pair
    pair.remove()


@root
def test_ipv6_agents_get_their_own_classes_too(nodes6):
    flows = [AgentFlow("a0", 5201, 5 * MBIT), AgentFlow("a1", 5202, 20 * MBIT)]
    links = NodeLinks(CLOUD_IP6, flows, queue_bytes=100_000, netns=nodes6.netns["edge"]).build()
    try:
        with in_netns(nodes6.netns["edge"]), IPRoute() as ipr:
            filters = [f for f in ipr.get_filters(index=2, parent=HTB_MAJOR << 16) if f.get_attr("TCA_KIND") == "u32"]
        assert filters and {f["info"] & 0xFFFF for f in filters} == {socket.htons(0x86DD)}
        with BulkFlow(nodes6, "edge", port=5201) as a0:
            rate = _goodput_bps(a0)
    finally:
        links.teardown()
    # IPv6 carries 20 bytes more header than IPv4: 1428 payload bytes per 1514-byte frame.
    assert rate == pytest.approx(5 * MBIT * 1428 / 1514, rel=0.08)


@root
@pytest.mark.netem
def test_ipv6_agent_gets_its_netem_delay(nodes6):
    from ray_scout.net.traffic import udp_one_way_delays_s

    flows = [AgentFlow("a0", 5201, 20 * MBIT, Impairment(delay_s=0.02)), AgentFlow("a1", 5202, 20 * MBIT)]
    links = NodeLinks(CLOUD_IP6, flows, queue_bytes=100_000, netns=nodes6.netns["edge"]).build()
    try:
        plain = min(udp_one_way_delays_s(nodes6, "edge", "cloud", port=5202, count=40))
        delayed = min(udp_one_way_delays_s(nodes6, "edge", "cloud", port=5201, count=40))
    finally:
        links.teardown()
    assert delayed - plain == pytest.approx(0.020, abs=0.0005 + 0.02 * 0.020)


@root
def test_node_link_manager_applies_its_own_agents_share_of_a_whole_allocation(nodes):
    from concurrent.futures import ThreadPoolExecutor

    from ray_scout.actors.link_manager import NodeLinkManager
    from ray_scout.net.namespaces import enter_netns

    def on_the_edge_node():
        enter_netns(nodes.netns["edge"])  # this worker thread is the node's "root namespace"
        # a0, a1 live here; b0 on another node. The lab profile's access rate is 50 Mbit/s.
        manager = NodeLinkManager(CLOUD_IP, {"a0": 5201, "a1": 5202}, {"a0": "lab", "a1": "lab"},
                                  "lab", 100 * MBIT, {"a0": 30 * MBIT, "a1": 10 * MBIT, "b0": 60 * MBIT})
        try:
            first = {r["link"].rsplit("[", 1)[1][:-1]: r["rate_bps"] for r in manager.shaping()}
            manager.apply(120 * MBIT, {"a0": 80 * MBIT, "a1": 20 * MBIT, "b0": 20 * MBIT})
            changes = [(c["target"], c["rate_bps"], c["ceil_bps"]) for c in manager.changes()]
            return manager.node(), first, changes
        finally:
            manager.teardown()

    with ThreadPoolExecutor(1) as pool:
        node, first, changes = pool.submit(on_the_edge_node).result()
    assert node == {"interface": nodes.edge_ifname, "address": EDGE_IP, "cloud": CLOUD_IP}
    # HTB's minimum (8 kbit/s) comes off each guarantee first, so shares sit just below.
    assert first["a0"] == pytest.approx(30 * MBIT, rel=1e-3)
    assert first["a1"] == pytest.approx(10 * MBIT, rel=1e-3)
    assert [c[0] for c in changes] == ["a0", "a1"]
    assert changes[0][1] == 50 * MBIT, "a class never exceeds its agent's access rate"
    assert changes[1][1] == pytest.approx(20 * MBIT, rel=1e-3)
    assert all(rate == ceil for _, rate, ceil in changes), "no borrowing unless the spec asks"
    assert nodes.root_qdisc_handles() != [HTB_MAJOR << 16]
