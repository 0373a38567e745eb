"""A three-namespace line, a ↔ router ↔ b, for exercising the emulator on real packets.

The tests and ``bench/emulator_fidelity.py`` need the same small topology: two hosts and a
router that forwards between them, where an impairment is attached to the router's
interfaces. Names carry the pid and a counter so parallel runs never collide; addresses
(10.78.1.0/24 and 10.78.2.0/24) exist only inside these namespaces. The project's real
lab-in-a-box topology lives with the links code; this is the emulator's own test bench.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from pyroute2 import Ethtool, NetNS, netns

from ray_scout.net.emulator_ns import run_in_netns, write_sysctl

_lines = itertools.count()

# Without these a TCP sender hands the path 64 KB skbs, and a per-packet loss hook such as
# the eBPF one drops whole aggregates (the TUN path is unaffected: the kernel segments
# before handing packets to a TUN).
SEGMENTATION_FEATURES = (
    "tx-tcp-segmentation", "tx-tcp6-segmentation", "tx-tcp-ecn-segmentation",
    "tx-tcp-mangleid-segmentation", "tx-tcp-accecn-segmentation", "tx-generic-segmentation",
)


def disable_segmentation_offload(netns_name: str, ifname: str) -> None:
    """Turn TSO/GSO off on ``ifname`` so that every skb leaving it is one MTU-sized packet."""

    def apply() -> None:
        with Ethtool() as ethtool:
            features = ethtool.get_features(ifname)
            for name in SEGMENTATION_FEATURES:
                if name in features.features:
                    features.features[name].enable = False
            ethtool.set_features(ifname, features)

    run_in_netns(netns_name, apply)


@dataclass(frozen=True)
class LineAddresses:
    a: str = "10.78.1.1"
    router_a: str = "10.78.1.2"
    router_b: str = "10.78.2.2"
    b: str = "10.78.2.1"
    prefixlen: int = 24


class EmulatorLine:
    """Namespaces ``ns_a``, ``ns_router``, ``ns_b``; router interfaces ``router_a``/``router_b``.

    Packets from a to b arrive on the router at ``router_a`` and leave through ``router_b``.
    Use as a context manager; ``close`` removes the namespaces and everything in them.
    ``segmentation_offload=False`` turns TSO/GSO off on all four veth ends.
    """

    iface_a = "rs-a0"
    router_a = "rs-ra"
    router_b = "rs-rb"
    iface_b = "rs-b0"

    def __init__(self, *, segmentation_offload: bool = True) -> None:
        self.segmentation_offload = segmentation_offload
        tag = f"{os.getpid():x}-{next(_lines)}"
        self.ns_a = f"rs-la-{tag}"
        self.ns_router = f"rs-lr-{tag}"
        self.ns_b = f"rs-lb-{tag}"
        self.addresses = LineAddresses()
        self._created: list[str] = []

    def __enter__(self) -> "EmulatorLine":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError("building namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)")
        for name in (self.ns_a, self.ns_router, self.ns_b):
            netns.create(name)
            self._created.append(name)
        ad = self.addresses
        with NetNS(self.ns_router) as r:
            for local, peer, peer_ns in (
                (self.router_a, self.iface_a, self.ns_a),
                (self.router_b, self.iface_b, self.ns_b),
            ):
                r.link("add", ifname=local, kind="veth", peer=peer)
                r.link("set", index=r.link_lookup(ifname=peer)[0], net_ns_fd=peer_ns)
            for ifname, address in ((self.router_a, ad.router_a), (self.router_b, ad.router_b)):
                index = r.link_lookup(ifname=ifname)[0]
                r.addr("add", index=index, address=address, prefixlen=ad.prefixlen)
                r.link("set", index=index, state="up")
            r.link("set", index=r.link_lookup(ifname="lo")[0], state="up")
        for ns_name, ifname, address, gateway in (
            (self.ns_a, self.iface_a, ad.a, ad.router_a),
            (self.ns_b, self.iface_b, ad.b, ad.router_b),
        ):
            with NetNS(ns_name) as h:
                index = h.link_lookup(ifname=ifname)[0]
                h.addr("add", index=index, address=address, prefixlen=ad.prefixlen)
                h.link("set", index=index, state="up")
                h.link("set", index=h.link_lookup(ifname="lo")[0], state="up")
                h.route("add", dst="0.0.0.0/0", gateway=gateway)
        run_in_netns(self.ns_router, lambda: write_sysctl(("net", "ipv4", "ip_forward"), "1"))
        if not self.segmentation_offload:
            for ns_name, ifname in (
                (self.ns_a, self.iface_a), (self.ns_router, self.router_a),
                (self.ns_router, self.router_b), (self.ns_b, self.iface_b),
            ):
                disable_segmentation_offload(ns_name, ifname)

    def limit_rate(self, rate_bps: int, iface: str | None = None) -> None:
        """Root HTB with one default class at ``rate_bps`` on a router interface (default: toward b).

        Just enough shaping for the emulator bench; the project's shaping API is elsewhere.
        """
        ifname = iface or self.router_b
        rate = f"{int(rate_bps)}bit"
        # One MTU of quantum; HTB would otherwise derive it from the rate and clamp it.
        with NetNS(self.ns_router) as r:
            index = r.link_lookup(ifname=ifname)[0]
            r.tc("add", "htb", index=index, handle="1:", default=0x10)
            r.tc(
                "add-class", "htb", index=index, handle="1:10", parent="1:",
                rate=rate, ceil=rate, burst=max(1600, rate_bps // 8 // 1000), quantum=1514,
            )

    def close(self) -> None:
        """Remove the namespaces this line created (veths and qdiscs go with them)."""
        while self._created:
            name = self._created.pop()
            if name in netns.listnetns():
                netns.remove(name)
