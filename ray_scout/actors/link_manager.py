"""LinkManager: the one actor per node that owns its shaped links (and the only one needing root).

What lives here: building the lab topology from link profiles, applying a capacity and an
allocation to the bottleneck in one call (so the two never disagree), logging every change
with its wall-clock time and netlink call time, and tearing down. What it leaves to others:
deciding rates (``Allocator``), when capacity changes (the allocator's clock reads the trace),
and traffic (agents, cloud).

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
from ray_scout.net.profiles import MIN_RATE_BPS, LinkProfile, load_profile
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


def with_rate(profile: LinkProfile, rate_bps: float | None) -> LinkProfile:
    """``profile`` with both directions at ``rate_bps`` (None: as it is)."""
    if rate_bps is None:
        return profile
    return dataclasses.replace(profile, up=dataclasses.replace(profile.up, rate_bps=int(rate_bps)),
                               down=dataclasses.replace(profile.down, rate_bps=int(rate_bps)))


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


class LinkManager:
    """Owns a ``LabTopology``; built in the constructor, removed by ``teardown``.

    ``access`` maps each agent's name to its access profile; agent i in that order sits on
    the topology's edge ``e<i>``.
    """

    def __init__(self, access: Mapping[str, str], bottleneck: str, capacity_bps: float, *,
                 run_id: str, impairment: str = "auto", borrow: bool = False,
                 access_rate_bps: float | None = None):
        profiles = [with_rate(load_profile(a), access_rate_bps) for a in access.values()]
        neck = load_profile(bottleneck)
        neck = dataclasses.replace(neck, up=dataclasses.replace(neck.up,
                                                               rate_bps=int(capacity_bps)))
        self.borrow = borrow
        self.topology = LabTopology(profiles, neck, impairment=impairment_backend(impairment),
                                    run_id=run_id).build()
        self.edge_of = {name: e.name for name, e in zip(access, self.topology.edges)}
        self.capacity_bps = int(capacity_bps)
        self.log: list[LinkChange] = []

    def addresses(self) -> dict:
        topo = self.topology
        return {"cloud": (CLOUD_ADDRESS, topo.cloud_netns),
                **{name: (topo.edge(e).address, topo.edge(e).netns)
                   for name, e in self.edge_of.items()}}

    def apply(self, capacity_bps: float, rates_bps: Mapping[str, float]) -> float:
        """Set the bottleneck to ``capacity_bps`` and each agent's guarantee; returns call s."""
        topo, total = self.topology, 0.0
        capacity = int(max(capacity_bps, MIN_RATE_BPS * (len(rates_bps) + 1)))
        if capacity != self.capacity_bps:
            call = topo.bottleneck_up.set_rate(capacity)
            self.log.append(LinkChange(time.time(), "bottleneck", capacity, capacity, call))
            self.capacity_bps, total = capacity, total + call
        for agent, rate in split_for_htb(capacity, rates_bps).items():
            ceil = capacity if self.borrow else rate
            call = topo.set_share(self.edge_of[agent], rate, ceil)
            self.log.append(LinkChange(time.time(), agent, rate, ceil, call))
            total += call
        return total

    def shaping(self) -> list[dict]:
        return [r.as_row() for r in self.topology.shaping()]

    def changes(self) -> list[dict]:
        return [dataclasses.asdict(c) for c in self.log]

    def teardown(self) -> float:
        self.topology.teardown()
        return self.topology.teardown_s
