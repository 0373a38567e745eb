"""Allocator: the epoch loop that splits the bottleneck among the agents.

What lives here: the clock of a run's capacity (ticks every ``epoch_s`` and at every change
time of the trace), gathering the agents' demands, ``core.control.allocation.allocate``,
applying the result through the link managers (one call each, all at once: one per lab node,
or the lab-in-a-box's one), telling every agent its grant, and one
``epochs`` row per agent each time the split is applied (capacity, rate, planned mode,
decision and netlink call times). Demands are
each agent's typical request (median context), gathered once; only their delivered share of
the grant changes during a run. The split moves when the capacity changes or, every ``FEEDBACK_EVERY_S``, when an
agent's link turns out to deliver a different share of its grant than planned with (closed
loop: ``core.control.allocation.delivered_ratio`` over its latest transfers, and
``core.control.allocation.share_from_hits`` over its latest requests sent, hit or miss, both read
from the recorder; the spec's ``closed_loop`` picks both, the first alone or neither); the
links and agents are touched only when the split changes. What it leaves to others: the
strategies (core), shaping (the link managers).
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any

from ray_scout.core.control.allocation import (
    HIT_FEEDBACK_REQUESTS, HitShares, Outcome, allocate, check_closed_loop, closed_loop_demands,
)
from ray_scout.core.control.capacity import CapacityTrace
from ray_scout.core.modes import Mode

# Closed loop: how often the allocator reads the finished requests, and how many of an
# agent's latest transfers tell it what the agent's link delivers of its grant (its
# latest requests sent: ``HIT_FEEDBACK_REQUESTS``).
FEEDBACK_EVERY_S = 1.0
FEEDBACK_TRANSFERS = 5


# What the edge and the transport say of a deadline that passed before the first byte:
# such a request never reached the link, and the simulator does not weigh it either.
_BEFORE_THE_WIRE = ("during edge compute", "to connect", "while connecting", "was sent")


def sent_outcome(row: dict) -> Outcome | None:
    """A finished request's row as the hit loop weighs it, if its payload went on the wire:
    not a local answer, not expired or failed before the send (the simulator counts the
    same requests)."""
    error = str(row.get("error", ""))
    if (row.get("outcome") not in ("hit", "miss") or not row.get("mode")
            or not row.get("payload_bytes") or row.get("grant_bps") is None
            or any(marker in error for marker in _BEFORE_THE_WIRE)):
        return None
    mode = Mode(row["mode"])
    if mode == Mode.LOCAL:
        return None
    return Outcome(mode, int(row["payload_bytes"]), float(row["grant_bps"]),
                   bool(row.get("deadline_met")))


def tick_times(trace: CapacityTrace, epoch_s: float, duration_s: float) -> list[float]:
    """Epoch ticks (k x epoch_s, no float drift) merged with the trace's change times."""
    ticks = {round(k * epoch_s, 9) for k in range(int(duration_s / epoch_s) + 1)}
    ticks |= {t for t in trace.change_times_s if t < duration_s}
    return sorted(ticks)


