"""The queue in front of one edge agent: how likely a request is to meet its deadline.

What lives here: the response-time distribution of an agent that serves its requests one at
a time in arrival order (one edge model, a FIFO) with Poisson arrivals and a deterministic
service time (M/D/1), with and without the testbed's rule that work past its deadline is
abandoned, and the inverse: the longest service that keeps a given share of requests in
time. What it knows: arrival rate, service time, deadline. What it leaves to others: what the
service is made of (``allocation``, ``policy``); ``allocation.service_budget_s`` is the older
criterion (the mean response, Pollaczek-Khinchine).

Plain M/D/1. With arrival rate lambda, service D and load rho = lambda D < 1, the wait W of an
arriving request (PASTA: it sees the time-average workload) has

    P(W <= t) = (1 - rho) G(t),
    G(t) = sum_{k=0}^{floor(t/D)} (lambda (k D - t))^k / k! e^{-lambda (k D - t)}

Erlang's M/D/1 waiting-time formula (Erlang 1909; Crommelin 1932; Iversen, *Teletraffic
Engineering and Network Planning*, DTU 2015, ch. 13; Franx, "A simple solution for the M/D/c
waiting time distribution", Oper. Res. Lett. 29 (2001) 221-229, at c = 1).

With abandonment at the deadline (``hit_probability``), the queue the EdgeAgent and the
simulator run: a request that waited past its deadline T expires unserved, and one whose
answer would come late is cut off at T. A request arriving to workload v (the time until the
agent is free) then adds min(v + D, T) - v, so the workload never exceeds T, and it hits iff
v <= T - D. For x < T the workload's level-crossing equation (Brill & Posner, "Level crossings
in point processes applied to queues", Oper. Res. 25 (1977) 662-674) is the plain queue's,
so its distribution on [0, T] is the plain one's, renormalized: P(V <= x) = G(x) / G(T), for
any load, rho >= 1 included (the truncation result for M/G/1 with workload-based rejection:
Perry & Asmussen, "Rejection rules in the M/G/1 queue", Queueing Systems 19 (1995) 105-130).
Hence

    P(hit) = G(T - D) / G(T)     (0 if D > T; 1 without arrivals).

``tests/test_queueing.py`` checks both against Lindley's recursion over simulated arrivals.

Numerics: the terms of G alternate in sign and their magnitudes sum to at most e^{2 lambda t},
so float64 loses about 1e-16 e^{2 lambda t}; where lambda t > ``_FLOAT_LOAD`` the sum is
taken in decimal arithmetic with enough digits instead (rare: a deadline spanning many
arrivals).
"""

from __future__ import annotations

import decimal
import math

import numpy as np


class QueueingError(ValueError):
    """Arrival rates, service times or deadlines a queue formula cannot take."""


# Above this lambda * t the float64 sum may lose more than ~1e-7 (e^{2 x 8} x 1e-16).
_FLOAT_LOAD = 8.0


