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

from pyroute2 import IPRoute, netns

from ray_scout.net.errors import require_root
from ray_scout.net.namespaces import (add_veth, address_up, create_netns, in_netns,
                                      offloads_off, write_sysctl)
from ray_scout.net.profiles import FRAME_BYTES
from ray_scout.net.shaping import HtbShaper

_lines = itertools.count()
HOST_INDEX = 2  # ifindex of the one veth in a or b (lo is 1)
ROUTER_A_INDEX, ROUTER_B_INDEX = 2, 3
# What the pfifo under an HTB class held before (the veth's txqueuelen): 1000 frames.
DEFAULT_QUEUE_BYTES = 1000 * FRAME_BYTES


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
    ``segmentation_offload=False`` turns TSO/GSO (and GRO) off on all four veth ends.
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
        self._iprs: dict[str, IPRoute] = {}

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
        require_root()
        for name in (self.ns_a, self.ns_router, self.ns_b):
            self._iprs[name] = create_netns(name)
        ad, r = self.addresses, self._iprs[self.ns_router]
        for local, index, address, peer, peer_ns, peer_address, gateway in (
            (self.router_a, ROUTER_A_INDEX, ad.router_a, self.iface_a, self.ns_a, ad.a, ad.router_a),
            (self.router_b, ROUTER_B_INDEX, ad.router_b, self.iface_b, self.ns_b, ad.b, ad.router_b),
        ):
            add_veth(r, local, index, peer_ns, peer, HOST_INDEX)
            address_up(r, index, address, ad.prefixlen)
            host = self._iprs[peer_ns]
            address_up(host, HOST_INDEX, peer_address, ad.prefixlen)
            host.route("add", dst="0.0.0.0/0", gateway=gateway)
        with in_netns(self.ns_router):
            write_sysctl("net/ipv4/ip_forward", "1")
        if not self.segmentation_offload:
            for ns_name, ifnames in ((self.ns_a, [self.iface_a]), (self.ns_router, [self.router_a, self.router_b]),
                                     (self.ns_b, [self.iface_b])):
                with in_netns(ns_name):
                    offloads_off(ifnames)

    def limit_rate(self, rate_bps: int, iface: str | None = None,
                   queue_bytes: int = DEFAULT_QUEUE_BYTES) -> HtbShaper:
        """HTB at ``rate_bps`` (one class) on a router interface (default: toward b)."""
        ifname = iface or self.router_b
        if ifname not in (self.router_a, self.router_b):
            raise ValueError(f"limit_rate shapes a router interface: {self.router_a!r} or {self.router_b!r}")
        shaper = HtbShaper(self._iprs[self.ns_router], ifname, int(rate_bps), queue_bytes, netns=self.ns_router,
                           ifindex=ROUTER_A_INDEX if ifname == self.router_a else ROUTER_B_INDEX)
        shaper.install()
        return shaper

    def close(self) -> None:
        """Remove the namespaces this line created (veths and qdiscs go with them)."""
        existing = set(netns.listnetns())
        while self._iprs:
            name, ipr = self._iprs.popitem()
            ipr.close()
            if name in existing:
                netns.remove(name)
