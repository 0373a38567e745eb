"""Bandwidth allocation: how one bottleneck's capacity is split among edge agents.

What lives here: an agent's demand (payload bytes, expected quality and fixed latency per
mode, deadline, weight, arrival rate and the policy's safety margin), and the strategies
that turn demands and a capacity into a rate and a planned mode per agent: ``equal``,
``model_aware`` (proportional to KV size, Paper B), ``greedy`` (Paper B's greedy by marginal
quality per bit), ``quality_max`` (that greedy, never worse than the equal or model-aware
plan) and ``optimal`` (an exact multiple-choice knapsack over a discretized capacity). What
it knows: numbers. What it leaves to others: applying rates to links (``net`` via the
LinkManager) and measuring.

The problem every strategy answers: an agent serves its requests one at a time (one edge
model, a FIFO queue), each holding it for ``D = fixed + bytes*8 / rate``. With Poisson
arrivals at ``lambda`` that is an M/D/1 queue, whose mean wait is ``lambda D^2 / (2 (1 -
lambda D))`` (Pollaczek-Khinchine); the mean response ``D + wait`` meets the deadline ``T``
iff ``D <= D* = 2T / (1 + lambda T + sqrt(1 + (lambda T)^2))`` (``service_budget_s``; ``D* =
T`` without arrivals). The policy plans at ``(1 - margin)`` of its rate, so agent i in mode m
needs ``rate = bytes*8 / ((1 - margin) (D* - fixed))``; a mode whose fixed latency alone
exceeds ``D*`` is out. Each agent also has a rate-0 option, ``local``: worth its local
quality if the profile has one and the edge answers within ``D*``, else 0 (a deadline miss
counts as quality 0).

Two objectives (``allocate(..., objective=)``):

- ``expected_hits`` (default): per agent, mode and rate, the probability that a request meets
  its deadline from the M/D/1 response-time distribution (``queueing.hit_probability``, the
  service taken at the rate the policy plans with), times the mode's quality, times the
  agent's arrival rate: the expected quality delivered per second, so the plan counts
  requests, not agents. An agent with no arrival rate counts as one request per second. The
  knapsack strategies see each mode at a ladder of rates (the rate that keeps ``HIT_LEVELS``
  of its requests in time), so a split in which every agent misses sometimes competes with
  one that starves an agent; ``equal`` and ``model_aware`` keep their rates and plan the mode
  of highest expected quality at them.
- ``mean_response``: the earlier yes/no: a mode counts its full quality iff the M/D/1 mean
  response meets the deadline (the rates above), else nothing.

Ties go to the agent listed first, in every strategy. Two measurements close the loop.
``Demand.delivered_ratio`` (measured over granted rate, from an agent's latest transfers): a
link that delivers less than its grant needs a larger grant for the same service. A transfer
that misses its deadline is cut off and never measured, so an agent whose link is too slow
for its plan would teach the allocator nothing; ``Demand.share_from_hits`` (the share of the
measured rate that its latest requests' hits and misses make most likely,
``share_from_hits``) covers it: with fewer hits than planned, by more than chance, the agent
gets more rate or a cheaper mode.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, Collection, Mapping, Sequence

import numpy as np

from ray_scout.core.modes import CLOUD_MODES, Mode
from ray_scout.core.control.policy import LatencyModel, QualityProfile
from ray_scout.core.control.estimators import DEFAULT_MIN_SAMPLE_BYTES
from ray_scout.core.control.queueing import (
    adaptive_quality, hit_probability, service_for_hit_probability,
)

DEFAULT_GRID_CELLS = 2000
# Column order of every allocation matrix: the rate-0 option first, then the cloud modes.
OPTION_MODES = (Mode.LOCAL,) + CLOUD_MODES
OBJECTIVES = ("expected_hits", "mean_response")
# The shares of requests in time at which ``expected_hits`` offers each mode's rate: every
# 5% up to 95%, where a split leaving every agent a middling share competes with one that
# starves an agent, and dense near 1, where the last points of hit rate cost the most
# bandwidth. With the earlier 15 levels (20, 35, 50, ...) the knapsack could not reach the
# best split of allocation_congestion's always-INT4 agents at the lab's delivered rate
# (all four at 8.0-16.5 Mbit/s, 65.7% of requests in time expected against the 64.6% of
# a plan starving one;
# ``test_expected_hits_starves_no_always_int4_agent_at_the_lab_delivered_rate``).
HIT_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.97, 0.98, 0.99, 0.995,
                                                                  0.999)

class AllocationError(ValueError):
    """Demands or a capacity that an allocator cannot work with."""


def service_budget_s(deadline_s: float, arrival_rate_hz: float) -> float:
    """The longest service per request whose M/D/1 mean response meets ``deadline_s``.

    Solves ``D + lambda D^2 / (2 (1 - lambda D)) = T`` for the root below ``1 / lambda``, in
    the form without cancellation: ``2T / (1 + lambda T + sqrt(1 + (lambda T)^2))``.
    """
    if not (arrival_rate_hz >= 0 and math.isfinite(arrival_rate_hz)):
        raise AllocationError(f"the arrival rate must be finite and >= 0 Hz, not "
                              f"{arrival_rate_hz}")
    load = arrival_rate_hz * deadline_s
    return 2 * deadline_s / (1 + load + math.sqrt(1 + load * load))


@dataclasses.dataclass(frozen=True)
class Demand:
    """One agent's request for bandwidth in the coming epoch.

    ``fixed_s[mode]``: every latency term but the transfer (edge and cloud compute, RTT,
    cloud queue); ``demand_for`` builds the whole demand from a ``LatencyModel`` and a
    ``QualityProfile``. ``kv_size_bytes`` is what ``model_aware`` splits by; it defaults to the BF16
    payload (the model's KV size at this context), else the largest payload.
    ``arrival_rate_hz``: the agent's mean request rate (Poisson), which leaves room for the
    wait behind its own earlier requests; 0 plans one request alone. ``safety_margin``: the
    fraction of its rate the agent's policy keeps in reserve (``AdaptivePolicy``'s margin).
    ``delivered_ratio``: the rate its transfers achieved over the rate it was granted, as
    measured in the last epoch (1: the link delivers its grant; the lab's links deliver about
    0.96, Ethernet/IP/TCP framing); its rates are sized for what the link will deliver.
    """

    agent_id: str
    payload_bytes: Mapping[Mode, int]
    quality: Mapping[Mode, float]
    deadline_s: float
    fixed_s: Mapping[Mode, float]
    weight: float = 1.0
    kv_size_bytes: int | None = None
    arrival_rate_hz: float = 0.0
    safety_margin: float = 0.0
    delivered_ratio: float = 1.0
    # What the agent's measured hits say its link delivers, as a share of ``delivered_ratio``
    # (``share_from_hits``; 1: its hits are those planned): a link whose transfers miss
    # their deadline is never measured by ``delivered_ratio``, only by its misses.
    share_from_hits: float = 1.0
    # Whether the agent's policy sends a mode other than its fastest only when a request
    # arriving during the transfer can still be served (``policy.QueueAwarePolicy``):
    # ``expected_hits`` values an adaptive agent with that rule.
    guards_next_arrival: bool = False
    # Sizes, fixed latencies and qualities in ``OPTION_MODES`` order, then the KV size, the
    # service budget, the planned share of the rate and the arrival rate, gathered once here:
    # Enum-keyed dict lookups cost a Python call each, too slow to repeat per allocation.
    vector: tuple[float, ...] = dataclasses.field(init=False, repr=False, compare=False)
    # ``shape_key``, gathered once here for the same reason.
    shape_key: tuple = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise AllocationError(f"agent {self.agent_id}: weight must be >= 0")
        if any(b < 0 for b in self.payload_bytes.values()):
            raise AllocationError(f"agent {self.agent_id}: payload bytes must be >= 0")
        if not 0 <= self.safety_margin < 1:
            raise AllocationError(f"agent {self.agent_id}: safety_margin must lie in [0, 1), "
                                  f"not {self.safety_margin}")
        if not (0 < self.delivered_ratio and math.isfinite(self.delivered_ratio)):
            raise AllocationError(f"agent {self.agent_id}: delivered_ratio (measured over "
                                  f"granted rate) must be finite and > 0, not "
                                  f"{self.delivered_ratio}")
        if not 0 < self.share_from_hits <= 1:
            raise AllocationError(f"agent {self.agent_id}: share_from_hits must lie in (0, 1], "
                                  f"not {self.share_from_hits}")
        nan = math.nan
        object.__setattr__(self, "vector", tuple(
            [0.0] + [float(self.payload_bytes.get(m, nan)) for m in CLOUD_MODES]
            + [self.fixed_s.get(m, nan) for m in OPTION_MODES]
            + [self.quality.get(m, nan) for m in OPTION_MODES]
            + [self.model_size_bytes, self.service_budget_s, self.rate_share,
               self.arrival_rate_hz]))
        # What an adaptive agent's expected quality along its ladder depends on: deadline,
        # arrival rate, the policy's guard, and per mode fixed latency, bytes and quality
        # (not the rate share: a column's rate is sized by it, so it cancels).
        object.__setattr__(self, "shape_key", (
            self.deadline_s, self.arrival_rate_hz, self.guards_next_arrival,
            *(-1.0 if math.isnan(v) else v for v in self.vector[:3 * len(OPTION_MODES)])))

    @property
    def hit_ladder(self) -> tuple[float, ...]:
        """Per ``HIT_LEVELS`` entry, the longest service (fixed latency plus transfer) that
        keeps at least that share of requests in time, then the exact share at each."""
        return tuple(_fill_ladders([self])[0].tolist())


    @property
    def rate_share(self) -> float:
        """The part of a grant that the policy plans with and the link delivers."""
        return (1 - self.safety_margin) * self.delivered_ratio * self.share_from_hits

    @property
    def service_budget_s(self) -> float:
        """Fixed latency plus transfer that one request may take (``service_budget_s``)."""
        return service_budget_s(self.deadline_s, self.arrival_rate_hz)

    @property
    def model_size_bytes(self) -> int:
        if self.kv_size_bytes is not None:
            return self.kv_size_bytes
        if Mode.BF16 in self.payload_bytes:
            return self.payload_bytes[Mode.BF16]
        return max(self.payload_bytes.values(), default=0)

    def required_rate_bps(self, mode: Mode) -> float:
        """The rate at which ``mode`` fits the service budget as the policy plans it (inf if
        no rate does)."""
        if mode not in self.fixed_s or (mode != Mode.LOCAL and mode not in self.payload_bytes):
            return math.inf
        budget_s = self.service_budget_s - self.fixed_s[mode]
        size = 0 if mode == Mode.LOCAL else self.payload_bytes[mode]
        if budget_s < 0 or (budget_s == 0 and size > 0):
            return math.inf
        return 0.0 if size == 0 else size * 8 / (budget_s * self.rate_share)

    def local_quality(self) -> float:
        """What the rate-0 option is worth: local quality if known and in time, else 0."""
        if Mode.LOCAL in self.quality and math.isfinite(self.required_rate_bps(Mode.LOCAL)):
            return self.quality[Mode.LOCAL]
        return 0.0


# Hit ladders per (deadline, arrival rate) and adaptive agents' values per ``shape_key``,
# kept per process rather than per Demand: the closed loop rebuilds a demand whenever its
# delivered ratio moves, and a cell has many agents of few shapes. Emptied when full.
_LADDERS: dict[tuple[float, float], np.ndarray] = {}
_ADAPTIVE: dict[tuple, np.ndarray] = {}
_CACHE_ENTRIES = 100_000
# Rate vectors whose mode values one problem keeps: a split scores at most four plans
# (the exact one, the greedy's, the equal and the model-aware split's) and then its winner.
_VALUES_KEPT = 5


def _fill_ladders(demands: Sequence[Demand]) -> np.ndarray:
    """The hit ladders of ``demands`` (one row each: services, then hit probabilities),
    computing those not yet known once per (deadline, arrival rate)."""
    keys = [(d.deadline_s, d.arrival_rate_hz) for d in demands]
    todo = np.array(sorted(set(keys) - _LADDERS.keys()), dtype=float).reshape(-1, 2)
    if len(todo):
        if len(_LADDERS) + len(todo) > _CACHE_ENTRIES:
            _LADDERS.clear()
        levels = np.array(HIT_LEVELS)
        service = service_for_hit_probability(todo[:, :1], todo[:, 1:], levels[None, :])
        hit = hit_probability(todo[:, :1], service, todo[:, 1:])
        for key, row in zip(todo.tolist(), np.hstack([service, hit])):
            _LADDERS[tuple(key)] = row
    return np.array([_LADDERS[k] for k in keys]).reshape(len(demands), 2 * len(HIT_LEVELS))


def delivered_ratio(transfers: Sequence[tuple[int, float, float]],
                    min_sample_bytes: int = DEFAULT_MIN_SAMPLE_BYTES) -> float | None:
    """What an agent's link delivered of its grant: the wire time its grants promised over
    the wire time its transfers took, ``sum(8 B / grant) / sum(seconds)``.

    ``transfers``: (bytes, seconds on the wire, grant in bit/s) of recent transfers; those
    under ``min_sample_bytes`` are dropped, since their time is round trips, not rate
    (``estimators``, size floor). None without a usable transfer: keep what you had.
    """
    promised = taken = 0.0
    for size, seconds, grant in transfers:
        if size >= min_sample_bytes and seconds > 0 and grant > 0:
            promised += size * 8 / grant
            taken += seconds
    return promised / taken if taken > 0 else None


def corrected_demands(demands: Sequence[Demand],
                      transfers: Mapping[str, Sequence[tuple[int, float, float]]]
                      ) -> list[Demand]:
    """The demands with each agent's ``delivered_ratio`` from its recent transfers.

    An agent with no transfer large enough to measure takes the median of the agents that
    have one (their links are the same kind): an agent whose every payload was cut off at
    its deadline would otherwise never tell the allocator that its grant is too small.
    A ratio that moved by less than 1% is kept, so the plan does not churn.
    """
    ratios = {d.agent_id: delivered_ratio(transfers.get(d.agent_id, ())) for d in demands}
    known = [r for r in ratios.values() if r is not None]
    fallback = float(np.median(known)) if known else None
    out = []
    for d in demands:
        ratio = ratios[d.agent_id] if ratios[d.agent_id] is not None else fallback
        if ratio is not None and abs(ratio - d.delivered_ratio) > 0.01 * d.delivered_ratio:
            d = dataclasses.replace(d, delivered_ratio=ratio)
        out.append(d)
    return out


# Closed loop on hits (``share_from_hits``): the shares of the measured delivered rate that
# an agent's hits are weighed at (below a quarter, a link is broken, not slow), and the gain
# in log-likelihood that moves the estimate: 1.92, half the 95% point of chi-square with one
# degree of freedom (a likelihood-ratio test), so that chance misses do not move the plan.
HIT_SHARES = tuple(round(0.25 + 0.01 * i, 2) for i in range(76))
HIT_EVIDENCE_LOGLIK = 1.92
# How many of an agent's latest requests sent the loop weighs (simulator and allocator
# actor alike): at 0.5 Hz, the last 40 s.
HIT_FEEDBACK_REQUESTS = 20


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One finished request of an agent, as the closed loop on hits weighs it."""

    mode: Mode
    payload_bytes: int
    grant_bps: float  # the agent's grant while it was sent
    deadline_met: bool


