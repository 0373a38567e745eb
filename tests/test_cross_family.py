"""Cross-family scout runs: rows per sample, mapping measures, resume and summary, and the
--alignment-only run (tiny models; tests/test_gemma.py runs the real pair)."""

import pytest
import torch

from ray_scout import cli
from ray_scout.core.llm import models
from ray_scout.core.llm.scout import mapping_coverage
from ray_scout.experiments import cross_family


def test_mapping_coverage_counts_characters_not_tokens():
    # Edge tokens: "ab|cd|ef"; cloud tokens: "a|bcd|ef". Keeping edge token 1 ("cd") keeps
    # cloud token 1 ("bcd"): every kept character is covered, 2 of its 3 were selected.
    edge = torch.tensor([[0, 2], [2, 4], [4, 6]])
    cloud = torch.tensor([[0, 1], [1, 4], [4, 6]])
    result = mapping_coverage(edge, cloud, [1], 6)
    assert result.cloud_positions.tolist() == [1]
    assert result.coverage == 1.0
    assert result.precision == pytest.approx(2 / 3)
    assert result.cloud_retention == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def pair(tiny_model):
    return [("tiny-a", tiny_model), ("tiny-b", models.load_model("random:tiny", seed=1))]


def test_rows_per_sample_cover_both_directions(pair, tmp_path):
    rows = list(cross_family.measure_rows(pair, "single_needle", 120, 2, max_new_tokens=3,
                                          log=lambda msg: None))
    per_sample = 2 * (1 + 2 * len(cross_family.RETENTIONS))
    assert len(rows) == 2 * per_sample
    mapped = [r for r in rows if r["selection"] == cross_family.MAPPED]
    assert {(r["edge_model"], r["cloud_model"]) for r in mapped} == {("tiny-a", "tiny-b"),
                                                                     ("tiny-b", "tiny-a")}
    # One tokenizer on both sides: the mapping is the identity.
    assert all(r["coverage"] == 1.0 and r["precision"] == 1.0 for r in mapped)
    for r in mapped:
        assert 0.0 <= r["alignment"] <= 1.0
        # Chance is a share of characters: near the retention, tokens differ in length.
        assert r["chance_alignment"] == pytest.approx(r["retention"], abs=0.1)
    path = tmp_path / "rows.csv"
    assert cross_family.append_rows(path, iter(rows)) == len(rows)
    stored = cross_family.read_rows(path)
    assert cross_family.complete_samples(stored, "tiny-a", "tiny-b", "single_needle", 120, 3) \
        == {r["sample_id"] for r in rows}
    again = list(cross_family.measure_rows(pair, "single_needle", 120, 2, max_new_tokens=3,
                                           done={r["sample_id"] for r in rows},
                                           log=lambda msg: None))
    assert again == []
    text = cross_family.summary_markdown(stored)
    assert "tiny-a Q2C, mapped" in text and "| tiny-a -> tiny-b | 50% |" in text


def test_rows_of_another_layout_are_refused(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(cross_family.CrossFamilyError, match="new file"):
        cross_family.read_rows(path)


def test_alignment_only_rows_are_the_full_runs_mapped_measures(pair):
    full = list(cross_family.measure_rows(pair, "multi_hop", 120, 2, max_new_tokens=1,
                                          log=lambda msg: None))
    only = list(cross_family.measure_rows(pair, "multi_hop", 120, 2, alignment_only=True,
                                          log=lambda msg: None))
    assert all(set(r) == set(cross_family.ALIGNMENT_FIELDS) for r in only)
    # Same measures as the full run's mapped cells (the prefill's wall time aside), none decoded.
    same = [f for f in cross_family.ALIGNMENT_FIELDS if f != "cloud_prefill_s"]
    mapped = [{f: r[f] for f in same} for r in full if r["selection"] == cross_family.MAPPED]
    assert [{f: r[f] for f in same} for r in only] == mapped
    assert len(only) == 2 * 2 * len(cross_family.RETENTIONS)
    # Two random models agree on some but not all of what they keep.
    assert 0.0 < min(r["alignment"] for r in only) and min(r["alignment"] for r in only) < 1.0


def test_alignment_only_command_resumes_refuses_full_rows_and_merges_them(pair, tmp_path,
                                                                          monkeypatch):
    by_name = dict(pair)
    monkeypatch.setattr(models, "load_model", lambda source: by_name[source])
    results = tmp_path / "alignment.csv"
    command = ["cross-family", "--alignment-only", "--a", "tiny-a", "--b", "tiny-b",
               "--task", "multi_hop", "--context-tokens", "120", "--threads", "1",
               "--results", str(results)]
    per_sample = 2 * len(cross_family.RETENTIONS)
    assert cli.main([*command, "--n", "1"]) == 0
    first = cross_family.read_alignment_rows(results)
    assert len(first) == per_sample
    assert cli.main([*command, "--n", "2"]) == 0
    rows = cross_family.read_alignment_rows(results)
    assert len(rows) == 2 * per_sample and rows[:per_sample] == first  # resumed, not redone
    summary = results.with_suffix(".md").read_text()
    assert "| multi_hop | 120 | 2 | tiny-a -> tiny-b | 50% |" in summary

    full = tmp_path / "full.csv"
    cross_family.append_rows(full, cross_family.measure_rows(
        pair, "single_needle", 120, 1, max_new_tokens=1, log=lambda msg: None))
    with pytest.raises(cross_family.CrossFamilyError, match="new file"):
        cli.main([*command, "--n", "2", "--results", str(full)])
    assert cli.main([*command, "--n", "2", "--no-run", "--merge", str(full)]) == 0
    summary = results.with_suffix(".md").read_text()
    assert "| single_needle | 120 | 1 | tiny-b -> tiny-a | 25% |" in summary
    assert "| multi_hop | 120 | 2 | tiny-b -> tiny-a | 25% |" in summary
