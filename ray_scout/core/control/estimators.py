"""Bandwidth estimators: what rate an agent should plan its next payload for.

What lives here: four predictors behind one interface: the allocator's grant passed through,
the last measured sample, an EWMA, and robustMPC's harmonic mean of recent samples discounted
by the largest recent relative prediction error; and the size floor below which a transfer
is not a throughput sample. What they know: throughput samples (bytes over seconds at a
time) and, for the grant, the allocator's word. What they leave to others: measuring
transfers (the data plane) and choosing a mode (``policy``).

The size floor. A measured transfer of S bytes at rate R also carries time the rate does not
explain (the last ACK's round trip, the sender's poll for it, slow-start rounds): call it
``fixed_s``. It measures ``8S / (8S/R + fixed_s)``, within ``error`` of R only when
``S >= (1 - error) / error x R x fixed_s / 8``: nine bandwidth-delay products for 10%.
A scout payload of 200 bytes is pure ``fixed_s``; its "throughput" says nothing about R.
"""

from __future__ import annotations

import collections
import math
from typing import Protocol


class EstimatorError(ValueError):
    """A throughput sample or estimator parameter that cannot be used."""


class BandwidthEstimator(Protocol):
    name: str

    def observe(self, size_bytes: int, seconds: float, t: float) -> None:
        """A transfer of ``size_bytes`` took ``seconds`` and ended at time ``t``."""

    def estimate(self, t: float) -> float:
        """The planned rate in bit/s at time ``t``."""


def sample_floor_bytes(rate_bps: float, fixed_s: float, error: float = 0.1) -> int:
    """The smallest transfer whose measured throughput is within ``error`` of ``rate_bps``
    when every transfer carries ``fixed_s`` seconds that the rate does not explain."""
    if not 0 < error < 1:
        raise EstimatorError(f"error must lie in (0, 1), not {error}")
    if rate_bps < 0 or fixed_s < 0:
        raise EstimatorError("rate_bps and fixed_s must be >= 0")
    bdp_bytes = rate_bps * fixed_s / 8
    return math.ceil((1 - error) / error * bdp_bytes * (1 - 1e-12))


# The default floor, for the testbed's links: the fastest rate a shipped spec can give one
# agent (200 Mbit/s, the top state of Paper B's Markov chain) and, beyond bytes / rate, the
# last ACK's round trip (about 0.1 ms on the rate-only lab links) plus the sender's poll for
# zero unacked bytes, which backs off to 2 ms (``transport.client``). 472.5 kB: scout
# payloads (hundreds of bytes) fall below it, KV payloads (>= 1 MB in the specs) above.
# Links with propagation delay need their own: ``sample_floor_bytes(rate, rtt + 2 ms)``.
DEFAULT_MIN_SAMPLE_BYTES = sample_floor_bytes(200e6, 2.1e-3, error=0.1)


def _sample_bps(size_bytes: int, seconds: float) -> float:
    if size_bytes < 0:
        raise EstimatorError(f"size_bytes must be >= 0, not {size_bytes}")
    if not seconds > 0:
        raise EstimatorError(f"a transfer must take positive time, not {seconds} s")
    return size_bytes * 8 / seconds


def _check_floor(min_sample_bytes: int) -> int:
    if min_sample_bytes < 0:
        raise EstimatorError(f"min_sample_bytes must be >= 0, not {min_sample_bytes}")
    return min_sample_bytes


class GrantEstimator:
    """Plans at the rate the allocator granted; measurements do not move it."""

    name = "grant"

    def __init__(self, initial_bps: float = 0.0):
        self.grant_bps = float(initial_bps)

    def set_grant(self, rate_bps: float) -> None:
        if rate_bps < 0:
            raise EstimatorError(f"a grant must be >= 0 bit/s, not {rate_bps}")
        self.grant_bps = float(rate_bps)

    def observe(self, size_bytes: int, seconds: float, t: float) -> None:
        # Validated so bad samples fail loudly whichever estimator an agent runs.
        _sample_bps(size_bytes, seconds)

    def estimate(self, t: float) -> float:
        return self.grant_bps


