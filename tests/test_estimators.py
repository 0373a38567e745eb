import pytest
from hypothesis import given, strategies as st

from ray_scout.core.control.estimators import (
    DEFAULT_MIN_SAMPLE_BYTES, EstimatorError, EwmaEstimator, GrantEstimator,
    LastSampleEstimator, RobustHarmonicEstimator, make_estimator, sample_floor_bytes,
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


# --- the size floor: transfers too small to measure the rate ----------------------------
def test_sample_floor_is_nine_bandwidth_delay_products_for_ten_percent_error():
    # A transfer that carries fixed_s of time the rate does not explain measures
    # 8S / (8S/R + fixed_s); within 10% of R from S = 9 x R x fixed_s / 8 bytes on.
    assert sample_floor_bytes(100e6, 0.001, error=0.1) == 112_500
    assert DEFAULT_MIN_SAMPLE_BYTES == sample_floor_bytes(200e6, 2.1e-3, error=0.1)


@given(st.floats(1e5, 1e10), st.floats(1e-5, 0.1), st.floats(0.01, 0.5))
def test_a_transfer_at_the_floor_measures_the_rate_within_the_error(rate_bps, fixed_s, error):
    size = sample_floor_bytes(rate_bps, fixed_s, error)
    measured = size * 8 / (size * 8 / rate_bps + fixed_s)
    assert measured >= rate_bps * (1 - error) * (1 - 1e-12)


def test_sample_floor_refuses_an_error_outside_zero_to_one():
    with pytest.raises(EstimatorError, match="error"):
        sample_floor_bytes(1e6, 0.001, error=1.0)


@pytest.mark.parametrize("name", ["last", "ewma", "robust"])
def test_scout_sized_transfers_do_not_move_a_measured_estimate(name):
    est = make_estimator(name, 1e6, min_sample_bytes=100_000)
    est.observe(1_250_000, 1.0, t=0)           # 10 Mbit/s
    before = est.estimate(0)
    for t in range(1, 20):
        est.observe(200, 0.0005, t=t)           # a scout payload: one round trip, 3.2 Mbit/s
    assert est.estimate(20) == pytest.approx(before)


def test_robust_keeps_planning_at_the_rate_large_transfers_measure_among_small_ones():
    # The estimators experiment's failure: scout samples between KV samples dragged the
    # robust estimate to a fifth of the grant. With the default floor they are not samples.
    est = RobustHarmonicEstimator(1e6)
    for t in range(10):
        est.observe(3_000_000, 3_000_000 * 8 / 9.6e6, t=2 * t)  # KV at 0.96 of a 10 Mbit/s grant
        est.observe(190, 0.0004, t=2 * t + 1)                    # scout
    assert est.estimate(20) == pytest.approx(9.6e6)


def test_a_transfer_below_the_floor_is_still_validated():
    with pytest.raises(EstimatorError, match="positive time"):
        make_estimator("robust", 1e6, min_sample_bytes=1_000).observe(10, -1.0, t=0)


def test_a_negative_floor_is_refused():
    with pytest.raises(EstimatorError, match="min_sample_bytes"):
        make_estimator("ewma", 1e6, min_sample_bytes=-1)
