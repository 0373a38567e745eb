"""NodeLinks: a lab node's real interface toward the cloud node, one shaped class per agent.

What lives here: finding the interface a node's packets to the cloud node leave by (the
kernel's own route lookup), HTB on that interface's egress with one leaf per agent, selected
by the cloud's address and the agent's own cloud port (u32 on dst address + dst port, on the
IPv4 or the IPv6 header, whichever the cloud's address is), netem
under a leaf where the kernel has it, live share changes, a record per agent, and removing
exactly the root qdisc it installed. Traffic it does not select (ssh, Ray's own control and
object traffic, ARP) takes the default class at the interface's rate, so shaping an agent
never slows the cluster. What it leaves to others: the lab-in-a-box topology of namespaces
(``topology``), which rates to set (the allocator), which port each agent talks to (the
experiment runner), and the cloud node's downlink (answers are a few hundred bytes).

Delay, jitter and loss on a real interface come from netem only: the TUN emulator steers by
destination prefix in a router namespace, and on a lab node every agent and Ray itself share
one destination. On a kernel without sch_netem a link that asks for them is refused.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ray_scout.net.errors import NETEM_MISSING, CapabilityError, NetError, require_root
from ray_scout.net.namespaces import in_netns
from ray_scout.net.profiles import Impairment, LinkProfile, check_rate_bps
from ray_scout.net.shaping import HtbShaper, LeafClass, LinkShaping, Match, NetemBackend

# What the default class (everything but the agents' flows) may use where the interface does
# not say its speed (veth, many virtual NICs report none).
DEFAULT_INTERFACE_RATE_BPS = 10_000_000_000


def path_impairment(access: LinkProfile, bottleneck: LinkProfile) -> Impairment:
    """One impairment for the whole edge -> cloud path, applied on the edge's egress.

    The lab-in-a-box puts each hop and direction on its own link. A lab node has one place to
    act, its egress, so the round trip's delays add up there (TCP sees the same RTT; the one-way
    split differs), independent jitters add in quadrature, and losses of the two uplink hops
    compound (ACK loss on the downlinks is not modelled).
    """
    hops = (access.up, access.down, bottleneck.up, bottleneck.down)
    jitters = [d.impairment for d in hops if d.impairment.jitter_s]
    distributions = {i.jitter_distribution for i in jitters}
    if len(distributions) > 1:
        raise NetError(f"the path's hops jitter with different distributions {sorted(distributions)}; "
                       "give access and bottleneck profiles the same jitter_distribution")
    survive = (1 - access.up.impairment.loss) * (1 - bottleneck.up.impairment.loss)
    # What does not add up across hops (burst loss, correlation, duplication, reordering,
    # corruption) may come from one hop only, and burst loss not beside another hop's loss.
    special = [d.impairment for d in hops
               if d.impairment.beyond_delay_and_loss or d.impairment.gilbert_elliott is not None]
    if len(special) > 1 or (special and special[0].gilbert_elliott is not None and survive != 1):
        raise NetError("on a lab node the path's hops become one netem: give burst loss, delay correlation, "
                       "duplicate, reorder or corrupt on one hop only (and burst loss without random loss "
                       "on the other hop)")
    extra = special[0] if special else Impairment()
    return Impairment(delay_s=sum(d.impairment.delay_s for d in hops),
                      jitter_s=math.sqrt(sum(i.jitter_s ** 2 for i in jitters)),
                      jitter_distribution=jitters[0].jitter_distribution if jitters else "normal",
                      loss=1 - survive, delay_correlation=extra.delay_correlation,
                      gilbert_elliott=extra.gilbert_elliott, duplicate=extra.duplicate, reorder=extra.reorder,
                      corrupt=extra.corrupt)


@dataclass(frozen=True)
class AgentFlow:
    """One agent on this node: its name, the cloud port it sends to, its first guarantee."""

    name: str
    cloud_port: int
    rate_bps: int
    impairment: Impairment = Impairment()


def egress_interface(ipr: IPRoute, destination: str) -> tuple[str, int, str]:
    """(interface name, ifindex, source address) the kernel routes ``destination`` by."""
    try:
        address = ipaddress.ip_address(destination)
    except ValueError:
        raise NetError(f"{destination!r} is not an IP address; give the cloud node's address") from None
    try:
        routes = ipr.route("get", dst=destination,
                           family=socket.AF_INET6 if address.version == 6 else socket.AF_INET)
    except NetlinkError:  # unreachable: the kernel answers with an error, not an empty list
        routes = []
    if not routes:
        raise NetError(f"no route to {destination} from this node; check `ip route get {destination}`")
    index = routes[0].get_attr("RTA_OIF")
    source = routes[0].get_attr("RTA_PREFSRC")
    name = ipr.get_links(index)[0].get_attr("IFLA_IFNAME")
    if name == "lo":
        raise NetError(f"{destination} is this node itself: there is no link to shape. Put agents on "
                       "edge nodes other than the cloud node, or run the lab-in-a-box (no --address)")
    return name, index, source


def interface_rate_bps(ifname: str) -> int:
    """The interface's speed from sysfs (Mbit/s there), or the default where it says none."""
    try:
        mbit = int(Path(f"/sys/class/net/{ifname}/speed").read_text())
    except (OSError, ValueError):
        mbit = -1
    return mbit * 1_000_000 if mbit > 0 else DEFAULT_INTERFACE_RATE_BPS


