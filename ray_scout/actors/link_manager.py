"""Link managers: the one actor per node that owns its shaped links (and the only one needing root).

What lives here: ``LinkManager`` builds the lab-in-a-box topology from link profiles (every
agent in its own namespace behind one emulated bottleneck, all on one machine);
``NodeLinkManager`` shapes one lab node's real interface toward the cloud node, one class per
agent on that node. Both apply a capacity and an allocation in one call (so the two never
disagree), log every change with its wall-clock time and netlink call time, and tear down.
What they leave to others: deciding rates (``Allocator``), when capacity changes (the
allocator's clock reads the trace), and traffic (agents, cloud).

Why the trace is not replayed on its own timer thread here: every capacity change must be
followed by a new allocation, and an allocation must fit the capacity in force; applying both
from the allocator's epoch loop keeps them consistent. ``HtbShaper.set_rate`` resets every
leaf's ceil to the new link rate, so the shares are re-applied after each capacity change.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping

from ray_scout.net.errors import NetError
from ray_scout.net.node_links import AgentFlow, NodeLinks, path_impairment
from ray_scout.net.profiles import (
    DEFAULT_MTU, MIN_RATE_BPS, Impairment, LinkProfile, load_profile,
)
from ray_scout.net.shaping import NetemBackend
from ray_scout.net.topology import (
    AUTO, CLOUD_ADDRESS, EMULATOR_REALTIME_PRIORITY, LabTopology,
)


def impairment_backend(name: str):
    """The topology's impairment backend for a spec's choice (auto, netem, tun, none).

    ``auto`` leaves the pick to the topology: netem where the probe finds it, the TUN
    emulator otherwise, and none at all when no profile asks for delay, jitter or loss.
    """
    if name == "auto":
        return AUTO
    if name == "none":
        return None
    if name == "netem":
        return NetemBackend()
    if name == "tun":
        from ray_scout.net.backends import TunEmulatorBackend

        return TunEmulatorBackend(realtime_priority=EMULATOR_REALTIME_PRIORITY)
    raise NetError(f"unknown impairment backend {name!r}; use auto, netem, tun or none")


def access_profile(name: str, rate_bps: float | None) -> LinkProfile:
    """The access profile ``name``, both directions at ``rate_bps`` if the spec overrides it."""
    profile = load_profile(name)
    return profile if rate_bps is None else profile.with_rate(int(rate_bps))


def split_for_htb(capacity_bps: float, rates_bps: Mapping[str, float]) -> dict[str, int]:
    """Integer guarantees HTB accepts (>= 8 kbit/s each) that still sum to <= capacity.

    An allocator may give an agent 0 (it plans ``local``); HTB needs a positive rate, so every
    agent gets the minimum and the rest of the capacity is scaled into what is left.
    """
    n = len(rates_bps)
    spare = capacity_bps - MIN_RATE_BPS * n
    if spare < 0:
        raise NetError(f"{capacity_bps:.0f} bit/s cannot give {n} agents HTB's minimum "
                       f"{MIN_RATE_BPS} bit/s each")
    total = sum(rates_bps.values())
    scale = spare / capacity_bps if total <= capacity_bps else spare / total
    return {a: int(MIN_RATE_BPS + r * scale) for a, r in rates_bps.items()}


@dataclasses.dataclass(frozen=True)
class LinkChange:
    """One applied change: the bottleneck's rate or one agent's guarantee (and ceil)."""

    wall_time_s: float
    target: str  # 'bottleneck' or an agent's name
    rate_bps: int
    ceil_bps: int
    call_s: float


class _ChangeLog:
    """What every link manager keeps: each applied change, for the ``rate_changes`` table."""

    def __init__(self) -> None:
        self.log: list[LinkChange] = []

    def record(self, target: str, rate_bps: int, ceil_bps: int, call_s: float) -> None:
        self.log.append(LinkChange(time.time(), target, rate_bps, ceil_bps, call_s))

    def changes(self) -> list[dict]:
        """The changes since the last call (one trial's, when a testbed runs several)."""
        taken, self.log = self.log, []
        return [dataclasses.asdict(c) for c in taken]


class LinkManager(_ChangeLog):
    """Owns a ``LabTopology``; built in the constructor, removed by ``teardown``.

    ``access`` maps each agent's name to its access profile; agent i in that order sits on
    the topology's edge ``e<i>``.
    """

    def __init__(self, access: Mapping[str, str], bottleneck: str, capacity_bps: float, *,
                 run_id: str, impairment: str = "auto", borrow: bool = False,
                 access_rate_bps: float | None = None, site_size: int = 1):
        profiles = [access_profile(a, access_rate_bps) for a in access.values()]
        neck = load_profile(bottleneck)
        neck = dataclasses.replace(neck, up=dataclasses.replace(neck.up,
                                                               rate_bps=int(capacity_bps)))
        self.borrow = borrow
        self.topology = LabTopology(profiles, neck, impairment=impairment_backend(impairment),
                                    run_id=run_id, site_size=site_size).build()
        self.edge_of = {name: e.name for name, e in zip(access, self.topology.edges)}
        self.capacity_bps = int(capacity_bps)
        self.applied: dict[str, tuple[int, int]] = {}  # agent -> (rate, ceil) in the kernel
        super().__init__()

    def addresses(self) -> dict:
        """Each agent's (address, namespace) and the cloud's; build and teardown seconds."""
        topo = self.topology
        return {"cloud": (CLOUD_ADDRESS, topo.cloud_netns),
                **{name: (topo.edge(e).address, topo.edge(e).netns)
                   for name, e in self.edge_of.items()}}

    def apply(self, capacity_bps: float, rates_bps: Mapping[str, float]) -> float:
        """Set the bottleneck to ``capacity_bps`` and each agent's guarantee; returns call s."""
        topo, total = self.topology, 0.0
        capacity = int(max(capacity_bps, MIN_RATE_BPS * (len(rates_bps) + 1)))
        if capacity != self.capacity_bps:
            call = topo.bottleneck_up.set_rate(capacity)  # resets every class's ceil
            self.record("bottleneck", capacity, capacity, call)
            self.capacity_bps, total = capacity, total + call
            self.applied.clear()
        moved = {}
        for agent, rate in split_for_htb(capacity, rates_bps).items():
            ceil = capacity if self.borrow else rate
            if self.applied.get(agent) != (rate, ceil):  # touch only the classes that move
                moved[agent] = (rate, ceil)
        # One netlink batch for the whole split: each change's call time is the batch's share.
        call = topo.set_shares({self.edge_of[a]: pair for a, pair in moved.items()})
        for agent, (rate, ceil) in moved.items():
            self.record(agent, rate, ceil, call / len(moved))
            self.applied[agent] = (rate, ceil)
        return total + call

    def shaping(self) -> list[dict]:
        return [r.as_row() for r in self.topology.shaping()]

    def teardown(self) -> float:
        self.topology.teardown()
        return self.topology.teardown_s


class NodeLinkManager(_ChangeLog):
    """Owns a ``NodeLinks`` on this node: a class per agent of ``ports`` (agent -> cloud port).

    On a cluster there is no one bottleneck link to shape: each node's classes enforce its
    agents' grants, and the grants sum to the capacity. ``apply`` takes the whole allocation
    (every node gets the same call) and sets the classes of this node's agents; each class is
    also capped at its agent's access rate. ``borrow`` lets this node's classes lend each
    other spare rate up to the capacity; agents on different nodes cannot borrow.
    """

    def __init__(self, cloud_address: str, ports: Mapping[str, int], access: Mapping[str, str],
                 bottleneck: str, capacity_bps: float, rates_bps: Mapping[str, float], *,
                 impairment: str = "auto", borrow: bool = False,
                 access_rate_bps: float | None = None):
        if impairment == "tun":
            raise NetError("the TUN emulator cannot act on a lab node's real interface (it steers "
                           "by destination, and every agent and Ray share the cloud node's); use "
                           "impairment netem, auto or none")
        neck = load_profile(bottleneck)
        profiles = {name: access_profile(access[name], access_rate_bps) for name in ports}
        small = sorted({p.name for p in profiles.values() if p.mtu != DEFAULT_MTU})
        if small:
            raise NetError(f"access profiles {small} set an mtu: only the lab-in-a-box sets an "
                           "access link's MTU (on a lab node it is the NIC's); drop mtu there")
        self.access_bps = {name: profiles[name].up.rate_bps for name in ports}
        split = self._split(capacity_bps, rates_bps)
        flows = [AgentFlow(name, port, split[name],
                           Impairment() if impairment == "none"
                           else path_impairment(profiles[name], neck))
                 for name, port in ports.items()]
        self.links = NodeLinks(cloud_address, flows, queue_bytes=neck.up.queue_bytes, borrow=borrow,
                               ceil_bps=int(capacity_bps)).build()
        super().__init__()

    def _split(self, capacity_bps: float, rates_bps: Mapping[str, float]) -> dict[str, int]:
        split = split_for_htb(capacity_bps, rates_bps)
        return {name: min(split[name], self.access_bps[name]) for name in self.access_bps}

    def node(self) -> dict:
        """Where this manager shapes: interface, its source address, the cloud's address."""
        links = self.links
        return {"interface": links.ifname, "address": links.source, "cloud": links.cloud_address}

    def apply(self, capacity_bps: float, rates_bps: Mapping[str, float]) -> float:
        """This node's agents' classes for a whole allocation; returns netlink call seconds."""
        capacity = int(max(capacity_bps, MIN_RATE_BPS * (len(rates_bps) + 1)))
        self.links.set_ceiling(capacity)
        total = 0.0
        for agent, rate in self._split(capacity, rates_bps).items():
            call = self.links.set_share(agent, rate)
            leaf = self.links.classes[agent]
            self.record(agent, leaf.rate_bps, leaf.ceil_bps, call)
            total += call
        return total

    def shaping(self) -> list[dict]:
        return [r.as_row() for r in self.links.shaping()]

    def teardown(self) -> float:
        return self.links.teardown()
