"""Experiment specs: validation names the bad key; workloads are seeded; simulated runs report."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ray_scout.experiments.report import summary, wilson_ci
from ray_scout.experiments.runner import run_experiment, workloads
from ray_scout.experiments.spec import (
    REPO_ROOT, SpecError, capacity_trace, load_spec, parse_spec,
)

BASE = {
    "name": "t", "fidelity": "simulated", "duration_s": 120, "seed": 3,
    "capacity": {"kind": "constant", "rate": "50mbit"},
    "agents": [{"name": "s", "count": 2, "model": "qwen2.5-7b", "context_tokens": [64],
                "deadline_s": 2.5, "arrival_rate_hz": 0.1, "quality": "paper_b:3b-7b"},
               {"name": "l", "count": 2, "model": "qwen2.5-14b", "context_tokens": [64],
                "deadline_s": 2.5, "arrival_rate_hz": 0.1, "quality": "paper_b:3b-7b"}],
    "policies": ["static:int4", "adaptive"], "allocators": ["equal", "model_aware"],
}


def spec_with(**changes):
    doc = copy.deepcopy(BASE)
    doc.update(changes)
    return doc


@pytest.mark.parametrize("doc, message", [
    (spec_with(duration_s=0), "duration_s: must be > 0"),
    (spec_with(policies=["fastest"]), "policies\\[0\\]"),
    (spec_with(policies=["static:int3"]), "unknown mode"),
    (spec_with(allocators=["fair"]), "allocators\\[0\\]"),
    (spec_with(capacity={"kind": "markov2"}), "capacity.kind"),
    (spec_with(capacity={"kind": "constant", "rate": "50"}), "capacity.rate"),
    (spec_with(capacity={"kind": "mahimahi", "path": "nope.log"}), "not found"),
    (spec_with(fidelity="exact"), "fidelity"),
    (spec_with(colour="red"), "top level.*unknown keys"),
    (spec_with(agents=[]), "at least one agent group"),
    (spec_with(agents=[{**BASE["agents"][0], "deadline_s": -1}]), "agents\\[0\\].deadline_s"),
    (spec_with(agents=[{**BASE["agents"][0], "quality": "paper_b:1b-2b"}]), "quality"),
    (spec_with(agents=[{**BASE["agents"][0], "speed": 3}]), "unknown keys"),
    (spec_with(agents=[{**BASE["agents"][0], "cloud_model": "x"}],
               cloud={"models": {"y": {}}}), "not hosted"),
    (spec_with(closed_loop="on"), "closed_loop: 'on' is not one of hits, delivered_rate, off"),
    (spec_with(cloud={"max_batch": 0}), "cloud.max_batch: must be > 0"),
    (spec_with(cloud={"batch_window_s": -0.1}), "cloud.batch_window_s: must be >= 0"),
    # Issue 17, defect 5: no upper bounds; count 1e9 took 7.3 GB in 60 s with no message.
    (spec_with(agents=[{**BASE["agents"][0], "count": 1_000_000_000}]),
     "agents\\[0\\].count: 1000000000 is over the limit of 100000"),
    (spec_with(agents=[{**BASE["agents"][0], "count": 60_000},
                       {**BASE["agents"][1], "count": 60_000}]),
     "agents: 120000 agents in all groups, over the limit"),
    (spec_with(agents=[{**BASE["agents"][0], "context_tokens": [10**9]}]),
     "agents\\[0\\].context_tokens: 1000000000 is over the limit"),
    (spec_with(agents=[{**BASE["agents"][0], "arrival_rate_hz": 1e12}]),
     "agents\\[0\\].arrival_rate_hz: .* over the limit"),
    (spec_with(agents=[{**BASE["agents"][0], "arrival_rate_hz": 1000, "count": 100}]),
     "count x arrival_rate_hz x duration_s: about 1.2e\\+07 requests"),
    (spec_with(duration_s=1e12), "duration_s: .* over the limit"),
    (spec_with(duration_s=3600, epoch_s=1e-6), "epoch_s: .* allocator epochs"),
    (spec_with(capacity={"kind": "constant", "rate": "9999gbit"}), "capacity.rate: .* out of range"),
    (spec_with(network={"access_rate": "1000000gbit"}), "network.access_rate: .* out of range"),
    (spec_with(capacity={"kind": "markov", "step_s": 1e-9}), "capacity.step_s: .* capacity steps"),
])
def test_a_bad_spec_names_the_key_at_fault(doc, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(doc)


def test_every_shipped_spec_is_valid():
    specs = sorted((REPO_ROOT / "experiments").glob("*.yaml"))
    assert specs
    for path in specs:
        load_spec(path)


def test_cloud_batching_defaults_to_one_request_at_a_time():
    spec = parse_spec(BASE)
    assert (spec.cloud_max_batch, spec.cloud_batch_window_s) == (1, 0.0)
    spec = parse_spec(spec_with(cloud={"max_batch": 4, "batch_window_s": 0.02}))
    assert (spec.cloud_max_batch, spec.cloud_batch_window_s) == (4, 0.02)


def test_segments_trace_can_drop_the_link_to_zero_and_back():
    spec = parse_spec(spec_with(capacity={"kind": "segments", "segments": [
        [0, "50mbit"], [2, "0kbit"], [4, "50mbit"]]}))
    trace = capacity_trace(spec)
    assert [trace.rate_at(t) for t in (1, 3, 5)] == [50e6, 0.0, 50e6]


def test_the_workload_is_the_same_for_every_run_of_a_seed_and_differs_per_agent():
    spec = parse_spec(BASE)
    a, b = workloads(spec), workloads(spec)
    assert a == b
    assert [x.t_s for x in a["s0"]] != [x.t_s for x in a["s1"]]
    ids = [x.request_id for w in a.values() for x in w]
    assert len(ids) == len(set(ids))
    other = workloads(parse_spec(spec_with(seed=4)))
    assert [x.t_s for x in other["s0"]] != [x.t_s for x in a["s0"]]


def test_wilson_interval_stays_inside_zero_and_one():
    assert wilson_ci(0, 10)[0] == 0.0 and wilson_ci(10, 10)[1] == 1.0
    lo, hi = wilson_ci(5, 10)
    assert lo < 0.5 < hi


def test_simulated_fidelity_runs_every_combination_and_writes_results(tmp_path: Path):
    spec = parse_spec(BASE)
    frames = run_experiment(spec, tmp_path)
    combos = frames["requests"][["policy", "allocator"]].drop_duplicates()
    assert len(combos) == 4
    for name in ("requests.parquet", "requests.csv", "epochs.csv", "summary.md",
                 "hits_quality.png", "stages.png", "timeline.png", "rates.png"):
        assert (tmp_path / name).exists(), name
    table = summary(frames["requests"]).set_index(["policy", "allocator"])
    # Fixed INT4 at 50 Mbit/s: the 14B agents need 15.9 Mbit/s, equal gives 12.5.
    assert table.loc[("static:int4", "model_aware"), "hit_rate"] > \
        table.loc[("static:int4", "equal"), "hit_rate"]
    text = (tmp_path / "summary.md").read_text()
    assert "static:int4 | equal" in text and "95% Wilson CI" in text
    assert "Paper B, published (`paper_b:3b-7b`)" in text


def test_quality_source_tells_published_from_measured_profiles():
    from ray_scout.experiments.report import quality_source

    measured = "experiments/profiles/quality-embedded-embedded.yaml"
    spec = parse_spec(spec_with(agents=[BASE["agents"][0],
                                        {**BASE["agents"][1], "quality": measured}]))
    note = quality_source(spec)
    assert "Paper B, published (`paper_b:3b-7b`) (relative F1, BF16 = 1.0" in note
    assert f"measured, `{measured}` (embedded -> embedded) (relative F1, BF16 = 1.0" in note


def test_report_rewrites_the_summary_of_a_results_directory(tmp_path: Path):
    import argparse
    import json

    from ray_scout.experiments import report

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(BASE))
    run_experiment(parse_spec(BASE), tmp_path)
    (tmp_path / "summary.md").unlink()
    assert json.loads((tmp_path / "meta.json").read_text())["fidelity"] == "simulated"
    assert report.run(argparse.Namespace(results=tmp_path, out=None)) == 0
    assert "static:int4 | model_aware" in (tmp_path / "summary.md").read_text()
    assert report.run(argparse.Namespace(results=tmp_path / "missing", out=None)) == 2


def _requests(**columns):
    base = dict(policy="p", allocator="equal", agent="a0", mode="int4", deadline_s=1.0,
                t_arrival_s=0.0, payload_bytes=190, quality=0.0, deadline_met=False,
                latency_s=float("nan"), agent_queue_s=0.0, edge_s=0.1, tx_s=0.2,
                cloud_queue_s=0.0, cloud_s=0.3, overhead_s=float("nan"))
    base.update(columns)
    return pd.DataFrame([base])


def test_a_combination_that_misses_everything_keeps_its_rows_without_nan():
    from ray_scout.experiments.report import _markdown, _stage_markdown, breakdown

    missed = _requests(policy="static:bf16")
    hit = _requests(policy="adaptive", mode="scout", deadline_met=True, quality=0.81,
                    latency_s=0.7, overhead_s=0.1)
    requests = pd.concat([missed, hit], ignore_index=True)
    text = _markdown(summary(requests), "q", "profile") + _stage_markdown(breakdown(requests))
    assert "nan" not in text.lower()
    rows = [line for line in text.splitlines() if line.startswith("| static:bf16")]
    assert len(rows) == 2 and "no answer" in rows[0] and "0/1 = 0.0%" in rows[0]


def test_stage_means_add_up_to_the_mean_latency_of_answered_requests():
    from ray_scout.experiments.report import breakdown

    # Two answered requests; each one's stages sum to its latency (overhead is the rest).
    requests = pd.concat([
        _requests(deadline_met=True, latency_s=1.0, edge_s=0.1, tx_s=0.2, cloud_s=0.3,
                  agent_queue_s=0.35, overhead_s=0.05),
        _requests(deadline_met=True, latency_s=3.0, edge_s=0.1, tx_s=2.0, cloud_s=0.8,
                  agent_queue_s=0.0, overhead_s=0.1),
        _requests()], ignore_index=True)  # a miss: not in the means
    row = breakdown(requests).iloc[0]
    assert row["latency_s"] == pytest.approx(2.0)
    assert row["tx_s"] == pytest.approx(1.1) and row["answered"] == 2
    stages = ["agent_queue_s", "edge_s", "tx_s", "cloud_queue_s", "cloud_s", "overhead_s"]
    assert sum(row[c] for c in stages) == pytest.approx(2.0)


def test_payload_sizes_print_in_a_unit_that_shows_scouts_bytes():
    from ray_scout.experiments.report import format_bytes

    assert [format_bytes(b) for b in (0, 190, 48_200, 3_070_465)] == \
        ["0 B", "190 B", "48.2 kB", "3.07 MB"]


def test_the_summary_says_where_quality_came_from_and_what_local_is(tmp_path: Path):
    run_experiment(parse_spec(BASE), tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "(simulated fidelity)" in text
    assert "Paper B, published (`paper_b:3b-7b`) (relative F1, BF16 = 1.0" in text
    assert "mean quality (profile's, BF16 = 1.0)" in text  # in the table's own header
    assert "| profile `paper_b:3b-7b` |" in text  # and on every row
    assert "`local`: nothing was sent" in text
    assert " MB |" in text and "0.000" not in text.split("| payload p50")[1].split("\n")[2]


def test_plots_are_drawn_when_a_combination_misses_everything(tmp_path: Path):
    from ray_scout.experiments.report import write_report

    missed = _requests(policy="static:bf16", agent="s0", mode="bf16", t_arrival_s=3.0)
    hit = _requests(policy="adaptive", agent="s1", mode="scout", deadline_met=True,
                    quality=0.81, latency_s=0.7, overhead_s=0.1, t_arrival_s=5.0)
    frames = {"requests": pd.concat([missed, hit], ignore_index=True),
              "epochs": pd.DataFrame()}
    write_report(parse_spec(BASE), tmp_path, frames)
    for name in ("hits_quality.png", "stages.png", "timeline.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert not (tmp_path / "rates.png").exists()  # no epochs, no grants to draw
    assert "| static:bf16 | equal | 0 | - |" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("doc, message", [
    (spec_with(network=[1]), "network: must be a mapping"),
    (spec_with(cloud={"models": 3}), "cloud.models: must be a mapping"),
    (spec_with(policies="adaptive"), "policies: must be a list"),
    (spec_with(seed="x"), "seed: 'x' is not a number"),
    (spec_with(capacity=None), "capacity: must be a mapping"),
    (spec_with(agents=[{**BASE["agents"][0], "count": float("inf")}]), "agents\\[0\\].count: inf is not"),
    (spec_with(agents=[{**BASE["agents"][0], "protected_layers": 0}]),
     "agents\\[0\\].protected_layers: must be a list"),
])
def test_a_value_of_the_wrong_shape_is_a_spec_error_naming_its_key(doc, message):
    # Found by tests/test_fuzz.py: these escaped as TypeError / AttributeError / ValueError.
    with pytest.raises(SpecError, match=message):
        parse_spec(doc)


def test_more_agents_than_a_machine_holds_is_refused_before_any_work():
    from ray_scout.experiments.runner import validate
    from ray_scout.experiments.spec import MAX_AGENTS_PER_NODE, check_placement

    check_placement({"edge-1": MAX_AGENTS_PER_NODE})
    with pytest.raises(SpecError, match="2001 agents on edge-1, over the limit of 2000 per machine"):
        check_placement({"edge-0": 3, "edge-1": 2001})
    doc = spec_with(fidelity="profiled", agents=[{**BASE["agents"][0], "count": 2001}])
    with pytest.raises(SpecError, match="2001 agents on this machine"):
        validate(parse_spec(doc), address=None)  # before the privilege check: root or not


def test_a_cell_draws_its_first_agents_grants_and_says_how_many_there_are(tmp_path: Path):
    from matplotlib.image import imread

    from ray_scout.experiments.report import RATES_AGENTS, write_report

    agents = [f"s{i}" for i in range(RATES_AGENTS + 8)]
    epochs = pd.DataFrame([dict(policy="adaptive", allocator="equal", agent=a, t_s=0.0,
                                rate_bps=1e6, capacity_bps=50e6) for a in agents])
    requests = pd.concat([_requests(policy="adaptive", agent=a, mode="scout",
                                    deadline_met=True, quality=0.8, latency_s=0.5,
                                    overhead_s=0.01) for a in agents], ignore_index=True)
    write_report(parse_spec(BASE), tmp_path, {"requests": requests, "epochs": epochs})
    height, width = imread(tmp_path / "rates.png").shape[:2]
    # One row of panels per drawn agent: 12 rows, not 20 (2 inches each at 120 dpi).
    assert height < 120 * (1.4 + 2.0 * (RATES_AGENTS + 1))
