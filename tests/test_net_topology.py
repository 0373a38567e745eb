import os
import time

import pytest
from pyroute2 import netns

from ray_scout.net.cleanup import cleanup, find_leftovers
from ray_scout.net.errors import NetError
from ray_scout.net.probe import probe
from ray_scout.net.profiles import load_profile
from ray_scout.net.topology import LabTopology, pid_run_id
from ray_scout.net.traffic import BulkFlow

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_NET_ADMIN) for namespaces")
LAB = load_profile("lab")


def test_probe_finds_htb_and_leaves_nothing():
    caps = probe()
    assert caps.htb and "cubic" in caps.congestion_controls
    assert not [n for n in netns.listnetns() if n == f"rs-probe-{os.getpid()}"]
    assert ("no sch_netem" in caps.summary()) == (not caps.netem)


def test_tcp_goodput_matches_the_layer2_ideal_and_teardown_leaves_nothing():
    run = pid_run_id()
    with LabTopology([LAB.with_rate(10_000_000)], LAB, run_id=run) as topo:
        with BulkFlow(topo, "e0") as flow:
            t0 = time.monotonic()
            time.sleep(2.5)
        ratio = flow.goodput_bps(t0 + 0.5, t0 + 2.5) / 10_000_000
        records = {r.link: r for r in topo.shaping()}
    # 3%: this host runs other jobs; bench/links_figures.py measures the 2% figure over 4 s.
    assert ratio == pytest.approx(1448 / 1514, rel=0.03), ratio
    assert records["e0.up"].mechanisms == ("htb",) and records["e0.up"].offloads_off
    assert records["e0.up"].congestion_control == "cubic"
    assert find_leftovers(f"rs-{run}-").empty


def test_a_small_mtu_access_link_delivers_its_payload_share_of_the_grant():
    # netem/lab_mtu200.yaml: frames of 214 B carry 148 B of TCP payload, and the agent's
    # class on the bottleneck counts every one, so its grant delivers 0.72 of what it
    # delivers to a 1500-byte link (the simulator's link_share for it). The topology sets
    # the MTU on both ends of the access veth and records it.
    run = pid_run_id()
    small = load_profile("lab_mtu200")
    assert small.payload_share == pytest.approx((148 / 214) / (1448 / 1514))
    with LabTopology([small], LAB.with_rate(10_000_000), run_id=run) as topo:
        mtus = {ns: topo._iprs[ns].get_links(index)[0].get_attr("IFLA_MTU")
                for ns, index in ((f"rs-{run}-e0", 2), (f"rs-{run}-bs", 10))}
        with BulkFlow(topo, "e0") as flow:
            t0 = time.monotonic()
            time.sleep(2.5)
        ratio = flow.goodput_bps(t0 + 0.5, t0 + 2.5) / 10_000_000
        records = {r.link: r for r in topo.shaping()}
    assert mtus == {f"rs-{run}-e0": 200, f"rs-{run}-bs": 200}
    assert ratio == pytest.approx(148 / 214, rel=0.03), ratio
    assert records["e0.up"].mtu == records["e0.down"].mtu == 200
    assert records["bottleneck.up[e0]"].mtu == 1500
    assert find_leftovers(f"rs-{run}-").empty


def test_agents_sharing_a_site_must_share_its_mtu():
    with pytest.raises(NetError, match=r"site 0 have access profiles of MTUs \[200, 1500\]"):
        LabTopology([load_profile("lab_mtu200"), LAB], LAB, run_id=pid_run_id(), site_size=2)


def test_per_agent_share_change_and_name_clash():
    run = pid_run_id()
    with LabTopology([LAB] * 2, LAB, shares_bps=[35_000_000, 15_000_000], run_id=run) as topo:
        assert topo.set_share("e1", 20_000_000) < 0.05
        assert topo.shares["e1"].rate_bps == 20_000_000
        with pytest.raises(NetError, match="belongs to a live process"):
            LabTopology([LAB], LAB, run_id=run).build()
        with pytest.raises(NetError, match="no edge"):
            topo.set_share("e9", 1_000_000)
    assert find_leftovers(f"rs-{run}-").empty


def test_failed_build_removes_what_it_made():
    run = pid_run_id()
    with pytest.raises(NetError, match="not available"):
        LabTopology([LAB], LAB, run_id=run, congestion_control="no-such-cc").build()
    assert find_leftovers(f"rs-{run}-").empty


def test_a_failed_build_surfaces_its_cause_even_when_the_cleanup_fails_too(monkeypatch):
    # Issue 17, defect 7: the cleanup's error replaced the cause of the failure.
    run = pid_run_id()
    real_remove = netns.remove

    def refuse(name):
        raise OSError(16, f"cleanup refused {name}")

    with monkeypatch.context() as patch:
        patch.setattr("ray_scout.net.topology.netns.remove", refuse)
        with pytest.raises(NetError, match="not available") as caught:
            LabTopology([LAB], LAB, run_id=run, congestion_control="no-such-cc").build()
    assert any("cleaning up after it also failed" in note and "cleanup refused" in note
               for note in caught.value.__notes__)
    for name in find_leftovers(f"rs-{run}-").namespaces:
        real_remove(name)
    assert find_leftovers(f"rs-{run}-").empty