class Allocator:
    """``run(t0)`` drives capacity and allocation until ``duration_s``; rows go to the recorder."""

    def __init__(self, strategy: str, trace: CapacityTrace, epoch_s: float, duration_s: float,
                 hosts: list[Any], link_managers: list[Any], recorder: Any,
                 objective: str = "expected_hits", closed_loop: str = "hits"):
        from ray.util import metrics

        if epoch_s <= 0:
            raise ValueError(f"epoch_s must be positive, not {epoch_s}")
        check_closed_loop(closed_loop)
        self.strategy = strategy
        self.objective = objective
        self.closed_loop = closed_loop  # core.control.allocation.CLOSED_LOOPS
        self.trace = trace
        self.epoch_s = epoch_s
        self.duration_s = duration_s
        self.hosts = hosts  # edge hosts: each answers and takes its agents' share at once
        self.link_managers = link_managers
        self.recorder = recorder
        self.capacity_bps: float | None = None
        self.last_split_t_s: float | None = None
        self.capacity_gauge = metrics.Gauge("ray_scout_allocator_capacity_bps",
                                            "bottleneck capacity in force, bit/s",
                                            tag_keys=("strategy",))
        self.objective_gauge = metrics.Gauge("ray_scout_allocator_objective",
                                             "sum of planned expected quality",
                                             tag_keys=("strategy",))

    def __repr__(self) -> str:
        """The allocator in a few words (Ray's Actors table shows it as the actor starts;
        the actor's log has a line per applied split)."""
        if self.last_split_t_s is None:
            return f"Allocator {self.strategy}: no split yet"
        return (f"Allocator {self.strategy}: {self.capacity_bps / 1e6:.1f} Mbit/s split at "
                f"t={self.last_split_t_s:.1f} s")

    def run(self, t0_unix_s: float) -> int:
        import ray

        demands = [d for by_agent in ray.get([h.demands.remote() for h in self.hosts])
                   for d in by_agent.values()]
        names = [d.agent_id for d in demands]
        transfers = {name: collections.deque(maxlen=FEEDBACK_TRANSFERS) for name in names}
        outcomes = {name: collections.deque(maxlen=HIT_FEEDBACK_REQUESTS) for name in names}
        hit_shares = HitShares()
        seen, next_feedback = 0, FEEDBACK_EVERY_S
        last: dict[str, float] | None = None
        last_capacity = None
        epochs = 0
        ticks = list(tick_times(self.trace, self.epoch_s, self.duration_s))
        # After a restart (Ray retries this task on the new process) the past is not
        # replayed: the split starts from the tick in force now, so links stuck at the old
        # process's last split (an outage's, say) are set right at once.
        past = sum(t0_unix_s + t <= time.time() for t in ticks)
        for t in ticks[max(past - 1, 0):]:
            wait = t0_unix_s + t - time.time()
            if wait > 0:
                time.sleep(wait)
            capacity = self.trace.rate_at(t)
            changed = capacity != last_capacity
            if t >= next_feedback:
                next_feedback += FEEDBACK_EVERY_S
                rows = ray.get(self.recorder.since.remote("requests", seen))
                seen += len(rows)
                for row in rows:
                    size, tx_s, grant = (row.get(k) for k in ("payload_bytes", "tx_s",
                                                              "grant_bps"))
                    if row.get("agent") in transfers and None not in (size, tx_s, grant) \
                            and math.isfinite(tx_s):
                        transfers[row["agent"]].append((size, tx_s, grant))
                    sent = sent_outcome(row) if row.get("agent") in outcomes else None
                    if sent is not None:
                        outcomes[row["agent"]].append(sent)
                corrected = closed_loop_demands(demands, transfers, outcomes,
                                                self.closed_loop, hit_shares)
                changed |= corrected != demands  # a delivered_ratio moved
                demands = corrected
            decide_start = time.perf_counter()
            alloc = (allocate(self.strategy, demands, capacity, self.objective)
                     if changed or last is None else None)
            decide_s = time.perf_counter() - decide_start
            apply_s = 0.0
            if alloc is not None and (dict(alloc.rate_bps) != last or changed):
                # The managers run in parallel: the split is in force after the slowest one.
                apply_s = max(ray.get([m.apply.remote(capacity, dict(alloc.rate_bps))
                                       for m in self.link_managers]))
                for host in self.hosts:
                    host.set_grants.remote(dict(alloc.rate_bps))
                last, last_capacity = dict(alloc.rate_bps), capacity
                self.capacity_bps, self.last_split_t_s = capacity, t
                print(repr(self), flush=True)
                self.capacity_gauge.set(capacity, tags={"strategy": self.strategy})
                self.objective_gauge.set(alloc.objective, tags={"strategy": self.strategy})
                ratio = {d.agent_id: d.delivered_ratio for d in demands}
                rows = [dict(t_s=t, wall_time_s=time.time(), agent=name, capacity_bps=capacity,
                             strategy=alloc.strategy, rate_bps=alloc.rate_bps[name],
                             planned_mode=alloc.mode[name].value, objective=alloc.objective,
                             delivered_ratio=ratio[name], decide_s=decide_s, apply_s=apply_s)
                        for name in names]
                self.recorder.add_many.remote("epochs", rows)
            epochs += 1
        return epochs