def share_from_hits(demand: Demand, outcomes: Sequence[Outcome]) -> float:
    """The share of its measured delivered rate that best explains an agent's hits.

    Each request sent in a mode with a payload met its deadline with probability
    ``hit_probability(T, fixed + 8 B / (grant x delivered_ratio x s), lambda)`` (M/D/1 with
    abandonment, as the plan reckons); over ``HIT_SHARES`` the share ``s`` of greatest
    likelihood is taken, but only if it beats the agent's current share by
    ``HIT_EVIDENCE_LOGLIK`` (a likelihood-ratio test); otherwise the current share stays.
    Of equally likely shares the largest is taken, the least correction the hits call for:
    misses alone are as likely at every share too small for the transfer to fit, and the
    smallest would starve the agent (at rate 0 it sends nothing and can never show that its
    link recovered); the next plan's misses, at the larger grant, lower it further. Local
    answers and requests without a grant carry no evidence, and scout's few hundred bytes
    almost none (their hit probability hardly depends on the rate). Misses the model
    already expects (its hit probability, its queue) move nothing.
    """
    rows = [o for o in outcomes if o.mode != Mode.LOCAL and o.payload_bytes > 0
            and o.grant_bps > 0 and math.isfinite(o.grant_bps) and o.mode in demand.fixed_s]
    if not rows:
        return demand.share_from_hits
    shares = np.array(HIT_SHARES)
    fixed = np.array([demand.fixed_s[o.mode] for o in rows])
    wire = np.array([o.payload_bytes * 8 / (o.grant_bps * demand.delivered_ratio)
                     for o in rows])
    p = hit_probability(demand.deadline_s, fixed[:, None] + wire[:, None] / shares,
                        demand.arrival_rate_hz)
    met = np.array([o.deadline_met for o in rows])[:, None]
    # Probabilities kept off 0 and 1: one request the model calls certain must not decide.
    loglik = np.log(np.clip(np.where(met, p, 1 - p), 1e-6, 1.0)).sum(axis=0)
    best = int(np.flatnonzero(loglik >= loglik.max() - 1e-9)[-1])
    now = int(np.abs(shares - demand.share_from_hits).argmin())
    if loglik[best] - loglik[now] > HIT_EVIDENCE_LOGLIK:
        return float(shares[best])
    return demand.share_from_hits


