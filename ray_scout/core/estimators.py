"""Bandwidth estimators: what rate an agent should plan its next payload for.

What lives here: four predictors behind one interface: the allocator's grant passed through,
the last measured sample, an EWMA, and robustMPC's harmonic mean of recent samples discounted
by the largest recent relative prediction error. What they know: throughput samples
(bytes over seconds at a time) and, for the grant, the allocator's word. What they leave to
others: measuring transfers (the data plane) and choosing a mode (``policy``).
"""

from __future__ import annotations

import collections
from typing import Protocol


class EstimatorError(ValueError):
    """A throughput sample or estimator parameter that cannot be used."""


class BandwidthEstimator(Protocol):
    name: str

    def observe(self, size_bytes: int, seconds: float, t: float) -> None:
        """A transfer of ``size_bytes`` took ``seconds`` and ended at time ``t``."""

    def estimate(self, t: float) -> float:
        """The planned rate in bit/s at time ``t``."""


def _sample_bps(size_bytes: int, seconds: float) -> float:
    if size_bytes < 0:
        raise EstimatorError(f"size_bytes must be >= 0, not {size_bytes}")
    if not seconds > 0:
        raise EstimatorError(f"a transfer must take positive time, not {seconds} s")
    return size_bytes * 8 / seconds


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
    """The most recent measured throughput (``initial_bps`` before any)."""

    name = "last"

    def __init__(self, initial_bps: float):
        self.value_bps = float(initial_bps)

    def observe(self, size_bytes: int, seconds: float, t: float) -> None:
        self.value_bps = _sample_bps(size_bytes, seconds)

    def estimate(self, t: float) -> float:
        return self.value_bps


class EwmaEstimator:
    """Exponentially weighted moving average: ``alpha`` weighs the newest sample."""

    name = "ewma"

    def __init__(self, initial_bps: float, alpha: float = 0.3):
        if not 0 < alpha <= 1:
            raise EstimatorError(f"alpha must lie in (0, 1], not {alpha}")
        self.alpha = alpha
        self.value_bps = float(initial_bps)

    def observe(self, size_bytes: int, seconds: float, t: float) -> None:
        sample = _sample_bps(size_bytes, seconds)
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

    def __init__(self, initial_bps: float, window: int = 5):
        if window < 1:
            raise EstimatorError(f"window must be >= 1, not {window}")
        self.initial_bps = float(initial_bps)
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
