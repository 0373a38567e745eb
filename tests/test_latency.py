import pytest

from ray_scout import provenance

from ray_scout.core.llm.latency import LatencyProfile, measure


def profile():
    return LatencyProfile("m", "cpu", ((100, 0.01), (200, 0.03)), ((100, 0.002), (200, 0.004)))


def test_interpolates_inside_and_extrapolates_linearly_beyond():
    p = profile()
    assert p.prefill_s(150) == pytest.approx(0.02)
    assert p.prefill_s(300) == pytest.approx(0.05)
    assert p.decode_s(150, new_tokens=10) == pytest.approx(0.03)
    assert p.prefill_s(10) > 0


def test_profile_roundtrips_through_yaml(tmp_path):
    p = profile()
    p.save(tmp_path / "p.yaml")
    assert LatencyProfile.load(tmp_path / "p.yaml") == p


def test_rejects_unsorted_points():
    with pytest.raises(ValueError, match="increasing"):
        LatencyProfile("m", "cpu", ((200, 0.01), (100, 0.02)), ((1, 0.1),))


def test_measure_times_prefill_and_decode_of_a_real_model(tiny_model):
    p = measure(tiny_model, [72, 128], decode_steps=2, repeats=1, command="bench/x.py")
    assert [t for t, _ in p.prefill_points] == [72, 128]
    assert all(s > 0 for _, s in p.decode_points)
    # The profile's provenance line: the machine as measured, the commit, the command.
    assert p.provenance.startswith(provenance.machine() + "; commit " + provenance.git_commit())
    assert p.provenance.endswith("; bench/x.py")


def test_measure_refuses_prompts_too_short_for_a_prompt_layout(tiny_model):
    with pytest.raises(ValueError, match="need more than 64 tokens"):
        measure(tiny_model, [16], decode_steps=1, repeats=1)