class HitShares:
    """``share_from_hits`` per agent, refit only when its latest requests sent or its demand
    changed. A split refits the agents with new outcomes, not every agent (at 1,000 agents a
    few dozen)."""

    def __init__(self) -> None:
        self._fits: dict[str, tuple[tuple, float]] = {}

    def __call__(self, demand: Demand, outcomes: Sequence[Outcome]) -> float:
        key = (tuple(outcomes), demand)
        fit = self._fits.get(demand.agent_id)
        if fit is None or fit[0] != key:
            fit = self._fits[demand.agent_id] = (key, share_from_hits(demand, outcomes))
        return fit[1]


def hit_corrected_demands(demands: Sequence[Demand],
                          outcomes: Mapping[str, Sequence[Outcome]],
                          shares: HitShares | None = None) -> list[Demand]:
    """The demands with each agent's ``share_from_hits`` from its latest finished requests:
    closing the loop on hits, so that a link that delivers less than its grant, unseen by
    ``delivered_ratio`` because its transfers miss, gets more rate or a cheaper mode.
    ``shares``: a caller's ``HitShares``, kept across splits so unchanged agents are not refit."""
    fit = share_from_hits if shares is None else shares
    out = []
    for d in demands:
        share = fit(d, outcomes.get(d.agent_id, ()))
        out.append(d if share == d.share_from_hits
                   else dataclasses.replace(d, share_from_hits=share))
    return out


# What the allocator corrects each agent's demand from between splits
# (``closed_loop_demands``): its delivered rate and its hits (the default), its delivered
# rate alone (the earlier loop), or nothing (the plan stays as the agents reported it).
CLOSED_LOOPS = ("hits", "delivered_rate", "off")


def check_closed_loop(loop: str) -> None:
    """Refuse a closed loop that is not one of ``CLOSED_LOOPS`` (before a run, not at its
    first split)."""
    if loop not in CLOSED_LOOPS:
        raise AllocationError(f"unknown closed loop {loop!r}; use one of {', '.join(CLOSED_LOOPS)}")


