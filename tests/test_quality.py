"""The quality harness: grid rows, resuming, the summary, and calibrated profiles."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from ray_scout.core.modes import Mode
from ray_scout.core.control.policy import QualityProfile
from ray_scout.core.evaluation.quality import (FULL, REFERENCE, ROW_FIELDS, Cell, Grid, QualityError,
                                    calibration_cells, profile_from_rows, relative_to_reference,
                                    row_key, summarize)
from ray_scout.core.evaluation.harness import run_grid
from ray_scout.experiments import calibrate
from ray_scout.experiments import quality as harness

TINY = "random:tiny"
CELLS = (REFERENCE, Cell(FULL, 1.0, Mode.INT8), Cell(FULL, 1.0, Mode.MIXED_INT4),
         Cell("q2c", 0.5, Mode.BF16), Cell("random", 0.5, Mode.BF16),
         Cell("q2c", 0.5, Mode.SCOUT), Cell(FULL, 1.0, Mode.LOCAL))


def tiny_grid(n: int = 2) -> Grid:
    return Grid("tiny", TINY, TINY, ("single_needle",), (64,), CELLS, n=n, max_new_tokens=3)


def test_grid_yields_one_well_formed_row_per_sample_and_cell(tiny_model):
    rows = list(run_grid(tiny_grid(), tiny_model, tiny_model, protected_layers=(0,)))
    assert len(rows) == 2 * len(CELLS)
    assert len({row_key(r) for r in rows}) == len(rows)
    for row in rows:
        assert set(row) == set(ROW_FIELDS)
        assert row["em"] in (0.0, 1.0) and 0.0 <= row["f1"] <= 1.0
    by_cell = {(r["method"], r["retention"], r["mode"]): r for r in rows if r["sample_index"] == 0}
    full, int8 = by_cell[REFERENCE.key], by_cell[(FULL, 1.0, "int8")]
    assert int8["payload_bytes"] < full["payload_bytes"]
    assert by_cell[("q2c", 0.5, "bf16")]["payload_bytes"] < full["payload_bytes"]
    assert by_cell[("q2c", 0.5, "scout")]["payload_bytes"] < 1000
    assert by_cell[("q2c", 0.5, "scout")]["payload_with_document_bytes"] > \
        by_cell[("q2c", 0.5, "scout")]["payload_bytes"]
    assert by_cell[(FULL, 1.0, "local")]["payload_bytes"] == 0
    kept = by_cell[("q2c", 0.5, "bf16")]
    assert kept["kept_context_tokens"] == round(0.5 * kept["num_context_tokens"])


def test_grid_without_bottleneck_layers_refuses_mixed_int4(tiny_model):
    with pytest.raises(QualityError, match="protected_layers"):
        next(run_grid(tiny_grid(), tiny_model, tiny_model))


def test_interrupted_run_resumes_without_redoing_rows(tmp_path):
    results = tmp_path / "rows.csv"
    grid = dataclasses.replace(tiny_grid(n=1), cells=CELLS[:2] + CELLS[3:])
    first = harness.measure(grid, results, log=lambda _: None)
    assert len(first) == len(grid.cells)
    rows = harness.measure(dataclasses.replace(grid, n=2), results, log=lambda _: None)
    on_file = harness.read_rows(results)
    assert len(rows) == len(on_file) == 2 * len(grid.cells)
    assert [r for r in on_file if r["sample_index"] == 0] == first  # untouched, not redone
    again = harness.measure(dataclasses.replace(grid, n=2), results, log=lambda _: None)
    assert len(harness.read_rows(results)) == len(again) == len(rows)


def test_a_device_torch_cannot_use_is_refused_before_anything_is_written(tmp_path):
    results = tmp_path / "rows.csv"
    with pytest.raises(QualityError, match="--device cuda:99 is not usable here"):
        harness.measure(tiny_grid(n=1), results, log=lambda _: None, device="cuda:99")
    assert not results.exists()


def test_the_dtype_asked_for_is_what_both_models_run_in(tmp_path):
    grid = dataclasses.replace(tiny_grid(n=1), cells=(REFERENCE,))
    lines = []
    rows = harness.measure(grid, tmp_path / "rows.csv", log=lines.append, dtype="bfloat16")
    assert len(rows) == 1 and "on cpu (torch.bfloat16)" in lines[0]


def test_runs_are_deterministic(tiny_model):
    grid = dataclasses.replace(tiny_grid(n=1), cells=(Cell("random", 0.5, Mode.BF16),))
    first, second = (list(run_grid(grid, tiny_model, tiny_model)) for _ in range(2))
    assert [r["prediction"] for r in first] == [r["prediction"] for r in second]


def _row(sample: int, cell: Cell, f1: float) -> dict:
    return {"task": "single_needle", "context_tokens": 500, "sample_id": f"s{sample}",
            "method": cell.method, "retention": cell.retention, "mode": cell.mode.value,
            "payload_bytes": 10, "em": 0.0, "f1": f1, "contains": float(f1 > 0)}


def test_summary_gives_every_cell_mean_ci_n_and_paired_difference():
    int8 = Cell(FULL, 1.0, Mode.INT8)
    rows = [_row(i, REFERENCE, 0.5) for i in range(10)] + \
           [_row(i, int8, 0.5 if i else 0.0) for i in range(10)]
    cells = {(s.method, s.mode): s for s in summarize(rows, "f1")}
    assert cells[(FULL, "bf16")].n == 10 and cells[(FULL, "bf16")].p_vs_reference is None
    int8_summary = cells[(FULL, "int8")]
    assert int8_summary.mean == pytest.approx(0.45)
    assert int8_summary.ci_low <= 0.45 <= int8_summary.ci_high
    assert int8_summary.diff_vs_reference == pytest.approx(-0.05)
    grid = dataclasses.replace(tiny_grid(), cells=(REFERENCE, int8))
    markdown = harness.summary_markdown(rows, grid)
    assert "(n=10)" in markdown and "0.450 [" in markdown and "p=" in markdown


def test_summary_pairs_q2c_with_every_other_selector_at_each_retention():
    q2c, snapkv, rnd = (Cell(m, 0.25, Mode.BF16) for m in ("q2c", "snapkv", "random"))
    rows = [_row(i, REFERENCE, 0.5) for i in range(10)] + \
           [_row(i, q2c, 0.5) for i in range(10)] + [_row(i, snapkv, 0.6) for i in range(10)] + \
           [_row(i, rnd, 0.0) for i in range(10)]
    grid = dataclasses.replace(tiny_grid(), cells=(REFERENCE, q2c, snapkv, rnd))
    markdown = harness.summary_markdown(rows, grid)
    assert "| snapkv | 25% | f1 | -0.100 [" in markdown
    assert "| random | 25% | f1 | +0.500 [" in markdown


def test_relative_quality_is_the_ratio_of_paired_means_with_ci():
    int4 = Cell(FULL, 1.0, Mode.INT4)
    rows = [_row(i, REFERENCE, 0.4) for i in range(20)] + [_row(i, int4, 0.2) for i in range(20)]
    assert relative_to_reference(rows, int4) == (pytest.approx(0.5), 20, pytest.approx(0.5),
                                                 pytest.approx(0.5))
    with pytest.raises(QualityError, match="undefined"):
        relative_to_reference([_row(0, REFERENCE, 0.0), _row(0, int4, 0.0)], int4)


def test_profile_from_rows_loads_back_as_a_quality_profile(tmp_path):
    cells = calibration_cells(0.5)
    rows = [_row(i, REFERENCE, 0.4) for i in range(5)]
    rows += [_row(i, cell, 0.3) for cell in cells.values() if cell != REFERENCE for i in range(5)]
    profile = profile_from_rows(rows, cells, name="t", edge_model="a", cloud_model="a",
                                source="test")
    profile.save(tmp_path / "p.yaml")
    loaded = QualityProfile.load(tmp_path / "p.yaml")
    assert loaded.quality(Mode.BF16) == 1.0
    assert loaded.quality(Mode.SCOUT) == pytest.approx(0.75)
    assert loaded.modes[Mode.INT8].n == 5 and set(loaded.modes) == set(cells)


def test_cells_reject_inconsistent_method_and_retention():
    with pytest.raises(QualityError, match="go together"):
        Cell("q2c", 1.0, Mode.BF16)
    with pytest.raises(QualityError, match="unknown method"):
        Cell("magic", 0.5, Mode.BF16)
    with pytest.raises(QualityError, match="local"):
        Cell("q2c", 0.5, Mode.LOCAL)


def test_yaml_grid_file_loads(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nedge_model: embedded\ncloud_model: embedded\n"
                    "tasks: [single_needle]\ncontext_tokens: [300]\nn: 3\n"
                    "cells: [[full, 1.0, bf16], [q2c, 0.25, int8]]\n")
    grid = harness.load_grid(str(path))
    assert grid.cells[1] == Cell("q2c", 0.25, Mode.INT8) and grid.n == 3
    with pytest.raises(QualityError, match="named grids"):
        harness.load_grid("no-such-grid")


@pytest.mark.model
def test_calibrate_writes_a_loadable_profile_for_the_embedded_model(tmp_path, embedded_model):
    out = tmp_path / "profile.yaml"
    args = argparse.Namespace(edge="embedded", cloud="embedded", out=out, task="single_needle",
                              context_tokens=200, n=2, seed=0, scout_retention=0.5,
                              scorer="q2c", results=tmp_path / "rows.csv", threads=2)
    assert calibrate.run(args) == 0
    profile = QualityProfile.load(out)
    assert profile.metric == "relative_f1" and profile.quality(Mode.BF16) == 1.0
    assert set(profile.modes) == {Mode.BF16, Mode.INT8, Mode.INT4, Mode.MIXED_INT4,
                                  Mode.SCOUT, Mode.LOCAL}
    assert all(q.n == 2 for q in profile.modes.values())


def test_mixed_int4_finds_the_shipped_bottleneck_report_without_measuring(tmp_path):
    from types import SimpleNamespace

    from ray_scout.core.llm import bottleneck

    # A stand-in with no model: measuring would fail, so a result proves the shipped report
    # (experiments/profiles/) was used with an empty user cache (tmp_path).
    lm = SimpleNamespace(model_id="smollm2-135m-instruct")
    assert bottleneck.protected_layers_for(lm, root=tmp_path) == (18,)
    assert bottleneck.protected_layers_for(lm, top_k=2, root=tmp_path) == (17, 18)


def test_merging_results_adds_only_missing_rows(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    row = dict.fromkeys(ROW_FIELDS, 0)
    row.update(edge_model="e", cloud_model="e", task="single_needle", sample_id="s0",
               method=FULL, retention=1.0, mode="bf16", prediction="x", answers="x")
    harness.append_rows(a, [row])
    harness.append_rows(b, [row, dict(row, mode="int8")])
    assert harness.merge_results(a, [b]) == 1
    assert [r["mode"] for r in harness.read_rows(a)] == ["bf16", "int8"]