def test_impaired_profile_without_netem_or_backend_fails_clearly():
    if probe().netem:
        pytest.skip("this kernel has netem; the no-backend error is for kernels without it")
    run = pid_run_id()
    with pytest.raises(NetError, match="impairment backend"):
        LabTopology([load_profile("lte")], LAB, impairment=None, run_id=run).build()
    assert find_leftovers(f"rs-{run}-").empty


def test_cleanup_removes_only_its_prefix():
    run = pid_run_id()
    mine, other = f"rs-{run}-x", f"rs-{run}z-y"
    from ray_scout.net.namespaces import create_netns

    for name in (mine, other):
        create_netns(name).close()
    try:
        removed = cleanup(f"rs-{run}-")
        assert removed.namespaces == (mine,)
        assert other in netns.listnetns() and mine not in netns.listnetns()
    finally:
        for name in (mine, other):
            if name in netns.listnetns():
                netns.remove(name)


def test_cli_probe_and_dry_run_cleanup(capsys):
    from ray_scout.cli import main

    assert main(["net", "probe"]) == 0
    assert "htb" in capsys.readouterr().out
    assert main(["net", "cleanup", "--dry-run", "--prefix", f"rs-{pid_run_id()}-"]) == 0
    assert capsys.readouterr().out.startswith("found: 0 namespaces")


def test_trace_replay_drives_the_kernel_rate_and_logs_it():
    from dataclasses import dataclass

    from ray_scout.net.replay import TraceReplay

    @dataclass
    class Trace:
        segments: list

    run = pid_run_id()
    with LabTopology([LAB], LAB, run_id=run) as topo:
        link = topo.uplinks["e0"]
        replay = TraceReplay(link, Trace([(0.0, 5e6), (0.05, 25e6)])).start()
        replay.join(2)
        assert [c.applied_bps for c in replay.log] == [5e6, 25e6]
        assert set(link.read_rates_bps().values()) == {25_000_000}


def test_allocation_above_capacity_is_refused():
    run = pid_run_id()
    with LabTopology([LAB] * 2, LAB, run_id=run) as topo:
        with pytest.raises(NetError, match="scale them down"):
            topo.set_shares({"e0": 40_000_000, "e1": 20_000_000})
        topo.set_shares({"e0": 30_000_000, "e1": 20_000_000})
        assert topo.shares["e0"].rate_bps == 30_000_000


def test_ctrl_c_inside_the_topology_still_tears_it_down():
    run = pid_run_id()
    with pytest.raises(KeyboardInterrupt):
        with LabTopology([LAB], LAB, run_id=run):
            raise KeyboardInterrupt
    assert find_leftovers(f"rs-{run}-").empty


def _class_bytes(shaper) -> dict[int, int]:
    from ray_scout.net.namespaces import in_netns

    with in_netns(shaper.netns):
        classes = shaper.ipr.get_classes(index=shaper.ifindex)
    return {m["handle"]: m.get_attr("TCA_STATS")["bytes"] for m in classes}


def test_agents_sharing_a_site_keep_their_own_access_and_bottleneck_classes():
    import threading

    from ray_scout.transport.netns import socket_in_netns

    run = pid_run_id()
    with LabTopology([LAB.with_rate(20_000_000)] * 3, LAB, run_id=run, site_size=2) as topo:
        assert topo.sites == [f"rs-{run}-s0", f"rs-{run}-s1"]
        assert [(e.netns, e.address) for e in topo.edges] == [
            (f"rs-{run}-s0", "10.77.1.2"), (f"rs-{run}-s0", "10.77.1.3"),
            (f"rs-{run}-s1", "10.77.2.2")]
        server = topo.socket("cloud")
        server.bind(("10.77.0.2", 0))
        server.listen()
        received = []

        def drain():
            conn, _ = server.accept()
            while chunk := conn.recv(1 << 16):
                received.append(len(chunk))

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        e1 = topo.edge("e1")
        client = socket_in_netns(e1.netns)
        client.bind((e1.address, 0))  # the site's second address: its own classes match it
        client.connect(server.getsockname())
        client.sendall(b"x" * 300_000)
        client.close()
        reader.join(10)
        server.close()
        neck = _class_bytes(topo.bottleneck_up)
        site_up = _class_bytes(topo.uplinks["e1"])
        assert sum(received) == 300_000
        assert neck[topo.shares["e1"].classid] > 300_000 > neck[topo.shares["e0"].classid]
        leaf = topo.uplinks["e1"].classes["e1"]
        assert site_up[leaf.classid] > 300_000 > site_up[topo.uplinks["e0"].classes["e0"].classid]
        assert leaf.rate_bps == leaf.ceil_bps == 20_000_000  # its access link's rate, alone
    assert find_leftovers(f"rs-{run}-").empty


def test_sites_refuse_access_impairments_the_tun_emulator_cannot_split():
    from ray_scout.net.backends import TunEmulatorBackend

    run = pid_run_id()
    with pytest.raises(NetError, match="only from netem"):
        LabTopology([load_profile("lte")] * 2, LAB, run_id=run, site_size=2,
                    impairment=TunEmulatorBackend()).build()
    assert find_leftovers(f"rs-{run}-").empty