def closed_loop_demands(demands: Sequence[Demand],
                        transfers: Mapping[str, Sequence[tuple[int, float, float]]],
                        outcomes: Mapping[str, Sequence[Outcome]],
                        loop: str = "hits", shares: HitShares | None = None) -> list[Demand]:
    """The demands as the closed loop ``loop`` (one of ``CLOSED_LOOPS``) corrects them from
    each agent's latest transfers (``corrected_demands``) and requests sent
    (``hit_corrected_demands``, with the caller's ``shares``); the simulator and the
    Allocator actor both call this."""
    check_closed_loop(loop)
    if loop == "off":
        return list(demands)
    corrected = corrected_demands(demands, transfers)
    return hit_corrected_demands(corrected, outcomes, shares) if loop == "hits" else corrected


def demand_for(agent_id: str, payload_bytes: Mapping[Mode, int], profile: QualityProfile,
               latency: LatencyModel, deadline_s: float, weight: float = 1.0,
               arrival_rate_hz: float = 0.0, safety_margin: float = 0.0,
               modes: Collection[Mode] | None = None,
               guards_next_arrival: bool = False) -> Demand:
    """The demand of an agent that knows its payloads, quality profile and latency model.

    Modes enter where all three know them and the agent can send them (``modes``: its
    policy's ``choices``; None: any); ``local`` where the profile has its quality and the
    latency model its edge time. Give ``arrival_rate_hz`` (the agent's mean request rate) and
    ``safety_margin`` (its policy's) so the rate leaves room for queueing and for the
    policy's reserve, and ``guards_next_arrival`` (its policy's) so an adaptive agent is
    valued as it decides; see the module docstring.
    """
    sendable = set(OPTION_MODES if modes is None else modes)
    options = [m for m in CLOUD_MODES if m in payload_bytes and m in latency.edge_s
               and m in latency.cloud_s and profile.quality(m) is not None and m in sendable]
    if (Mode.LOCAL in latency.edge_s and profile.quality(Mode.LOCAL) is not None
            and Mode.LOCAL in sendable):
        options.append(Mode.LOCAL)
    return Demand(agent_id, {m: payload_bytes[m] for m in options if m != Mode.LOCAL},
                  {m: profile.quality(m) for m in options}, deadline_s,
                  {m: latency.fixed_s(m) for m in options}, weight,
                  arrival_rate_hz=arrival_rate_hz, safety_margin=safety_margin,
                  guards_next_arrival=guards_next_arrival)


@dataclasses.dataclass(frozen=True)
class Allocation:
    """A split of ``capacity_bps``: rate and planned mode per agent, and its objective.

    ``mode[a] == Mode.LOCAL`` means no cloud mode is planned (answer at the edge, or a miss).
    """

    strategy: str
    capacity_bps: float
    rate_bps: Mapping[str, float]
    mode: Mapping[str, Mode]
    expected_quality: Mapping[str, float]
    objective: float


