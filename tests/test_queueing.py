import numpy as np
import pytest

from ray_scout.core.control.queueing import (
    QueueingError, erlang_sum, hit_probability, service_for_hit_probability, wait_cdf,
)


def lindley_waits(service_s, rate_hz, n=100_000, seed=1):
    """Waits of a plain M/D/1 FIFO queue, arrival by arrival (Lindley's recursion)."""
    gaps = np.random.default_rng(seed).exponential(1 / rate_hz, n)
    waits, w = np.empty(n), 0.0
    for i, gap in enumerate(gaps):
        waits[i] = w
        w = max(w + service_s - gap, 0.0)
    return waits


def abandoning_hits(service_s, rate_hz, deadline_s, n=100_000, seed=1):
    """Share of requests in time when work past its deadline is dropped (the testbed's rule):
    a request that waited past the deadline adds nothing, one that would finish late is cut
    off at the deadline."""
    gaps = np.random.default_rng(seed).exponential(1 / rate_hz, n)
    v, hits = 0.0, 0
    for gap in gaps:
        hits += v + service_s <= deadline_s
        if v < deadline_s:
            v = min(v + service_s, deadline_s)
        v = max(v - gap, 0.0)
    return hits / n


@pytest.mark.parametrize("service_s, rate_hz", [(2.0, 0.25), (1.0, 0.6), (0.3, 2.0)])
def test_erlang_md1_wait_distribution_matches_lindleys_recursion(service_s, rate_hz):
    waits = lindley_waits(service_s, rate_hz)
    for t in (0.0, 0.5 * service_s, 1.5 * service_s, 3.2 * service_s):
        assert float(wait_cdf(t, service_s, rate_hz)) == pytest.approx(
            np.mean(waits <= t), abs=0.015)


@pytest.mark.parametrize("service_s, rate_hz, deadline_s", [
    (2.125, 0.25, 2.5),   # allocation_congestion, always-INT4 under model_aware: 62%
    (1.0, 0.8, 2.0), (0.5, 3.0, 2.0),  # the last at load 1.5: still a distribution
    (0.1, 9.0, 2.5)])     # lambda T = 22.5: the decimal path
def test_hit_probability_with_abandonment_matches_a_simulated_queue(service_s, rate_hz,
                                                                   deadline_s):
    assert float(hit_probability(deadline_s, service_s, rate_hz)) == pytest.approx(
        abandoning_hits(service_s, rate_hz, deadline_s), abs=0.01)


def test_hit_probability_edges():
    assert float(hit_probability(2.0, 1.9, 0.0)) == 1.0  # alone: in time iff D <= T
    assert float(hit_probability(2.0, 2.1, 0.0)) == 0.0
    assert float(hit_probability(2.0, 2.1, 0.5)) == 0.0
    assert float(hit_probability(2.0, np.inf, 0.5)) == 0.0
    assert float(hit_probability(2.0, 0.0, 5.0)) == 1.0
    # An arrival to an empty agent hits; at D = T only those: 1 / G(T) = e^{-lambda T}.
    assert float(hit_probability(2.0, 2.0, 0.5)) == pytest.approx(np.exp(-1.0))
    with pytest.raises(QueueingError, match=">= 0"):
        hit_probability(2.0, 1.0, -1.0)


def test_the_decimal_sum_agrees_with_the_float_one_where_both_are_exact():
    from ray_scout.core.control.queueing import _erlang_sum_decimal

    for t, d, lam in ((2.5, 0.3, 3.0), (7.0, 1.1, 1.0), (1.0, 0.05, 7.5)):
        assert _erlang_sum_decimal(t, d, lam) == pytest.approx(float(erlang_sum(t, d, lam)),
                                                                rel=1e-9)


@pytest.mark.parametrize("rate_hz", [0.25, 1.0, 4.0])
def test_the_service_for_a_hit_probability_is_the_longest_that_keeps_it(rate_hz):
    levels = np.array([0.6, 0.9, 0.99])
    service = service_for_hit_probability(2.5, rate_hz, levels)
    assert (np.diff(service) < 0).all()  # more hits, shorter service
    assert (hit_probability(2.5, service, rate_hz) >= levels - 1e-9).all()
    assert (hit_probability(2.5, service * 1.001, rate_hz) < levels).all()
    with pytest.raises(QueueingError, match=r"\(0, 1\)"):
        service_for_hit_probability(2.5, rate_hz, 1.0)


def adaptive_simulated(services, qualities, rate_hz, deadline_s, n=100_000, seed=2,
                       guard=False):
    """Mean quality when each request gets the best mode that fits its time left, and one
    that no mode fits is not sent; with ``guard``, a mode other than the fastest only if it
    leaves the fastest one's time before the deadline."""
    gaps = np.random.default_rng(seed).exponential(1 / rate_hz, n)
    order = np.argsort(qualities)[::-1]
    fastest = min(services)
    v, total = 0.0, 0.0
    for gap in gaps:
        for j in order:
            if guard and services[j] > deadline_s - fastest and services[j] != fastest:
                continue
            if v + services[j] <= deadline_s:
                total += qualities[j]
                v += services[j]
                break
        v = max(v - gap, 0.0)
    return total / n


@pytest.mark.parametrize("services, rate_hz", [
    ((1.64, 0.575), 0.25),          # allocation_congestion's KV plan with its scout fallback
    ((2.2, 0.575), 0.25), ((1.4, 1.0, 0.575), 1.0), ((1.0,), 0.8)])
def test_adaptive_quality_matches_a_simulated_adaptive_agent(services, rate_hz):
    from ray_scout.core.control.queueing import adaptive_quality

    qualities = (1.07, 0.962, 0.813)[:len(services)]
    expected = adaptive_simulated(services, qualities, rate_hz, 2.5)
    got = float(adaptive_quality(2.5, rate_hz, [list(services)], [list(qualities)])[0])
    assert got == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("services, rate_hz", [
    ((2.44, 0.575), 0.25),          # model_aware's KV, ending 0.06 s before the deadline
    ((1.8, 0.575), 0.25), ((2.2, 1.4, 0.575), 1.0)])
def test_adaptive_quality_of_a_guarding_agent_matches_a_simulated_one(services, rate_hz):
    from ray_scout.core.control.queueing import adaptive_quality

    qualities = (1.07, 0.962, 0.813)[-len(services):]
    expected = adaptive_simulated(services, qualities, rate_hz, 2.5, guard=True)
    got = float(adaptive_quality(2.5, rate_hz, [list(services)], [list(qualities)],
                                 guard=True)[0])
    assert got == pytest.approx(expected, abs=0.01)
    # Where every KV mode leaves less than scout's time the agent sends scout to everyone,
    # where the unguarded one sends KV and misses some.
    if min(services[:-1]) > 2.5 - 0.575:
        assert got == pytest.approx(0.813, abs=1e-4)
        assert float(adaptive_quality(2.5, rate_hz, [list(services)], [list(qualities)])[0]) \
            != pytest.approx(0.813, abs=0.01)