class NodeLinks:
    """Build with ``NodeLinks(...).build()``; ``teardown`` removes what ``build`` installed.

    ``ceil_bps`` caps every agent's class (the bottleneck's capacity when agents may borrow
    spare rate from each other on this node; without borrowing each class's ceil is its own
    guarantee). ``netns`` runs everything in a named namespace (tests; a real node: None).
    """

    def __init__(self, cloud_address: str, flows: Sequence[AgentFlow], *, queue_bytes: int,
                 borrow: bool = False, ceil_bps: int | None = None, netns: str | None = None):
        if not flows:
            raise NetError("NodeLinks needs at least one agent flow")
        names = [f.name for f in flows]
        ports = [f.cloud_port for f in flows]
        if len(set(names)) != len(names) or len(set(ports)) != len(ports):
            raise NetError(f"agents and their cloud ports must be unique on a node; got "
                           f"{list(zip(names, ports))}")
        for flow in flows:
            check_rate_bps(flow.rate_bps)
            if not 0 < flow.cloud_port < 65536:
                raise NetError(f"{flow.name}: cloud port {flow.cloud_port} is not a TCP port")
        self.cloud_address = cloud_address
        self.flows = {f.name: f for f in flows}
        self.queue_bytes = queue_bytes
        self.borrow = borrow
        self.ceil_bps = ceil_bps
        self.netns = netns
        self.ifname = ""
        self.source = ""
        self.shaper: HtbShaper | None = None
        self.installed = False  # our root qdisc is on the interface (teardown removes only that)
        self.classes: dict[str, LeafClass] = {}
        self._ipr: IPRoute | None = None

    def build(self) -> NodeLinks:
        require_root()
        impaired = [f for f in self.flows.values() if not f.impairment.is_none]
        backend = NetemBackend() if impaired else None
        if impaired:
            from ray_scout.net.probe import probe

            if not probe().netem:
                raise CapabilityError(
                    f"agents {[f.name for f in impaired]} ask for delay/jitter/loss on this node's real "
                    f"interface, which only netem can add there; {NETEM_MISSING}. Load sch_netem, or "
                    "use rate-only profiles (netem/lab.yaml), or set network.impairment: none")
        with in_netns(self.netns):
            self._ipr = IPRoute()
            try:
                self.ifname, index, self.source = egress_interface(self._ipr, self.cloud_address)
                self.shaper = HtbShaper(self._ipr, self.ifname, interface_rate_bps(self.ifname),
                                        self.queue_bytes, netns=self.netns, per_class=True, ifindex=index)
                self.shaper.install()
                self.installed = True
                for flow in self.flows.values():
                    leaf = self.shaper.add_class(flow.name, flow.rate_bps,
                                                 Match(dst=self.cloud_address, dport=flow.cloud_port),
                                                 ceil_bps=self._ceil(flow.rate_bps))
                    self.shaper.impair(leaf, flow.impairment, backend)
                    self.classes[flow.name] = leaf
            except BaseException:
                self.teardown()
                raise
        return self

    def _ceil(self, rate_bps: float) -> int:
        if self.borrow and self.ceil_bps is not None:
            return int(max(self.ceil_bps, rate_bps))
        return int(rate_bps)

    def set_share(self, agent: str, rate_bps: float, ceil_bps: float | None = None) -> float:
        """The allocator's call for one agent on this node; returns the netlink call seconds."""
        if agent not in self.classes:
            raise NetError(f"agent {agent!r} is not on this node; its agents are {list(self.classes)}")
        return self.classes[agent].set_rate(rate_bps, self._ceil(rate_bps) if ceil_bps is None else ceil_bps)

    def set_ceiling(self, ceil_bps: int) -> None:
        """A new bottleneck capacity: the cap that borrowing classes may reach."""
        self.ceil_bps = int(ceil_bps)

    def shaping(self) -> list[LinkShaping]:
        """One record per agent: its class on this node's interface, rates as in force now."""
        return [self.shaper.record(leaf, f"{self.ifname}->{self.cloud_address}:"
                                         f"{self.flows[name].cloud_port}[{name}]")
                for name, leaf in self.classes.items()]

    def teardown(self) -> float:
        """Remove the root qdisc this object installed (classes, filters, netem go with it)."""
        start = time.perf_counter()
        try:
            if self.installed:
                try:
                    self.shaper.remove()
                except Exception as error:  # noqa: BLE001 - reported with the fix below
                    raise NetError(f"could not remove HTB from {self.ifname}: {error}; run "
                                   "`python3 -m ray_scout.cli net cleanup` on this node") from error
        finally:
            self.installed = False
            self.classes.clear()
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None
        return time.perf_counter() - start
