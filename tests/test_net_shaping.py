import os

import pytest
from pyroute2 import netns

from ray_scout.net.errors import CapabilityError, NetError
from ray_scout.net.profiles import Impairment
from ray_scout.net.shaping import HtbShaper, Match, classid, htb_class_params

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_NET_ADMIN) for namespaces and qdiscs")


@pytest.fixture
def veth():
    from ray_scout.net.namespaces import create_netns

    name = f"rs-t{os.getpid():x}-shape"
    ipr = create_netns(name)  # in a thread, no fork: a forked pytest must never run on
    try:
        ipr.link("add", ifname="rs-a", kind="veth", peer="rs-b")
        ipr.link("set", index=ipr.link_lookup(ifname="rs-a")[0], state="up")
        yield ipr, name
    finally:
        ipr.close()
        netns.remove(name)


def test_change_class_params_resend_everything_with_explicit_quantum():
    params = htb_class_params(35_000_000, 50_000_000)
    assert set(params) == {"rate", "ceil", "quantum", "burst", "cburst"}
    assert params["rate"] == 35_000_000 // 8 and params["quantum"] == 35_000_000 // 8 // 100


def test_ceil_below_rate_is_rejected():
    with pytest.raises(NetError, match="ceil"):
        htb_class_params(20_000_000, 10_000_000)


def test_u32_keys_for_address_and_port():
    assert Match(src="10.77.1.2", dport=5201).u32_keys() == ["0x0a4d0102/0xffffffff+12", "0x00001451/0x0000ffff+20"]
    with pytest.raises(NetError):
        Match().u32_keys()


def test_u32_keys_for_ipv6_address_prefix_and_port():
    keys = Match(dst="fd79::2", dport=5201).u32_keys()
    assert keys == ["0xfd790000/0xffffffff+24", "0x00000000/0xffffffff+28", "0x00000000/0xffffffff+32",
                    "0x00000002/0xffffffff+36", "0x00001451/0x0000ffff+40"]
    assert Match(src="fd00:1::/32").u32_keys() == ["0xfd000001/0xffffffff+8"]
    assert Match(dst="fd79::2").protocol == 0x86DD and Match(dst="10.0.0.1").protocol == 0x0800
    with pytest.raises(NetError, match="one IP version"):
        Match(src="10.0.0.1", dst="fd79::2").u32_keys()


@root
def test_live_rate_change_is_what_the_kernel_holds(veth):
    ipr, ns = veth
    shaper = HtbShaper(ipr, "rs-a", 50_000_000, 100_000, netns=ns, per_class=True)
    shaper.install()
    leaf = shaper.add_class("agent", 35_000_000, Match(src="10.77.1.2"))
    assert shaper.read_rates_bps()[classid(0x10)] == 35_000_000
    call_s = leaf.set_rate(15_000_000)
    assert shaper.read_rates_bps()[classid(0x10)] == 15_000_000
    assert call_s < 0.05  # the figure (<= 2 ms) is measured by bench/links_figures.py


@root
def test_missing_interface_says_so(veth):
    ipr, ns = veth
    with pytest.raises(NetError, match="not found"):
        HtbShaper(ipr, "rs-nope", 10_000_000, 100_000, netns=ns).install()


@root
def test_impairment_without_backend_explains_what_to_do(veth):
    ipr, ns = veth
    shaper = HtbShaper(ipr, "rs-a", 10_000_000, 100_000, netns=ns)
    default = shaper.install()
    with pytest.raises(CapabilityError, match="impairment backend"):
        shaper.impair(default, Impairment(delay_s=0.02), None)


@root
def test_pluggable_backend_is_called_and_recorded(veth):
    ipr, ns = veth
    calls = []

    class FakeEmulator:
        mechanism = "tun-emulator"

        def apply(self, ipr, port, impairment):
            calls.append((port.ifname, port.classid, port.peer, impairment.delay_s))

    shaper = HtbShaper(ipr, "rs-a", 10_000_000, 100_000, netns=ns)
    default = shaper.install()
    shaper.impair(default, Impairment(delay_s=0.02), FakeEmulator(), "10.77.1.2", "10.77.1.1")
    assert calls == [("rs-a", classid(2), "10.77.1.1", 0.02)]
    assert shaper.record(default, "e0.up").mechanisms == ("htb", "tun-emulator")


@root
def test_single_class_link_changes_rate_in_one_call_and_refuses_extra_classes(veth):
    ipr, ns = veth
    shaper = HtbShaper(ipr, "rs-a", 10_000_000, 100_000, netns=ns)
    shaper.install()
    shaper.set_rate(50_000_000)
    assert shaper.read_rates_bps() == {classid(2): 50_000_000}
    with pytest.raises(NetError, match="per_class=True"):
        shaper.add_class("agent", 1_000_000, Match(src="10.77.1.2"))


def _class_params(shaper) -> dict:
    """Every HTB class's parameters as the kernel holds them, by classid."""
    from ray_scout.net.namespaces import in_netns

    with in_netns(shaper.netns):
        classes = shaper.ipr.get_classes(index=shaper.ifindex)
    out = {}
    for msg in classes:
        parms = msg.get_nested("TCA_OPTIONS", "TCA_HTB_PARMS")
        if parms is not None:
            out[msg["handle"]] = {k: parms[k] for k in
                                  ("rate", "ceil", "buffer", "cbuffer", "quantum")}
    return out


@root
def test_a_batch_of_class_changes_sets_what_pyroute2_sets_class_by_class(veth):
    ipr, ns = veth
    shaper = HtbShaper(ipr, "rs-a", 9_000_000_000, 100_000, netns=ns, per_class=True)
    shaper.install()
    leaves = [shaper.add_class(f"a{i}", 1_000_000, Match(src=f"10.77.1.{i + 2}"))
              for i in range(40)]
    wanted = [(leaf, 100_000 + 37_000 * i, 2_000_000 + 50_000 * i) for i, leaf in
              enumerate(leaves[:20])] + [(leaves[20], 1_000_000, 8_500_000_000)]
    assert shaper.set_class_rates(wanted) < 1.0
    batched = _class_params(shaper)
    for leaf, rate, ceil in wanted:
        shaper.set_class_rate(leaf, rate, ceil)  # pyroute2's own message, one at a time
    assert _class_params(shaper) == batched
    assert batched[leaves[20].classid]["ceil"] == 8_500_000_000 // 8
    assert shaper.read_rates_bps()[leaves[3].classid] == 100_000 + 37_000 * 3
    assert [leaf.rate_bps for leaf, _, _ in wanted[:3]] == [100_000, 137_000, 174_000]


@root
def test_a_batch_names_the_class_the_kernel_refused(veth):
    from ray_scout.net import htb_batch

    ipr, ns = veth
    shaper = HtbShaper(ipr, "rs-a", 50_000_000, 100_000, netns=ns, per_class=True)
    shaper.install()
    shaper.add_class("a", 1_000_000, Match(src="10.77.1.2"))
    missing = htb_batch.ClassChange(shaper.ifindex, classid(0x7777), classid(1), 1000, 1000,
                                    1000, 3000, 3000)
    with pytest.raises(NetError, match=f"{classid(0) >> 16:x}:7777"):
        htb_batch.apply(ns, [missing])
