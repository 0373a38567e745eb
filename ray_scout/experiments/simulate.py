"""Discrete-event simulation of many edge agents sharing one bottleneck (fidelity "simulated").

What lives here: Poisson request arrivals per agent, the same policy, estimator and allocator
objects the testbed runs, epoch-based allocation (every ``epoch_s`` and at every capacity
change), agents that serve one request at a time in arrival order as the testbed's EdgeAgent
does (a request waits in its agent's FIFO, is decided on the time left when the agent takes
it, holds the agent until its answer arrives or its deadline passes, and expires unsent if
it waited past its deadline), and a fluid network: an agent's transfer moves at the
allocator's grant (a hard cap, as an HTB class without borrowing) or, with no allocator, a
max-min fair share of the bottleneck; both capped by the agent's access link, and of that
rate the payload gets ``SimConfig.delivered_ratio`` (HTB shapes whole frames) times the
agent's ``AgentSpec.link_share`` (a link worse than the others). The allocator closes its
loop as the testbed's does: each agent's delivered ratio from its latest transfers and its
``share_from_hits`` from its latest requests sent (``core.control.allocation``).

What it models and what it does not (review critique 2.3 asks for the list): RTT is paid
once per request and cloud queue and compute are the latency model's constants; scout pays
its cloud re-prefill through the latency model. Not modelled: loss, retransmission, TCP slow
start and congestion control inside the fluid share, cloud contention between agents.
Transfers still running at their deadline are cancelled, as the testbed's data plane does.

Output: two tidy tables. ``requests``: one row per request (agent, t_arrival_s,
context_tokens, mode, bandwidth_estimate_bps, payload_bytes, agent_queue_s, edge_s, tx_s, rtt_s,
cloud_queue_s, cloud_s, latency_s, deadline_s, deadline_met, cancelled, quality, reason).
``epochs``: one row per (epoch, agent): t_s, agent, capacity_bps, strategy, rate_bps,
planned_mode, objective. ``quality`` is the profile's expected quality of the mode when the
deadline is met and 0 when it is missed (NaN when the profile does not know the mode).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from ray_scout.core.control.allocation import (
    HIT_FEEDBACK_REQUESTS, HitShares, Outcome, allocate, check_closed_loop, closed_loop_demands,
    demand_for,
)
from ray_scout.core.control.capacity import CapacityTrace
from ray_scout.core.control.estimators import GrantEstimator, make_estimator
from ray_scout.core.modes import Mode
from ray_scout.core.control.policy import (
    PAPER_B_PAYLOAD_BYTES, LatencyModel, Policy, PolicyInput, QualityProfile, paper_b_latency,
    paper_b_profile,
)

PayloadFn = Callable[[int], Mapping[Mode, int]]
# How many of an agent's latest transfers tell the allocator what its link delivers.
FEEDBACK_TRANSFERS = 5


class SimulationError(ValueError):
    """A simulation configuration that cannot run."""


@dataclasses.dataclass(frozen=True)
class AgentSpec:
    """One edge agent: its workload, what its payloads weigh and how good each mode is.

    ``payload_bytes`` maps a request's context length (tokens, drawn uniformly from
    ``context_tokens``) to bytes per mode: give the codec's ``payload_size_bytes`` here, or
    ``linear_payloads`` over measured sizes.
    """

    agent_id: str
    arrival_rate_hz: float
    deadline_s: float
    payload_bytes: PayloadFn
    quality: QualityProfile
    latency: LatencyModel
    context_tokens: tuple[int, ...] = (1,)
    access_rate_bps: float = math.inf
    weight: float = 1.0
    # (arrival s, context tokens) to replay instead of drawing Poisson arrivals: the testbed's
    # seeded schedule, so a simulated run is paired request by request with an emulated one.
    schedule: tuple[tuple[float, int], ...] | None = None
    # The share of its rate this agent's link delivers, on top of ``SimConfig.delivered_ratio``
    # (1: as the others; 0.7: a link that delivers 70% of its grant, which the allocator
    # does not know).
    link_share: float = 1.0


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """A simulated experiment. ``policy`` is one object for all agents or one per agent id.

    ``allocator``: a strategy name of ``allocation.allocate`` or None for fair sharing.
    ``estimator``: grant, last, ewma or robust (measured throughput of finished transfers),
    with ``estimator_options`` passed on (``alpha`` for ewma, ``window`` for robust).
    ``objective``: the allocation objective (``allocation.OBJECTIVES``).
    ``delivered_ratio``: payload bits a link delivers per bit of its rate (1: a fluid link;
    a shaped Ethernet link delivers TCP payload only, ``net.profiles.TCP_PAYLOAD_PER_FRAME``).
    ``closed_loop``: what the allocator corrects each agent's demand from
    (``allocation.closed_loop_demands``): ``hits``, its latest hits as well as its delivered
    rate; ``delivered_rate``, the delivered rate alone (the earlier loop); ``off``, nothing.
    """

    agents: tuple[AgentSpec, ...]
    capacity: CapacityTrace
    policy: Policy | Mapping[str, Policy]
    allocator: str | None = "equal"
    estimator: str = "grant"
    estimator_options: Mapping[str, float] = dataclasses.field(default_factory=dict)
    epoch_s: float = 0.1
    duration_s: float | None = None
    seed: int = 0
    objective: str = "expected_hits"
    delivered_ratio: float = 1.0
    closed_loop: str = "hits"


def linear_payloads(reference_bytes: Mapping[Mode, int], reference_tokens: int) -> PayloadFn:
    """Payload sizes scaled linearly in tokens from sizes measured at ``reference_tokens``.

    KV grows linearly with context and scout's index list with the number selected, so
    linear scaling is exact up to the constant headers, which this ignores.
    """
    if reference_tokens <= 0:
        raise SimulationError("reference_tokens must be positive")
    ref = dict(reference_bytes)

    def sizes(tokens: int) -> dict[Mode, int]:
        return {m: int(round(b * tokens / reference_tokens)) for m, b in ref.items()}

    return sizes


def paper_b_agent(agent_id: str, arrival_rate_hz: float = 1.0, deadline_s: float = 1.0,
                  pair: str = "7b-14b", rtt_s: float = 0.0) -> AgentSpec:
    """An agent with Paper B's published payloads, quality and stage times (Qwen2.5-7B)."""
    return AgentSpec(agent_id, arrival_rate_hz, deadline_s,
                     linear_payloads(PAPER_B_PAYLOAD_BYTES, 1), paper_b_profile(pair),
                     paper_b_latency(rtt_s))