class LastSampleEstimator:
    """The most recent measured throughput (``initial_bps`` before any).

    Like every measured estimator, it ignores transfers under ``min_sample_bytes`` (they are
    still validated): see the module docstring for the floor.
    """

    name = "last"

    def __init__(self, initial_bps: float, min_sample_bytes: int = DEFAULT_MIN_SAMPLE_BYTES):
        self.value_bps = float(initial_bps)
        self.min_sample_bytes = _check_floor(min_sample_bytes)

    def observe(self, size_bytes: int, seconds: float, t: float) -> None:
        sample = _sample_bps(size_bytes, seconds)
        if size_bytes >= self.min_sample_bytes:
            self.value_bps = sample

    def estimate(self, t: float) -> float:
        return self.value_bps


class EwmaEstimator:
    """Exponentially weighted moving average: ``alpha`` weighs the newest sample."""

    name = "ewma"

    def __init__(self, initial_bps: float, alpha: float = 0.3,
                 min_sample_bytes: int = DEFAULT_MIN_SAMPLE_BYTES):
        if not 0 < alpha <= 1:
            raise EstimatorError(f"alpha must lie in (0, 1], not {alpha}")
        self.alpha = alpha
        self.value_bps = float(initial_bps)
        self.min_sample_bytes = _check_floor(min_sample_bytes)

    def observe(self, size_bytes: int, seconds: float, t: float) -> None:
        sample = _sample_bps(size_bytes, seconds)
        if size_bytes >= self.min_sample_bytes:
            self.value_bps = self.alpha * sample + (1 - self.alpha) * self.value_bps

    def estimate(self, t: float) -> float:
        return self.value_bps


class RobustHarmonicEstimator:
    """robustMPC: harmonic mean of the last ``window`` samples / (1 + max recent error).

    Each sample is first scored against the prediction made before it arrived
    (``|predicted - actual| / actual``); the prediction is then divided by one plus the
    largest of the last ``window`` errors, so a link that has surprised us recently is
    planned for conservatively. The harmonic mean keeps one fast outlier from dominating.
    """

    name = "robust"

    def __init__(self, initial_bps: float, window: int = 5,
                 min_sample_bytes: int = DEFAULT_MIN_SAMPLE_BYTES):
        if window < 1:
            raise EstimatorError(f"window must be >= 1, not {window}")
        self.initial_bps = float(initial_bps)
        self.min_sample_bytes = _check_floor(min_sample_bytes)
        self.samples_bps: collections.deque[float] = collections.deque(maxlen=window)
        self.errors: collections.deque[float] = collections.deque(maxlen=window)

    def _harmonic_bps(self) -> float:
        if not self.samples_bps:
            return self.initial_bps
        if min(self.samples_bps) == 0:
            return 0.0
        return len(self.samples_bps) / sum(1 / s for s in self.samples_bps)

    def observe(self, size_bytes: int, seconds: float, t: float) -> None:
        sample = _sample_bps(size_bytes, seconds)
        if size_bytes < self.min_sample_bytes:
            return
        if self.samples_bps and sample > 0:
            predicted = self._harmonic_bps()
            self.errors.append(abs(predicted - sample) / sample)
        self.samples_bps.append(sample)

    def estimate(self, t: float) -> float:
        return self._harmonic_bps() / (1 + max(self.errors, default=0.0))


def make_estimator(name: str, initial_bps: float, **kwargs) -> BandwidthEstimator:
    """An estimator by its ``name``: grant, last, ewma or robust."""
    kinds = {c.name: c for c in (GrantEstimator, LastSampleEstimator, EwmaEstimator,
                                 RobustHarmonicEstimator)}
    try:
        return kinds[name](initial_bps, **kwargs)
    except KeyError:
        raise EstimatorError(f"unknown estimator {name!r}; known: {', '.join(kinds)}") from None