def _erlang_sum_decimal(t: float, service_s: float, rate: float) -> float:
    with decimal.localcontext() as ctx:
        ctx.prec = 30 + int(rate * t)  # e^{2 lambda t} < 10^{0.87 lambda t}
        lam, d, tt = decimal.Decimal(rate), decimal.Decimal(service_s), decimal.Decimal(t)
        total, factorial = decimal.Decimal(0), decimal.Decimal(1)
        for k in range(int(t // service_s) + 1):
            if k:
                factorial *= k
            x = lam * (k * d - tt)
            total += x ** k / factorial * (-x).exp()
        return float(total)


def _arrays(*values) -> tuple[tuple[int, ...], list[np.ndarray]]:
    shape = np.broadcast_shapes(*(np.shape(v) for v in values))
    arrays = [np.broadcast_to(np.atleast_1d(np.asarray(v, dtype=float)), shape or (1,))
              for v in values]
    return shape, arrays


def erlang_sum(t, service_s, arrival_rate_hz) -> np.ndarray:
    """G(t) of the module docstring (>= 1 for t >= 0, 0 for t < 0); arrays broadcast."""
    shape, (t, d, lam) = _arrays(t, service_s, arrival_rate_hz)
    if (d < 0).any() or (lam < 0).any() or not np.isfinite(lam).all() or np.isnan(t).any():
        raise QueueingError("service times and arrival rates must be >= 0 (rates finite), "
                            "times not NaN")
    out = np.where(t >= 0, 1.0, 0.0)  # no arrivals or no service: G = 1
    todo = (t >= 0) & (lam > 0) & (d > 0)
    with np.errstate(over="ignore"):  # a vast t (a near-zero rate's service) is just slow
        slow = todo & (lam * t > _FLOAT_LOAD)
    fast = todo & ~slow
    if fast.any():
        tf, df, lf = t[fast], d[fast], lam[fast]
        terms = np.floor(tf / df)
        total = np.zeros(tf.shape)
        log_factorial = 0.0
        for k in range(int(terms.max()) + 1):
            if k:
                log_factorial += math.log(k)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                x = lf * (k * df - tf)  # <= 0 for every k that counts (the others masked)
                mag = np.exp(k * np.log(np.abs(x)) - log_factorial - x) if k else np.exp(-x)
            term = -mag if k % 2 else mag  # x^k has the sign of (-1)^k
            total += np.where(k <= terms, np.nan_to_num(term), 0.0)
        out[fast] = total
    for i in zip(*np.nonzero(slow)):
        out[i] = _erlang_sum_decimal(float(t[i]), float(d[i]), float(lam[i]))
    return out.reshape(shape)


def wait_cdf(t, service_s, arrival_rate_hz) -> np.ndarray:
    """P(W <= t) of a plain M/D/1 FIFO queue (Erlang's formula); arrays broadcast.

    0 where the queue is unstable (lambda D >= 1: the wait grows without bound).
    """
    rho = np.asarray(arrival_rate_hz, float) * np.asarray(service_s, float)
    return np.clip(np.where(rho < 1, (1 - rho) * erlang_sum(t, service_s, arrival_rate_hz),
                            0.0), 0.0, 1.0)


def hit_probability(deadline_s, service_s, arrival_rate_hz) -> np.ndarray:
    """P(a request meets ``deadline_s``) when work past its deadline is abandoned (module
    docstring): G(T - D) / G(T); infinite service never hits. Arrays broadcast."""
    deadline_s, service_s = np.asarray(deadline_s, float), np.asarray(service_s, float)
    finite = np.isfinite(service_s)
    d = np.where(finite, service_s, 0.0)
    left = np.where(finite, deadline_s - d, -1.0)
    ratio = erlang_sum(left, d, arrival_rate_hz) / erlang_sum(deadline_s, d, arrival_rate_hz)
    return np.clip(np.where(left >= 0, ratio, 0.0), 0.0, 1.0)


def service_for_hit_probability(deadline_s, arrival_rate_hz, probability,
                                iterations: int = 40) -> np.ndarray:
    """The longest service whose ``hit_probability`` is at least ``probability``.

    The hit probability falls as the service grows (a longer service and a longer wait), so
    bisection on [0, T] finds it; arrays broadcast. Without arrivals every probability gives
    T (one request alone meets its deadline iff D <= T).
    """
    t, lam, p = np.broadcast_arrays(*(np.asarray(x, dtype=float)
                                      for x in (deadline_s, arrival_rate_hz, probability)))
    if ((p <= 0) | (p >= 1)).any():
        raise QueueingError("a hit probability to plan for must lie in (0, 1)")
    lo, hi = np.zeros(t.shape), t.copy()
    for _ in range(iterations):
        mid = (lo + hi) / 2
        ok = hit_probability(t, mid, lam) >= p
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
    # The whole deadline, where it keeps the share (no arrivals; low shares): exactly T.
    return np.where(hit_probability(t, t, lam) >= p, t, lo)


def adaptive_quality(deadline_s, arrival_rate_hz, service_s, quality, guard=False,
                     grid: int = 300) -> np.ndarray:
    """Expected quality per request of an agent that sends, to each request, the best mode
    that fits the time it has left, with abandonment at the deadline; one value per case.

    ``service_s`` and ``quality`` are (cases, modes) arrays (NaN or inf service: a mode the
    agent cannot send); ``deadline_s``, ``arrival_rate_hz`` and ``guard`` one per case (or
    one for all). A request arriving to workload v gets the mode of highest quality with
    service <= T - v (none: it misses and adds nothing), so the jump is state-dependent. With
    ``guard`` (the queue-aware policy, ``policy.QueueAwarePolicy``) and arrivals, a mode other
    than the fastest is sent only if its service leaves the fastest one's time before the
    deadline (service <= T - fastest), so that a request arriving during it can still be
    served. The workload density still obeys the level-crossing equation (Brill & Posner
    1977), now a Volterra equation,

        f(x) = lambda [ p0 1(J(0) > x) + int_0^x f(v) 1(v + J(v) > x) dv ],  0 < x < T,

    with J(v) the service chosen at workload v; it is solved forward on ``grid`` steps with
    the atom p0 at 0 set to 1, then normalized. A request's mode is then that of the
    workload it finds (PASTA). Unlike ``hit_probability``'s queue, a request that no mode
    fits is not sent (the adaptive policy's fallback), so it adds no work.

    The integral is kept as a running sum: the mass at v enters when x passes v and leaves
    when x reaches v + J(v), so each step costs O(cases), the whole solve O(grid x cases).
    ``tests/test_queueing.py`` checks it against simulated queues.
    """
    service = np.atleast_2d(np.asarray(service_s, dtype=float))
    q = np.atleast_2d(np.asarray(quality, dtype=float))
    cases = service.shape[0]
    t = np.broadcast_to(np.asarray(deadline_s, dtype=float), (cases,))
    lam = np.broadcast_to(np.asarray(arrival_rate_hz, dtype=float), (cases,))
    guarded = np.broadcast_to(np.asarray(guard, dtype=bool), (cases,)) & (lam > 0)
    usable = np.isfinite(service) & np.isfinite(q)
    fastest = np.where(usable, service, np.inf).min(axis=1)
    usable &= ~guarded[:, None] | (service <= (t - fastest)[:, None] + 1e-12) | (
        service == fastest[:, None])
    out = np.empty(cases)
    for lo in range(0, cases, _CASES_PER_SOLVE):
        part = slice(lo, lo + _CASES_PER_SOLVE)
        out[part] = _adaptive_solve(t[part], lam[part], np.where(usable[part], service[part],
                                                                 np.nan), q[part], grid)
    return out


# Cases solved together: the (cases, grid) arrays stay in tens of MB.
_CASES_PER_SOLVE = 8192


def _adaptive_solve(t, lam, service, q, grid: int) -> np.ndarray:
    """``adaptive_quality`` for one block of cases (NaN service: a mode not sent). Arrays
    are (grid + 1, cases): the forward solve reads one grid row at a time."""
    cases = len(t)
    x = (np.arange(grid + 1) / grid)[:, None] * t[None, :]
    h = t / grid
    # The mode chosen at each workload: the best quality that fits T - x (ties: the first).
    best = np.full(x.shape, -np.inf)
    jump = np.zeros(x.shape)
    for k in range(service.shape[1]):
        better = (service[None, :, k] <= t[None, :] - x + 1e-12) & (q[None, :, k] > best)
        best = np.where(better, q[None, :, k], best)
        jump = np.where(better, service[None, :, k], jump)
    gain = np.where(np.isfinite(best), best, 0.0)
    cols = np.arange(cases)
    # The first grid index at or beyond where a jump from each point lands: the mass at
    # point j counts for the points j < i < leaves[j].
    with np.errstate(divide="ignore", invalid="ignore"):
        leaves = np.ceil((x + jump) / np.where(h > 0, h, np.inf)[None, :] - 1e-9)
    leaves = np.clip(np.nan_to_num(leaves), 0, grid + 1).astype(np.int64)
    density = np.zeros((grid + 1, cases))
    expiring = np.zeros((grid + 2, cases))
    active = np.zeros(cases)
    starts = (jump[0][None, :] > x).astype(float)       # the atom at 0's jump covers x
    for i in range(1, grid + 1):
        j = i - 1
        if j:  # the atom at 0 enters through ``starts``, not the integral
            mass_j = density[j] * h
            active += mass_j
            expiring[np.maximum(leaves[j], i), cols] += mass_j
        active -= expiring[i]
        density[i] = lam * (starts[i] + np.maximum(active, 0.0))
    mass = density * h[None, :]
    mass[0] = 1.0                                       # the atom at an empty agent
    return (mass * gain).sum(axis=0) / mass.sum(axis=0)