class _Problem:
    """Demands as matrices: column 0 is the rate-0 option, the others (mode, rate) options.

    ``mean_response``: one column per cloud mode, at the rate whose mean response meets the
    deadline, worth the mode's quality. ``expected_hits``: per cloud mode one column per
    ``HIT_LEVELS`` entry, at the rate that keeps that share of requests in time, worth
    quality x hit probability x arrival rate. ``column_mode[c]`` indexes ``OPTION_MODES``.
    """

    def __init__(self, demands: Sequence[Demand], objective: str = "expected_hits"):
        ids = [d.agent_id for d in demands]
        if len(set(ids)) != len(ids):
            raise AllocationError("agent ids in one allocation must be unique")
        if objective not in OBJECTIVES:
            raise AllocationError(f"unknown objective {objective!r}; known: "
                                  f"{', '.join(OBJECTIVES)}")
        self.demands = tuple(demands)
        self.objective = objective
        self.modes = list(OPTION_MODES)
        n, k = len(demands), len(OPTION_MODES)
        table = np.array([d.vector for d in demands]).reshape(n, 3 * k + 4)
        size, fixed, quality = table[:, :3 * k].reshape(n, 3, k).transpose(1, 0, 2)
        self.model_size = table[:, 3 * k]
        self.deadline = np.array([d.deadline_s for d in demands], dtype=float)
        self.share = table[:, 3 * k + 2]
        self.arrival_rate = table[:, 3 * k + 3]
        self.weight = np.array([d.weight for d in demands], dtype=float)
        known = ~np.isnan(size) & ~np.isnan(quality)
        self.mode_size = np.where(known, size, np.nan)
        self.mode_fixed = fixed
        self.mode_quality = np.where(known, quality, np.nan)
        # Requests per second, what expected_hits counts (an agent alone: one per second).
        self.requests = np.where(self.arrival_rate > 0, self.arrival_rate, 1.0)
        if objective == "mean_response":
            budget = table[:, 3 * k + 1, None] - fixed
            self.column_mode = np.arange(k)
            hit = np.ones((n, k))
        else:
            budget, hit = self._ladder(demands)
            self.column_mode = np.concatenate([[0], np.repeat(np.arange(1, k), len(HIT_LEVELS))])
            budget[:, 0] = self.deadline - fixed[:, 0]
            hit[:, 0] = hit_probability(self.deadline, fixed[:, 0], self.arrival_rate)
        cm = self.column_mode
        size, quality = size[:, cm], quality[:, cm]
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = np.where(size == 0, 0.0, size * 8 / (budget * self.share[:, None]))
        usable = (~np.isnan(size) & ~np.isnan(quality) & (budget >= 0)
                  & ~((budget == 0) & (size > 0)))
        if objective == "expected_hits":
            usable &= hit > 0
        # The rate-0 column is always there: local quality where known and in time, else a
        # miss worth 0.
        self.rate = np.where(usable, rate, np.inf)
        self.rate[:, 0] = 0.0
        self.quality = np.where(usable, quality * hit, 0.0)  # unweighted, per request
        self.size = np.where(usable, size, 0.0)
        # An agent that can send more than one mode is the adaptive policy: a request that
        # waited gets a cheaper mode instead of missing, so its options are worth the
        # expected quality of that behaviour (``queueing.adaptive_quality``), not the planned
        # mode's hit probability alone.
        self.adaptive = np.zeros(n, dtype=bool)
        if objective == "expected_hits":
            self.adaptive = (~np.isnan(self.mode_size[:, 1:])).sum(axis=1) > 1
            if self.adaptive.any():
                self._adaptive_columns(demands)
        scale = self.weight * (self.requests if objective == "expected_hits" else 1.0)
        self.value = self.quality * scale[:, None]
        self._steps = None
        self._ladders = None
        # mode_values_at per rate vector within one split (``allocate`` empties it): a split
        # asks for the same rates several times (a fixed-rate plan's modes, then its score,
        # then the winner's result).
        self.values_at: dict[bytes, np.ndarray] = {}

    def greedy_steps(self):
        """``_greedy_steps`` of the problem's options, once (a re-split reuses them)."""
        if self._steps is None:
            self._steps = _greedy_steps(self.rate, self.value)
        return self._steps

    def _adaptive_columns(self, demands: Sequence[Demand]) -> None:
        """Expected quality of each adaptive agent's (top mode, rate) columns, cached per
        agent shape (``Demand.shape_key``): at the column's rate the agent sends the best
        mode, among those no better than the column's, that fits the time a request has
        left (and, for a guarding policy, leaves room for the next arrival)."""
        rows = np.flatnonzero(self.adaptive)
        keys = [demands[a].shape_key for a in rows.tolist()]
        todo = {}
        for a, key in zip(rows.tolist(), keys):
            if key not in _ADAPTIVE:
                todo.setdefault(key, a)
        if todo:
            agents = np.array(list(todo.values()))
            rates = np.where(np.isfinite(self.rate[agents]), self.rate[agents], np.nan)
            size, fixed = self.mode_size[agents], self.mode_fixed[agents]
            share = self.share[agents]
            with np.errstate(divide="ignore", invalid="ignore"):
                wire = size[:, None, :] * 8 / (rates[:, :, None] * share[:, None, None])
            service = fixed[:, None, :] + np.where(size[:, None, :] == 0, 0.0, wire)
            service[:, :, 0] = fixed[:, None, 0]
            quality = self.mode_quality[agents]
            top = quality[:, self.column_mode]
            allowed = quality[:, None, :] <= top[:, :, None] + 1e-12
            cols = len(self.column_mode)
            service = np.where(allowed, service, np.nan).reshape(-1, len(OPTION_MODES))
            quality = np.where(allowed, quality[:, None, :], np.nan).reshape(
                -1, len(OPTION_MODES))
            owner = np.repeat(agents, cols)
            ok = np.isfinite(service).any(axis=1)
            values = np.zeros(len(owner))
            guard = np.array([demands[a].guards_next_arrival for a in owner.tolist()], bool)
            values[ok] = adaptive_quality(self.deadline[owner[ok]], self.arrival_rate[owner[ok]],
                                          service[ok], quality[ok], guard[ok])
            if len(_ADAPTIVE) + len(todo) > _CACHE_ENTRIES:
                _ADAPTIVE.clear()
            for key, block in zip(todo, values.reshape(len(todo), cols)):
                _ADAPTIVE[key] = block
        cached = np.array([_ADAPTIVE[k] for k in keys]).reshape(len(rows), -1)
        usable = np.isfinite(self.rate[rows])
        usable[:, 0] = False  # the rate-0 column keeps its own (local) value
        self.quality[rows] = np.where(usable, cached, self.quality[rows])

    def _ladder(self, demands: Sequence[Demand]) -> tuple[np.ndarray, np.ndarray]:
        """Per agent and column: the transfer budget (service less fixed latency) and the
        hit probability of each (mode, hit level) option."""
        levels = _fill_ladders(demands)
        service, hit = levels[:, :len(HIT_LEVELS)], levels[:, len(HIT_LEVELS):]
        budget = np.tile(service, len(CLOUD_MODES)) - np.repeat(self.mode_fixed[:, 1:],
                                                                 len(HIT_LEVELS), axis=1)
        hits = np.tile(hit, len(CLOUD_MODES))
        zero = np.zeros((len(demands), 1))
        return np.hstack([zero, budget]), np.hstack([zero, hits])

    def mode_values_at(self, rate_bps: np.ndarray) -> np.ndarray:
        """Expected quality per request of every mode (``OPTION_MODES`` order) at each
        agent's rate: the mode's quality times its hit probability (expected_hits), or times
        whether the mean response meets the deadline (mean_response)."""
        key = rate_bps.tobytes()
        if key not in self.values_at:
            if len(self.values_at) >= _VALUES_KEPT:
                self.values_at.clear()
            self.values_at[key] = self._mode_values_at(rate_bps)
        return self.values_at[key]

    def _mode_values_at(self, rate_bps: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            wire = np.where(self.mode_size == 0, 0.0,
                            self.mode_size * 8 / (rate_bps[:, None] * self.share[:, None]))
        service = self.mode_fixed + wire
        service[:, 0] = self.mode_fixed[:, 0]
        if self.objective == "expected_hits":
            # Adaptive agents' cloud modes are valued along their ladders below: the M/D/1
            # sums (the cost of a split at scale) only for the rest.
            needed = ~np.isnan(self.mode_quality) & ~self.adaptive[:, None]
            needed[:, 0] = ~np.isnan(self.mode_quality[:, 0])
            hit = np.zeros(service.shape)
            rows, cols = np.nonzero(needed)
            hit[rows, cols] = hit_probability(self.deadline[rows],
                                              np.nan_to_num(service[rows, cols], nan=np.inf),
                                              self.arrival_rate[rows])
        else:
            budget = np.array([d.service_budget_s for d in self.demands])
            hit = (service <= budget[:, None] * (1 + 1e-12)).astype(float)
        out = np.nan_to_num(self.mode_quality) * hit
        out[:, 0] = np.where(np.isnan(self.mode_quality[:, 0]), 0.0, out[:, 0])
        rows = np.flatnonzero(self.adaptive)
        if len(rows):
            out[rows, 1:] = self._along_ladders(rows, rate_bps[rows])
        return out

    def _along_ladders(self, rows: np.ndarray, rate_bps: np.ndarray) -> np.ndarray:
        """Adaptive agents' expected quality per cloud mode at ``rate_bps``: along each
        mode's ladder it rises with the rate, so it is interpolated there; below the mode's
        lowest rung it is not planned (0), above its top rung it keeps the top value (all
        agents and modes at once; ``np.interp`` per agent and mode was the cost at scale)."""
        levels = len(HIT_LEVELS)
        if self._ladders is None:  # sorted once per problem: only the rates change
            every = np.flatnonzero(self.adaptive)
            rate = self.rate[every, 1:].reshape(len(every), -1, levels)
            value = self.quality[every, 1:].reshape(len(every), -1, levels)
            order = np.argsort(rate, axis=2, kind="stable")  # inf (not offered) last
            self._ladders = (np.cumsum(self.adaptive) - 1,
                             np.take_along_axis(rate, order, axis=2),
                             np.take_along_axis(value, order, axis=2))
        index, rate, value = self._ladders
        rate, value = rate[index[rows]], value[index[rows]]
        r = rate_bps[:, None, None]
        above = (rate <= r * (1 + 1e-12)).sum(axis=2, keepdims=True)  # rungs at or below r
        offered = np.isfinite(rate).sum(axis=2, keepdims=True)
        lo = np.clip(above - 1, 0, levels - 1)
        hi = np.clip(above, 0, levels - 1)
        r_lo, r_hi = (np.take_along_axis(rate, i, axis=2) for i in (lo, hi))
        v_lo, v_hi = (np.take_along_axis(value, i, axis=2) for i in (lo, hi))
        with np.errstate(divide="ignore", invalid="ignore"):
            between = v_lo + (v_hi - v_lo) * (r - r_lo) / (r_hi - r_lo)
        out = np.where(above == 0, 0.0, np.where(above >= offered, v_lo, between))
        return out[:, :, 0]

    def plan_at(self, rate_bps: np.ndarray) -> np.ndarray:
        """Per agent, the best option its rate carries (ties: the cheaper rate)."""
        fits = self.rate <= rate_bps[:, None] * (1 + 1e-12)
        q = np.where(fits, self.quality, -np.inf)
        best = q.max(axis=1)
        cheapest = np.where(fits & (q == best[:, None]), self.rate, np.inf)
        return cheapest.argmin(axis=1)

    def modes_at(self, rate_bps: np.ndarray) -> np.ndarray:
        """Per agent, a column of the mode of highest expected quality at exactly its rate
        (ties: the earlier mode in ``OPTION_MODES``), for the strategies that fix rates."""
        if self.objective == "mean_response":
            return self.plan_at(rate_bps)
        mode = self.mode_values_at(rate_bps).argmax(axis=1)
        return np.searchsorted(self.column_mode, mode)  # the mode's first column

    def score(self, capacity_bps: float, choice: np.ndarray,
              rate_bps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """Rates, expected quality per request and the objective of a plan."""
        rows = np.arange(len(choice))
        if rate_bps is None:
            rate_bps = _spread_leftover(self.rate[rows, choice], self.size[rows, choice],
                                        self.arrival_rate, capacity_bps)
        if self.objective == "mean_response":
            quality = self.quality[rows, choice]
            return rate_bps, quality, float(self.value[rows, choice].sum())
        # The plan is scored at the rates it ends with (its options' rates plus the
        # leftover), mode by mode, not at the ladder's rates.
        quality = self.mode_values_at(rate_bps)[rows, self.column_mode[choice]]
        return rate_bps, quality, float((quality * self.weight * self.requests).sum())

    def result(self, strategy: str, capacity_bps: float, choice: np.ndarray,
               rate_bps: np.ndarray | None = None) -> Allocation:
        rate_bps, quality, objective = self.score(capacity_bps, choice, rate_bps)
        ids = [d.agent_id for d in self.demands]
        return Allocation(
            strategy, capacity_bps, dict(zip(ids, rate_bps.tolist())),
            {a: self.modes[c] for a, c in zip(ids, self.column_mode[choice].tolist())},
            dict(zip(ids, quality.tolist())), objective)


def _spread_leftover(required: np.ndarray, size: np.ndarray, arrival_rate: np.ndarray,
                     capacity_bps: float) -> np.ndarray:
    """Give capacity left after the planned rates in proportion to sqrt(arrivals x bytes).

    Kleinrock's square-root assignment: extra rates ``x_i`` with ``sum x_i`` fixed minimize
    ``sum lambda_i 8 B_i / x_i``, the arrival-weighted time on the wire, when ``x_i ~
    sqrt(lambda_i B_i)``. Shorter transfers shorten the wait of the requests queued behind
    them, and a tiny payload (scout) still gets enough to send at once: in proportion to
    bytes it got a trickle that stretched 176 bytes over a second. Without arrival rates every
    agent counts as equally busy; with nothing to send, the leftover is split equally
    (someone may start sending mid-epoch).
    """
    leftover = max(capacity_bps - float(required.sum()), 0.0)
    load = size * arrival_rate
    weight = np.sqrt(load if load.sum() > 0 else size)
    total = float(weight.sum())
    share = weight / total if total > 0 else np.full(len(size), 1 / max(len(size), 1))
    return required + leftover * share


def _equal_rates(p: _Problem, capacity_bps: float) -> np.ndarray:
    return np.full(len(p.demands), capacity_bps / len(p.demands))


def _model_aware_rates(p: _Problem, capacity_bps: float) -> np.ndarray:
    sizes = p.model_size
    share = sizes / sizes.sum() if sizes.sum() > 0 else np.full(len(sizes), 1 / len(sizes))
    return capacity_bps * share


def _equal(p: _Problem, capacity_bps: float) -> Allocation:
    rate = _equal_rates(p, capacity_bps)
    return p.result("equal", capacity_bps, p.modes_at(rate), rate)


def _model_aware(p: _Problem, capacity_bps: float) -> Allocation:
    rate = _model_aware_rates(p, capacity_bps)
    return p.result("model_aware", capacity_bps, p.modes_at(rate), rate)


def _hull_segments(rate: np.ndarray, value: np.ndarray):
    """Upper-concave-hull steps of every agent from its rate-0 option, vectorized.

    Returns (agent, step, d_rate, d_value, slope, to_column) arrays; along one agent the
    slopes never increase, which is what makes a global sort by slope a valid greedy order.
    """
    n, k = rate.shape
    cur = np.zeros(n, dtype=int)
    parts = []
    active = np.arange(n)  # agents whose hull goes on: each step looks at those alone
    for step in range(k - 1):
        r, v = rate[active], value[active]
        at = np.arange(len(active))
        d_r = r - r[at, cur[active]][:, None]
        d_v = v - v[at, cur[active]][:, None]
        ok = (d_v > 0) & np.isfinite(r)
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(ok, np.where(d_r > 0, d_v / d_r, np.inf), -np.inf)
        nxt = slope.argmax(axis=1)
        has = ok[at, nxt]
        if not has.any():
            break
        at, to = at[has], nxt[has]
        active = active[has]
        parts.append((active, np.full(len(active), step), d_r[at, to], d_v[at, to],
                      slope[at, to], to))
        cur[active] = to
    if not parts:
        empty = np.zeros(0)
        return (empty.astype(int),) * 2 + (empty,) * 3 + (empty.astype(int),)
    return tuple(np.concatenate(x) for x in zip(*parts))


def _greedy_steps(rate: np.ndarray, value: np.ndarray):
    """The hull steps of every agent in the greedy's order (best slope first; ties: the
    earlier step, then the agent listed first): (agent, d_rate, slope, to_column)."""
    agent, step, d_r, _, slope, to = _hull_segments(rate, value)
    order = np.lexsort((step, -slope))
    return agent[order], d_r[order], slope[order], to[order]


def _greedy(rate: np.ndarray, value: np.ndarray, capacity: float, steps=None):
    """Paper B's greedy: upgrade by best marginal value per rate unit while it fits.

    Returns (choice per agent, break slope). The break slope is the efficiency of the first
    upgrade that did not fit: the LP relaxation's multiplier, which ``optimal`` reuses.
    ``steps``: ``_greedy_steps(rate, value)`` when already known (they do not depend on the
    capacity).
    """
    agent, d_r, slope, to = _greedy_steps(rate, value) if steps is None else steps
    choice = np.zeros(rate.shape[0], dtype=int)
    used = np.cumsum(d_r)
    stop = int(np.searchsorted(used, capacity * (1 + 1e-12), side="right"))
    choice[agent[:stop]] = to[:stop]  # later steps of an agent overwrite earlier ones
    if stop == len(agent):
        return choice, 0.0
    break_slope = float(slope[stop])
    left = capacity - (used[stop - 1] if stop else 0.0)
    blocked = {int(agent[stop])}
    rest = slice(stop + 1, None)
    # Once the capacity left is below every remaining step, nothing more can be taken.
    smallest_after = np.minimum.accumulate(d_r[rest][::-1])[::-1].tolist()
    for a, dr, t, smallest in zip(agent[rest].tolist(), d_r[rest].tolist(), to[rest].tolist(),
                                  smallest_after):
        if left < smallest:
            break
        if a in blocked:
            continue
        if dr <= left * (1 + 1e-12):
            choice[a] = t
            left -= dr
        else:
            blocked.add(a)  # its later hull steps assume this one was taken
    return choice, break_slope


def _greedy_only(p: _Problem, capacity_bps: float) -> Allocation:
    choice, _ = _greedy(p.rate, p.value, capacity_bps, p.greedy_steps())
    return p.result("greedy", capacity_bps, choice)


Plan = tuple  # (option column per agent, rates per agent or None: the leftover rule's)


def _best_plan(p: _Problem, plans: list[Plan], capacity_bps: float) -> Plan:
    # max() keeps the first of equal plans: the list's order is the tie-break.
    return max(plans, key=lambda plan: p.score(capacity_bps, *plan)[2])


def _heuristic_plans(p: _Problem, capacity_bps: float) -> list[Plan]:
    """The greedy's plan, then the equal and model-aware splits as those strategies plan
    them (their rates, the best mode at each), so quality_max is never worse than either."""
    plans = [(_greedy(p.rate, p.value, capacity_bps, p.greedy_steps())[0], None)]
    for rate in (_equal_rates(p, capacity_bps), _model_aware_rates(p, capacity_bps)):
        plans.append((p.modes_at(rate), rate) if p.objective == "expected_hits"
                     else (p.plan_at(rate), None))
    return plans


def _quality_max(p: _Problem, capacity_bps: float) -> Allocation:
    # The greedy alone loses to the equal split on ~2% of small random instances (a big
    # upgrade blocked by earlier small ones); both other plans are feasible and cheap to
    # score, so quality_max returns the best of the three.
    return p.result("quality_max", capacity_bps,
                    *_best_plan(p, _heuristic_plans(p, capacity_bps), capacity_bps))


def _rounded_greedy(p: _Problem, capacity_bps: float, grid_cells: int):
    """Rates rounded up to cells of ``capacity / grid_cells`` (inf: over the capacity), and
    the greedy on them: (cells per option, its choice, its LP multiplier per cell)."""
    unit = capacity_bps / grid_cells
    with np.errstate(invalid="ignore"):
        w = np.ceil(p.rate / unit - 1e-9)
    w[~np.isfinite(w) | (w > grid_cells)] = np.inf
    greedy, lam = _greedy(w, p.value, float(grid_cells))
    return w, greedy, lam


def _kept_options(w: np.ndarray, v: np.ndarray, greedy: np.ndarray, lam: float,
                  grid_cells: int, lower: float) -> tuple[np.ndarray, float]:
    """The options whose Lagrangian bound reaches ``lower`` (the others are in no optimum),
    and the Lagrangian upper bound of the whole problem."""
    reduced = np.where(np.isfinite(w), v - lam * np.where(np.isfinite(w), w, 0), -np.inf)
    best = reduced.max(axis=1)
    bound = best.sum() - best[:, None] + reduced + lam * grid_cells
    keep = np.isfinite(w) & (bound >= lower - 1e-9 * (1 + abs(lower)))
    keep[np.arange(len(v)), greedy] = True
    return keep, float(best.sum() + lam * grid_cells)


def _optimal_choice(p: _Problem, capacity_bps: float, grid_cells: int) -> np.ndarray:
    """Exact multiple-choice knapsack with rates rounded up to ``capacity / grid_cells``.

    1. The greedy on the integer weights gives a feasible value LB and the LP multiplier
       lambda. 2. For every option, the Lagrangian bound with that agent fixed to it,
       sum_k max_j(v_kj - lambda w_kj) + lambda G, is a valid upper bound; options whose
       bound is below LB cannot be in any optimum and are dropped. 3. Agents left with one
       option are fixed; a DP over the remaining capacity cells solves the rest exactly,
       taking agents with identical options together (see ``_interchangeable_units``).
    """
    w, greedy, lam = _rounded_greedy(p, capacity_bps, grid_cells)
    v = p.value
    rows = np.arange(len(v))
    keep, _ = _kept_options(w, v, greedy, lam, grid_cells,
                            float(v[rows, greedy].sum()))
    free = np.flatnonzero(keep.sum(axis=1) > 1)
    choice = greedy.copy()
    fixed = np.setdiff1d(rows, free)
    choice[fixed] = keep[fixed].argmax(axis=1)
    cells = grid_cells - int(w[fixed, choice[fixed]].sum())
    if len(free) == 0:
        return choice
    units = _interchangeable_units(free, keep, w, v, cells)
    # dp[g]: best value of the units so far within g cells; takes[u][g]: the point used.
    dp = np.zeros(cells + 1)
    takes = []
    for _, _, weights, values, _ in units:
        new = np.full(cells + 1, -np.inf)
        take = np.zeros(cells + 1, dtype=np.int64)
        for point, (u, val) in enumerate(zip(weights.tolist(), values.tolist())):
            cand = dp[: cells + 1 - u] + val
            better = cand > new[u:]
            np.copyto(new[u:], cand, where=better)
            np.copyto(take[u:], point, where=better)
        dp = new
        takes.append(take)
    g = cells
    for (members, options, weights, _, counts), take in zip(units[::-1], takes[::-1]):
        point = int(take[g])
        # Interchangeable agents: the best option goes to the first members (options are in
        # rising cost), as the greedy's stable sort gives an upgrade to the first agent.
        choice[members] = np.repeat(options[::-1], counts[point][::-1])
        g -= int(weights[point])
    return choice


# Enumerating a group's splits costs about a microsecond each; splitting the group into
# single agents costs one DP pass per agent and option. At 5,000, 1,000 identical agents with
# three kept options (queue-aware demands at 10 Gbit/s) fell back to 72 ms; at 20,000, 7 ms.
_MAX_POINTS_PER_GROUP = 20_000


def _interchangeable_units(free, keep, w, v, cells):
    """The free agents as DP units: groups of agents with identical kept options.

    A group of c interchangeable agents is one unit whose points are how many of them take
    each option (the Pareto front of total cells vs total value). That is exact, and it turns
    1,000 identical agents from 1,000 DP steps into one. A group whose count vectors would
    exceed ``_MAX_POINTS_PER_GROUP`` is split into single agents instead.
    """
    signature = np.ascontiguousarray(np.hstack([np.where(keep[free], w[free], -1.0),
                                                np.where(keep[free], v[free], -np.inf)]))
    # Grouped by the bytes of each row (a sort of the rows cost tens of ms at 1,000 agents),
    # in the order of each group's first agent.
    groups: dict[bytes, list[int]] = {}
    for agent, row in zip(free.tolist(), signature):
        groups.setdefault(row.tobytes(), []).append(agent)
    units = []
    for group in groups.values():
        members = np.array(group)
        a = members[0]
        opts = np.flatnonzero(keep[a] & (w[a] <= cells))
        # Pareto-prune the options: by weight, keep each only if it is worth more than all
        # lighter ones, so every upgrade costs cells and gains value.
        order = np.lexsort((-v[a, opts], w[a, opts]))
        opts = opts[order]
        vals = v[a, opts]
        ahead = np.maximum.accumulate(np.concatenate([[-np.inf], vals[:-1]]))
        opts = opts[vals > ahead]
        ws, vs = w[a, opts].astype(np.int64), v[a, opts]
        # One agent's pruned options are its front, each taken by that agent.
        points = (None if len(members) == 1 else _count_points(ws, vs, len(members), cells))
        if points is None:
            single = (ws, vs, np.eye(len(opts), dtype=np.int64))
            units += [(np.array([m]), opts) + single for m in members.tolist()]
        else:
            units.append((members, opts) + points)
    return units


def _count_points(ws, vs, c, budget):
    """Every split of c interchangeable agents over options (ws, vs) within ``budget`` cells.

    Returns the Pareto front as (total cells, total value, count per option), or None when
    there would be more than ``_MAX_POINTS_PER_GROUP`` splits to look at.
    """
    extra = budget - c * int(ws[0])
    dw, dv = ws[1:] - ws[0], vs[1:] - vs[0]
    counts = np.zeros((1, len(dw)), dtype=np.int64)
    used_w = np.zeros(1, dtype=np.int64)
    used_n = np.zeros(1, dtype=np.int64)
    gain = np.zeros(1)
    for j in range(len(dw)):
        most = np.minimum(c - used_n, (extra - used_w) // dw[j])
        reps = np.maximum(most + 1, 0)
        total = int(reps.sum())
        if total > _MAX_POINTS_PER_GROUP:
            return None
        parent = np.repeat(np.arange(len(reps)), reps)
        n = np.arange(total) - np.repeat(np.cumsum(reps) - reps, reps)
        counts = counts[parent]
        counts[:, j] = n
        used_w, used_n = used_w[parent] + n * dw[j], used_n[parent] + n
        gain = gain[parent] + n * dv[j]
    weight = c * int(ws[0]) + used_w
    value = c * vs[0] + gain
    counts = np.hstack([(c - used_n)[:, None], counts])
    order = np.lexsort((-value, weight))
    weight, value, counts = weight[order], value[order], counts[order]
    ahead = np.maximum.accumulate(np.concatenate([[-np.inf], value[:-1]]))
    front = value > ahead
    return weight[front], value[front], counts[front]


def _optimal(p: _Problem, capacity_bps: float, grid_cells: int = DEFAULT_GRID_CELLS
             ) -> Allocation:
    exact = _optimal_choice(p, capacity_bps, grid_cells)
    # Rounding rates up can make the DP lose a plan that fits the real capacity; the
    # heuristics' plans are feasible too, so the best of all is returned.
    return p.result("optimal", capacity_bps, *_best_plan(
        p, [(exact, None)] + _heuristic_plans(p, capacity_bps), capacity_bps))


# The last few problems, by the identity of their demands and the objective: an allocator
# re-splits the same demands at every capacity change, and building the matrices and the
# greedy's hull steps is most of a split's cost at scale. Demands are frozen and a problem
# holds its own, so the same objects (their ids taken while they live) mean the same problem.
_PROBLEMS: collections.OrderedDict[tuple, "_Problem"] = collections.OrderedDict()
_PROBLEMS_KEPT = 2


def _problem(demands: Sequence[Demand], objective: str) -> "_Problem":
    key = (objective, tuple(map(id, demands)))
    problem = _PROBLEMS.get(key)
    if problem is None:
        problem = _PROBLEMS[key] = _Problem(demands, objective)
        if len(_PROBLEMS) > _PROBLEMS_KEPT:
            _PROBLEMS.popitem(last=False)
    _PROBLEMS.move_to_end(key)
    return problem


STRATEGIES: dict[str, Callable[[_Problem, float], Allocation]] = {
    "equal": _equal, "model_aware": _model_aware, "greedy": _greedy_only,
    "quality_max": _quality_max, "optimal": _optimal,
}


def allocate(strategy: str, demands: Sequence[Demand], capacity_bps: float,
             objective: str = "expected_hits", **options) -> Allocation:
    """Split ``capacity_bps`` among ``demands`` with the named strategy and ``objective``
    (``expected_hits`` or ``mean_response``, module docstring).

    ``optimal`` accepts ``grid_cells`` (default 2000): rates are rounded up to multiples of
    capacity / grid_cells, so its plan always fits the real capacity and is exact for the
    rounded problem.
    """
    if strategy not in STRATEGIES:
        raise AllocationError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if not demands:
        raise AllocationError("nothing to allocate: no demands")
    if not (capacity_bps >= 0 and math.isfinite(capacity_bps)):
        raise AllocationError(f"capacity must be finite and >= 0 bit/s, not {capacity_bps}")
    problem = _problem(demands, objective)
    problem.values_at.clear()  # a re-split is timed and computed as a new one
    if capacity_bps == 0:
        rate = np.zeros(len(demands))
        return problem.result(strategy, 0.0, problem.modes_at(rate), rate)
    return STRATEGIES[strategy](problem, capacity_bps, **options)