def _median_length(lengths: tuple[int, ...]) -> int:
    """One of the lengths (the upper median), so the payload function knows its size."""
    return sorted(lengths)[len(lengths) // 2]


def _max_min_share(capacity_bps: float, caps: dict[str, float]) -> dict[str, float]:
    """Water-filling: equal shares, with agents capped by their access link giving back."""
    share, left, todo = {}, capacity_bps, dict(caps)
    while todo:
        fair = left / len(todo)
        capped = {a: c for a, c in todo.items() if c <= fair}
        if not capped:
            share.update({a: fair for a in todo})
            break
        for a, c in capped.items():
            share[a] = c
            left -= c
            del todo[a]
    return share


@dataclasses.dataclass
class _Request:
    rid: int
    agent: AgentSpec
    t_arrival: float
    tokens: int
    mode: Mode = Mode.LOCAL
    payload: int = 0
    estimate_bps: float = math.nan
    reason: str = ""
    t_start: float = math.nan
    remaining: float = 0.0  # bytes still to send, as of ``t_rate``
    rate_bps: float = 0.0  # the transfer's rate since ``t_rate`` (allocated runs)
    t_rate: float = 0.0
    version: int = 0  # bumped when its rate changes: older completion events are stale
    t_tx_start: float = math.nan
    grant_bps: float = math.nan  # the agent's grant when its transfer started
    tx_s: float = math.nan
    done: bool = False


class _Sim:
    def __init__(self, cfg: SimConfig):
        if not cfg.agents:
            raise SimulationError("a simulation needs at least one agent")
        if cfg.epoch_s <= 0:
            raise SimulationError(f"epoch_s must be positive, not {cfg.epoch_s}")
        if not 0 < cfg.delivered_ratio <= 1:
            raise SimulationError(f"delivered_ratio must lie in (0, 1], not "
                                  f"{cfg.delivered_ratio}")
        check_closed_loop(cfg.closed_loop)
        for a in cfg.agents:
            if not 0 < a.link_share <= 1:
                raise SimulationError(f"agent {a.agent_id}: link_share must lie in (0, 1], "
                                      f"not {a.link_share}")
        self.cfg = cfg
        self.duration = cfg.capacity.duration_s if cfg.duration_s is None else cfg.duration_s
        self.agents = {a.agent_id: a for a in cfg.agents}
        if len(self.agents) != len(cfg.agents):
            raise SimulationError("agent ids must be unique")
        if isinstance(cfg.policy, Mapping):
            missing = set(self.agents) - set(cfg.policy)
            if missing:
                raise SimulationError(f"no policy for agents {sorted(missing)}")
        self.rng = np.random.default_rng(cfg.seed)
        first_share = cfg.capacity.rate_at(0.0) / len(cfg.agents)
        self.estimators = {a: make_estimator(cfg.estimator, min(first_share, s.access_rate_bps),
                                             **cfg.estimator_options)
                           for a, s in self.agents.items()}
        self.grant = {a: math.inf for a in self.agents}
        # An agent reports its typical request (median context) in the modes its policy can
        # send, its arrival rate and its policy's margin once: demands do not track
        # individual requests, so they stay fixed and only the capacity moves the split.
        self.demands = [
            demand_for(s.agent_id, s.payload_bytes(_median_length(s.context_tokens)), s.quality,
                       s.latency, s.deadline_s, s.weight, arrival_rate_hz=s.arrival_rate_hz,
                       safety_margin=self.policy_for(s.agent_id).safety_margin,
                       modes=self.policy_for(s.agent_id).choices,
                       guards_next_arrival=self.policy_for(s.agent_id).guards_next_arrival)
            for s in cfg.agents]
        # Closed loop: each agent's recent transfers (bytes, wire seconds, grant), from which
        # the allocator learns what its link delivers of the grant (``delivered_ratio``).
        self.transfers = {a: collections.deque(maxlen=FEEDBACK_TRANSFERS) for a in self.agents}
        # ... and its latest finished requests that went on the wire, hit or miss.
        self.outcomes = {a: collections.deque(maxlen=HIT_FEEDBACK_REQUESTS) for a in self.agents}
        self.hit_shares = HitShares()
        self.heap: list = []
        self.seq = 0
        # One request at a time per agent, the rest wait in its FIFO (as the EdgeAgent).
        self.queue: dict[str, collections.deque[_Request]] = {
            a: collections.deque() for a in self.agents}
        self.busy: dict[str, _Request | None] = {a: None for a in self.agents}
        # Transfers on the wire, by request id. With an allocator each moves at its agent's
        # grant alone (a hard cap), so its last byte is an event, rescheduled only when that
        # grant changes: the run costs O(events), not O(events x transfers), which is what
        # takes a cell to 100,000 agents. Fair sharing couples every transfer's rate to the
        # others', so there the fluid steps from event to event over all of them.
        self.active: dict[int, _Request] = {}
        self.outstanding = 0
        self.next_rid = -1
        self.rows: list[dict] = []
        self.epoch_rows: list[dict] = []

    def push(self, t: float, kind: str, item=None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, item))

    def policy_for(self, agent_id: str) -> Policy:
        p = self.cfg.policy
        return p[agent_id] if isinstance(p, Mapping) else p

    # --- network -------------------------------------------------------------------------
    def rates(self, t: float) -> dict[int, float]:
        """Each transfer's payload rate: its agent has at most one on the wire, at its whole
        share, of which the link delivers ``delivered_ratio`` as payload."""
        ratio = self.cfg.delivered_ratio
        if self.cfg.allocator is None:
            caps = {r.agent.agent_id: r.agent.access_rate_bps for r in self.active.values()}
            share = _max_min_share(self.cfg.capacity.rate_at(t), caps)
            return {r.rid: share[r.agent.agent_id] * ratio * r.agent.link_share
                    for r in self.active.values()}
        return {r.rid: self.rate(r.agent.agent_id) for r in self.active.values()}

    def rate(self, agent_id: str) -> float:
        """An agent's payload rate under an allocator: its grant, capped by its access, of
        which the link delivers ``delivered_ratio`` and the agent's ``link_share``."""
        spec = self.agents[agent_id]
        return (min(self.grant[agent_id], spec.access_rate_bps) * self.cfg.delivered_ratio
                * spec.link_share)

    def move(self, t: float, req: _Request, rate_bps: float) -> None:
        """Allocated runs: bring ``req``'s bytes up to ``t`` and go on at ``rate_bps``, its
        last byte scheduled at that rate (an older schedule goes stale)."""
        req.remaining = max(0.0, req.remaining - req.rate_bps * (t - req.t_rate) / 8)
        req.rate_bps, req.t_rate = rate_bps, t
        req.version += 1
        if rate_bps > 0:
            self.push(t + req.remaining * 8 / rate_bps, "tx_done", (req, req.version))

    def tx_done(self, t: float, item: tuple[_Request, int]) -> None:
        req, version = item
        if version != req.version or self.active.pop(req.rid, None) is None:
            return  # rescheduled since, or cut off at its deadline
        req.remaining = 0.0
        self.transferred(t, req)

    def epoch(self, t: float) -> None:
        capacity = self.cfg.capacity.rate_at(t)
        if self.cfg.allocator is None:
            share = _max_min_share(capacity, {a: s.access_rate_bps
                                              for a, s in self.agents.items()})
            for a, rate in share.items():
                self.grant[a] = rate
                self.epoch_rows.append(dict(t_s=t, agent=a, capacity_bps=capacity,
                                            strategy="fair", rate_bps=rate,
                                            planned_mode="", objective=math.nan,
                                            delivered_ratio=math.nan))
        else:
            self.demands = closed_loop_demands(self.demands, self.transfers, self.outcomes,
                                               self.cfg.closed_loop, self.hit_shares)
            alloc = allocate(self.cfg.allocator, self.demands, capacity, self.cfg.objective)
            ratio = {d.agent_id: d.delivered_ratio for d in self.demands}
            for a in self.agents:
                self.grant[a] = alloc.rate_bps[a]
                self.epoch_rows.append(dict(t_s=t, agent=a, capacity_bps=capacity,
                                            strategy=alloc.strategy, rate_bps=alloc.rate_bps[a],
                                            planned_mode=alloc.mode[a].value,
                                            objective=alloc.objective,
                                            delivered_ratio=ratio[a]))
            for req in list(self.active.values()):
                rate = self.rate(req.agent.agent_id)
                if rate != req.rate_bps:
                    self.move(t, req, rate)
        for a, est in self.estimators.items():
            if isinstance(est, GrantEstimator):
                est.set_grant(min(self.grant[a], self.agents[a].access_rate_bps))

    # --- requests ------------------------------------------------------------------------
    def arrive(self, t: float, item: tuple[AgentSpec, int | None]) -> None:
        spec, tokens = item
        self.next_rid += 1
        self.outstanding += 1
        if tokens is None:
            tokens = int(self.rng.choice(spec.context_tokens))
        self.queue[spec.agent_id].append(_Request(self.next_rid, spec, t, tokens))
        if self.busy[spec.agent_id] is None:
            self.start_next(t, spec.agent_id)

    def start_next(self, t: float, agent_id: str) -> None:
        """The agent takes queued requests in arrival order until one keeps it busy."""
        queue = self.queue[agent_id]
        while queue and self.busy[agent_id] is None:
            self.start(t, queue.popleft())

    def start(self, t: float, req: _Request) -> None:
        spec = req.agent
        sizes = spec.payload_bytes(req.tokens)
        left = spec.deadline_s - (t - req.t_arrival)
        req.t_start = t
        req.estimate_bps = self.estimators[spec.agent_id].estimate(t)
        waiting = tuple(spec.deadline_s - (t - r.t_arrival) for r in self.queue[spec.agent_id])
        decision = self.policy_for(spec.agent_id).decide(
            PolicyInput(req.estimate_bps, max(left, 0.0), sizes, spec.latency,
                        queue_deadlines_s=waiting, arrival_rate_hz=spec.arrival_rate_hz,
                        request_deadline_s=spec.deadline_s))
        req.mode, req.reason = decision.mode, decision.reason
        if req.mode != Mode.LOCAL and req.mode not in sizes:
            raise SimulationError(f"agent {spec.agent_id}: policy {decision.reason!r} chose "
                                  f"{req.mode.value}, which its payload function does not "
                                  "size; add the mode to payload_bytes or use another policy")
        req.payload = 0 if req.mode == Mode.LOCAL else sizes[req.mode]
        if left <= 0:  # waited past its deadline in the agent's queue: never sent
            req.reason = "expired in the agent queue"
            self.record(req, edge_s=math.nan, rtt_s=math.nan, queue_s=math.nan,
                        cloud_s=math.nan, latency_s=math.nan, cancelled=False)
            return
        if req.mode == Mode.LOCAL:
            edge_s = spec.latency.edge_s.get(Mode.LOCAL, math.nan)
            self.record(req, edge_s=edge_s, rtt_s=0.0, queue_s=0.0, cloud_s=0.0,
                        latency_s=t - req.t_arrival + edge_s, cancelled=False)
            if math.isfinite(edge_s):  # the edge model is busy answering
                self.busy[spec.agent_id] = req
                self.push(t + edge_s, "free", req)
            return
        self.busy[spec.agent_id] = req
        self.push(t + spec.latency.edge_s[req.mode], "tx_start", req)
        self.push(req.t_arrival + spec.deadline_s, "deadline", req)

    def record(self, req: _Request, *, edge_s, rtt_s, queue_s, cloud_s, latency_s,
               cancelled) -> None:
        self.outstanding -= 1
        met = bool(latency_s <= req.agent.deadline_s + 1e-9)  # NaN compares False: a miss
        if req.payload > 0 and math.isfinite(req.t_tx_start):
            self.outcomes[req.agent.agent_id].append(
                Outcome(req.mode, req.payload, req.grant_bps, met))
        q = req.agent.quality.quality(req.mode)
        self.rows.append(dict(
            request_id=req.rid, agent=req.agent.agent_id, t_arrival_s=req.t_arrival,
            context_tokens=req.tokens, mode=req.mode.value,
            bandwidth_estimate_bps=req.estimate_bps, payload_bytes=req.payload,
            agent_queue_s=req.t_start - req.t_arrival, edge_s=edge_s, tx_s=req.tx_s,
            rtt_s=rtt_s, cloud_queue_s=queue_s, cloud_s=cloud_s, latency_s=latency_s,
            deadline_s=req.agent.deadline_s, deadline_met=met, cancelled=cancelled,
            quality=(math.nan if q is None else q) if met else 0.0, reason=req.reason))

    def free(self, t: float, req: _Request) -> None:
        agent_id = req.agent.agent_id
        self.busy[agent_id] = None
        self.start_next(t, agent_id)

    def tx_start(self, t: float, req: _Request) -> None:
        if req.done:
            return
        req.t_tx_start = t
        req.grant_bps = self.grant[req.agent.agent_id]
        req.remaining = float(req.payload)
        if req.remaining == 0:
            self.transferred(t, req)
            return
        self.active[req.rid] = req
        if self.cfg.allocator is not None:
            req.rate_bps, req.t_rate = 0.0, t
            self.move(t, req, self.rate(req.agent.agent_id))

    def transferred(self, t: float, req: _Request) -> None:
        """Last byte on the wire: the answer comes after RTT, cloud queue and compute."""
        lat = req.agent.latency
        req.tx_s = t - req.t_tx_start
        answer_t = t + lat.rtt_s + lat.cloud_queue_s + lat.cloud_s[req.mode]
        if answer_t - req.t_arrival > req.agent.deadline_s + 1e-9:
            return  # the transport gives up at the deadline (the deadline event)
        req.done = True
        if req.payload > 0 and req.tx_s > 0:
            self.estimators[req.agent.agent_id].observe(req.payload, req.tx_s, t)
            self.transfers[req.agent.agent_id].append(
                (req.payload, req.tx_s, self.grant[req.agent.agent_id]))
        self.record(req, edge_s=lat.edge_s[req.mode], rtt_s=lat.rtt_s,
                    queue_s=lat.cloud_queue_s, cloud_s=lat.cloud_s[req.mode],
                    latency_s=answer_t - req.t_arrival, cancelled=False)
        self.push(answer_t, "free", req)

    def deadline(self, t: float, req: _Request) -> None:
        if req.done:
            return
        req.done = True
        if self.active.pop(req.rid, None) is not None:
            # Cut off mid-transfer: what got through is still a sample.
            if self.cfg.allocator is not None:
                self.move(t, req, 0.0)
            sent = req.payload - req.remaining
            if sent > 0 and t > req.t_tx_start:
                self.estimators[req.agent.agent_id].observe(int(sent), t - req.t_tx_start, t)
        lat = req.agent.latency
        self.record(req, edge_s=lat.edge_s[req.mode], rtt_s=lat.rtt_s,
                    queue_s=lat.cloud_queue_s, cloud_s=lat.cloud_s[req.mode],
                    latency_s=math.nan, cancelled=True)
        self.free(t, req)

    # --- loop ----------------------------------------------------------------------------
    def fair_step(self, t: float) -> float:
        """Fair sharing: every transfer moves at its share until the next event or the
        first last byte, whichever comes first; returns that time."""
        rates = self.rates(t)
        finish = [r.remaining * 8 / rates[r.rid] for r in self.active.values()
                  if rates[r.rid] > 0]
        t_next = min(self.heap[0][0], t + min(finish, default=math.inf))
        for r in self.active.values():
            r.remaining -= rates[r.rid] * (t_next - t) / 8
        for r in [r for r in self.active.values() if r.remaining <= 1e-6]:
            del self.active[r.rid]
            self.transferred(t_next, r)
        return t_next

    def run(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        for spec in self.cfg.agents:
            if spec.schedule is not None:
                for t, tokens in spec.schedule:
                    if t < self.duration:
                        self.push(t, "arrival", (spec, tokens))
                continue
            if spec.arrival_rate_hz <= 0:
                continue
            t = self.rng.exponential(1 / spec.arrival_rate_hz)
            while t < self.duration:
                self.push(t, "arrival", (spec, None))
                t += self.rng.exponential(1 / spec.arrival_rate_hz)
        for change in self.cfg.capacity.change_times_s:
            if change < self.duration:
                self.push(change, "epoch")
        self.push(0.0, "epoch_tick", 0)
        handlers = {"arrival": self.arrive, "tx_start": self.tx_start,
                    "deadline": self.deadline, "free": self.free, "tx_done": self.tx_done}
        t = 0.0
        while self.heap:
            if self.cfg.allocator is None:
                t = self.fair_step(t)
            else:
                t = self.heap[0][0]
            while self.heap and self.heap[0][0] <= t:
                _, _, kind, item = heapq.heappop(self.heap)
                if kind in handlers:
                    handlers[kind](t, item)
                    continue
                self.epoch(t)
                # Ticks at k * epoch_s, not t + epoch_s, so float error cannot drift.
                after = None if kind != "epoch_tick" else (item + 1) * self.cfg.epoch_s
                if after is not None and (after < self.duration - 1e-9 or self.outstanding):
                    self.push(after, "epoch_tick", item + 1)
        requests = pd.DataFrame(self.rows, columns=_REQUEST_COLUMNS)
        return (requests.sort_values("request_id", ignore_index=True),
                pd.DataFrame(self.epoch_rows, columns=_EPOCH_COLUMNS))


_REQUEST_COLUMNS = ["request_id", "agent", "t_arrival_s", "context_tokens", "mode",
                    "bandwidth_estimate_bps", "payload_bytes", "agent_queue_s", "edge_s", "tx_s",
                    "rtt_s",
                    "cloud_queue_s", "cloud_s", "latency_s", "deadline_s", "deadline_met",
                    "cancelled", "quality", "reason"]
_EPOCH_COLUMNS = ["t_s", "agent", "capacity_bps", "strategy", "rate_bps", "planned_mode",
                  "objective", "delivered_ratio"]


def simulate(config: SimConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run ``config`` to the end (no arrivals after the duration; in-flight requests drain)."""
    return _Sim(config).run()
