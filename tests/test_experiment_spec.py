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
    (spec_with(colour="red"), "unknown top-level keys"),
    (spec_with(agents=[]), "at least one agent group"),
    (spec_with(agents=[{**BASE["agents"][0], "deadline_s": -1}]), "agents\\[0\\].deadline_s"),
    (spec_with(agents=[{**BASE["agents"][0], "quality": "paper_b:1b-2b"}]), "quality"),
    (spec_with(agents=[{**BASE["agents"][0], "speed": 3}]), "unknown keys"),
    (spec_with(agents=[{**BASE["agents"][0], "cloud_model": "x"}],
               cloud={"models": {"y": {}}}), "not hosted"),
    (spec_with(cloud={"max_batch": 0}), "cloud.max_batch: must be > 0"),
    (spec_with(cloud={"batch_window_s": -0.1}), "cloud.batch_window_s: must be >= 0"),
    # Issue 17, defect 5: no upper bounds; count 1e9 took 7.3 GB in 60 s with no message.
    (spec_with(agents=[{**BASE["agents"][0], "count": 1_000_000_000}]),
     "agents\\[0\\].count: 1000000000 is over the limit of 4096"),
    (spec_with(agents=[{**BASE["agents"][0], "count": 3000}, {**BASE["agents"][1], "count": 3000}]),
     "agents: 6000 agents in all groups, over the limit"),
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
                 "hits_quality.png", "timeline.png", "rates.png"):
        assert (tmp_path / name).exists(), name
    table = summary(frames["requests"]).set_index(["policy", "allocator"])
    # Fixed INT4 at 50 Mbit/s: the 14B agents need 15.9 Mbit/s, equal gives 12.5.
    assert table.loc[("static:int4", "model_aware"), "hit_rate"] > \
        table.loc[("static:int4", "equal"), "hit_rate"]
    text = (tmp_path / "summary.md").read_text()
    assert "static:int4 | equal" in text and "95% CI" in text


def test_report_rewrites_the_summary_of_a_results_directory(tmp_path: Path):
    import argparse
    import json

    from ray_scout.experiments import report

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(BASE))
    run_experiment(parse_spec(BASE), tmp_path)
    (tmp_path / "summary.md").unlink()
    assert json.loads((tmp_path / "meta.json").read_text())["fidelity"] == "simulated"
    assert report.run(argparse.Namespace(results=tmp_path)) == 0
    assert "static:int4 | model_aware" in (tmp_path / "summary.md").read_text()
    assert report.run(argparse.Namespace(results=tmp_path / "missing")) == 2


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
    with pytest.raises(SpecError, match="300 agents on edge-1, over the limit of 256 per machine"):
        check_placement({"edge-0": 3, "edge-1": 300})
    doc = spec_with(fidelity="profiled", agents=[{**BASE["agents"][0], "count": 300}])
    with pytest.raises(SpecError, match="300 agents on this machine"):
        validate(parse_spec(doc), address=None)  # before the privilege check: root or not
