import pytest

from ray_scout.core.estimators import (
    EstimatorError, EwmaEstimator, GrantEstimator, LastSampleEstimator,
    RobustHarmonicEstimator, make_estimator,
)


def test_grant_passes_the_allocator_rate_through_and_ignores_measurements():
    est = GrantEstimator(5e6)
    est.observe(1_000_000, 1.0, t=1.0)
    assert est.estimate(1.0) == 5e6
    est.set_grant(12.5e6)
    assert est.estimate(2.0) == 12.5e6


def test_last_sample_tracks_the_latest_transfer():
    est = LastSampleEstimator(1e6)
    est.observe(1_000_000, 0.5, t=0.5)
    assert est.estimate(0.5) == pytest.approx(16e6)


def test_ewma_weighs_the_newest_sample_by_alpha():
    est = EwmaEstimator(10e6, alpha=0.5)
    est.observe(2_500_000, 1.0, t=1.0)  # 20 Mbit/s
    assert est.estimate(1.0) == pytest.approx(15e6)


def test_robust_is_the_harmonic_mean_when_predictions_were_exact():
    est = RobustHarmonicEstimator(1e6, window=5)
    for _ in range(3):
        est.observe(1_250_000, 1.0, t=0)  # 10 Mbit/s every time: zero error after the first
    assert est.estimate(0) == pytest.approx(10e6)


def test_robust_discounts_by_the_largest_recent_error():
    est = RobustHarmonicEstimator(1e6, window=5)
    est.observe(1_250_000, 1.0, t=0)   # 10 Mbit/s
    est.observe(2_500_000, 1.0, t=1)   # 20 Mbit/s: predicted 10, error 0.5
    harmonic = 2 / (1 / 10e6 + 1 / 20e6)
    assert est.estimate(1) == pytest.approx(harmonic / 1.5)


def test_robust_forgets_errors_older_than_its_window():
    est = RobustHarmonicEstimator(1e6, window=2)
    est.observe(1_250_000, 1.0, t=0)
    est.observe(12_500_000, 1.0, t=1)  # big surprise
    for t in range(2, 6):
        est.observe(12_500_000, 1.0, t=t)
    assert est.estimate(6) == pytest.approx(100e6)


@pytest.mark.parametrize("name", ["grant", "last", "ewma", "robust"])
def test_every_estimator_refuses_a_zero_duration_sample(name):
    with pytest.raises(EstimatorError, match="positive time"):
        make_estimator(name, 1e6).observe(100, 0.0, t=0)


def test_unknown_estimator_lists_the_known_ones():
    with pytest.raises(EstimatorError, match="robust"):
        make_estimator("kalman", 1e6)
