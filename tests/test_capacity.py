import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ray_scout.core.control.capacity import (
    MBIT, PAPER_B_STATES_BPS, CapacityTrace, TraceError, default_transition, load_mahimahi,
    load_throughput_log, markov_chain,
)


def test_rate_at_holds_each_segment_until_the_next_start():
    trace = CapacityTrace(((0, 10e6), (2.0, 5e6)), 4.0)
    assert trace.rate_at(0) == 10e6
    assert trace.rate_at(1.999) == 10e6
    assert trace.rate_at(2.0) == 5e6
    assert trace.rate_at(10.0) == 5e6  # past the end the last rate holds
    assert trace.mean_rate_bps() == pytest.approx(7.5e6)


@pytest.mark.parametrize("segments,duration", [
    ((), 1.0), (((1.0, 1e6),), 2.0), (((0, 1e6), (0, 2e6)), 1.0), (((0, -1.0),), 1.0),
    (((0, 1e6), (2.0, 1e6)), 1.5),
])
def test_malformed_traces_are_refused(segments, duration):
    with pytest.raises(TraceError):
        CapacityTrace(segments, duration)


def test_markov_chain_uses_only_paper_b_states_and_is_seeded():
    a = markov_chain(duration_s=300, seed=7)
    b = markov_chain(duration_s=300, seed=7)
    assert a == b
    assert {r for _, r in a.segments} <= set(PAPER_B_STATES_BPS)
    assert len({r for _, r in a.segments}) >= 4  # it does move around in 300 steps
    assert all(s == int(s) for s, _ in a.segments)  # changes only on 1-s steps


def test_default_transition_only_moves_to_neighbours():
    p = default_transition(6, stay_prob=0.8)
    assert np.allclose(p.sum(axis=1), 1)
    assert p[0, 1] == pytest.approx(0.2) and p[2, 1] == pytest.approx(0.1)
    assert p[0, 2] == 0


def test_markov_chain_rejects_a_non_stochastic_matrix():
    with pytest.raises(TraceError, match="row-stochastic"):
        markov_chain(transition=np.ones((6, 6)))


def test_mahimahi_rate_counts_1500_byte_opportunities_per_window(tmp_path):
    # 10 opportunities in the first 100 ms, 5 in the second.
    stamps = list(range(1, 101, 10)) + list(range(101, 201, 20))
    path = tmp_path / "link.trace"
    path.write_text("\n".join(map(str, stamps)) + "\n")
    trace = load_mahimahi(path, window_s=0.1)
    assert trace.rate_at(0.05) == pytest.approx(10 * 1500 * 8 / 0.1)
    assert trace.rate_at(0.15) == pytest.approx(5 * 1500 * 8 / 0.1)
    assert trace.duration_s == pytest.approx(0.2)


def test_mahimahi_garbage_line_names_the_line(tmp_path):
    path = tmp_path / "bad.trace"
    path.write_text("1\n2\nabc\n")
    with pytest.raises(TraceError, match=":3:"):
        load_mahimahi(path)


def test_throughput_log_reads_pensieve_columns(tmp_path):
    path = tmp_path / "cooked.log"
    path.write_text("10.0 2.5\n11.0 4.0\n12.0 1.0\n")
    trace = load_throughput_log(path)
    assert trace.segments == ((0.0, 2.5 * MBIT), (1.0, 4.0 * MBIT), (2.0, 1.0 * MBIT))
    assert trace.duration_s == pytest.approx(3.0)


def test_looped_trace_repeats_until_the_duration():
    trace = CapacityTrace(((0, 1e6), (1.0, 2e6)), 2.0).looped(5.0)
    assert trace.rate_at(2.5) == 1e6 and trace.rate_at(3.5) == 2e6 and trace.rate_at(4.5) == 1e6


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 10), st.floats(0, 1e9)), min_size=1, max_size=8),
       st.sampled_from([".yaml", ".csv"]))
def test_save_then_load_roundtrips(tmp_path_factory, steps, suffix):
    start, segs = 0.0, []
    for gap, rate in steps:
        segs.append((start, rate))
        start += gap
    trace = CapacityTrace(tuple(segs), start)
    path = tmp_path_factory.mktemp("trace") / f"t{suffix}"
    trace.save(path)
    assert CapacityTrace.load(path) == trace
