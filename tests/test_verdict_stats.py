"""Verdict statistics against scipy on known data: exact McNemar, paired bootstrap, power."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ray_scout.core.evaluation.metrics import (
    mcnemar_exact,
    mcnemar_pairs_needed,
    paired_pairs_needed,
    paired_test,
)


def hits_with(a_only: int, b_only: int, both: int, neither: int):
    a = [1] * a_only + [0] * b_only + [1] * both + [0] * neither
    b = [0] * a_only + [1] * b_only + [1] * both + [0] * neither
    return a, b


@pytest.mark.parametrize("a_only, b_only", [(0, 0), (3, 0), (7, 2), (12, 25), (40, 41),
                                            (600, 520), (5000, 4800)])
def test_exact_mcnemar_is_scipys_binomial_test_of_the_discordant_pairs(a_only, b_only):
    a, b = hits_with(a_only, b_only, both=30, neither=5)
    result = mcnemar_exact(a, b)
    assert (result.a_only, result.b_only, result.n) == (a_only, b_only, len(a))
    expected = 1.0 if a_only + b_only == 0 else \
        stats.binomtest(a_only, a_only + b_only, 0.5).pvalue
    assert result.p_value == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_exact_mcnemar_refuses_unpaired_or_non_binary_hits():
    with pytest.raises(ValueError, match="same samples"):
        mcnemar_exact([1, 0], [1])
    with pytest.raises(ValueError, match="hits"):
        mcnemar_exact([0.5, 1], [1, 1])


def test_paired_bootstrap_interval_matches_scipys_percentile_bootstrap():
    rng = np.random.default_rng(7)
    a = rng.uniform(0.6, 1.0, 400) * (rng.random(400) < 0.9)
    b = rng.uniform(0.5, 1.0, 400) * (rng.random(400) < 0.85)
    ours = paired_test(a, b, n_resamples=4000, seed=1)
    theirs = stats.bootstrap((a - b,), np.mean, method="percentile", n_resamples=4000,
                             random_state=2).confidence_interval
    assert ours.mean_diff == pytest.approx(float(np.mean(a - b)))
    # Two independent Monte Carlo runs of the same interval: they agree to a few 1e-3.
    assert ours.low == pytest.approx(theirs.low, abs=0.006)
    assert ours.high == pytest.approx(theirs.high, abs=0.006)


def test_mcnemar_pairs_needed_gives_the_asked_power_by_simulation_with_scipys_test():
    a_only, b_only = 0.12, 0.05
    n = math.ceil(mcnemar_pairs_needed(a_only, b_only))
    rng = np.random.default_rng(3)
    draws = rng.multinomial(n, [a_only, b_only, 1 - a_only - b_only], size=1500)
    rejected = [stats.binomtest(int(x), int(x + y), 0.5).pvalue < 0.05
                for x, y, _ in draws if x + y > 0]
    assert np.mean(rejected) == pytest.approx(0.8, abs=0.05)
    assert mcnemar_pairs_needed(0.1, 0.1) == math.inf


def test_paired_pairs_needed_gives_the_asked_power_under_the_normal_model():
    diffs = np.random.default_rng(5).normal(0.05, 0.3, 500)
    n = paired_pairs_needed(diffs)
    effect = abs(diffs.mean()) / diffs.std(ddof=1)
    power = stats.norm.cdf(effect * math.sqrt(n) - stats.norm.ppf(0.975))
    assert power == pytest.approx(0.8, abs=1e-6)
    assert paired_pairs_needed([0.2, -0.2, 0.0]) == math.inf
