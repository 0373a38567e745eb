"""`scout submit|stop|fetch` without a cluster: job ids, what the job's working_dir holds,
what is refused; the actor-by-name reference the runner hands actors with restarts.
(The Jobs path against a real two-node lab: tests/test_cluster_e2e.py.)"""

from __future__ import annotations

import datetime
import pickle
from pathlib import Path

import pytest

from ray_scout import jobs
from ray_scout.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def test_job_id_names_the_spec_and_the_utc_time():
    when = datetime.datetime(2026, 12, 6, 7, 42, 10, tzinfo=datetime.timezone.utc)
    assert jobs.job_id("allocation congestion", when) == (
        "scout-allocation-congestion-20261206-074210")


def test_the_packed_project_is_what_git_would_commit_plus_the_spec(tmp_path):
    spec = tmp_path / "mine.yaml"
    spec.write_text("name: mine\n")
    staged = tmp_path / "staged"
    inside = jobs.pack(spec, staged)
    assert inside == "experiments/submitted/mine.yaml"
    assert (staged / inside).read_text() == "name: mine\n"
    for kept in ("pyproject.toml", "requirements.lock", "ray_scout/cli.py",
                 "experiments/demo.yaml"):
        assert (staged / kept).is_file(), kept
    assert not (staged / ".git").exists()
    assert not list(staged.rglob("__pycache__")) and not (staged / "results").exists()


def test_a_simulated_spec_is_not_submitted(tmp_path):
    with pytest.raises(jobs.JobError, match="needs no cluster"):
        jobs.submit(REPO / "experiments" / "allocation_congestion.yaml",
                    "http://127.0.0.1:9", fidelity="simulated")


def test_no_dashboard_says_how_to_reach_one():
    with pytest.raises(jobs.JobError, match="ray dashboard clusters/lab.yaml"):
        jobs.stop("scout-x-20261206-000000", "http://127.0.0.1:9")


def test_scout_has_submit_stop_and_fetch():
    parser = build_parser()
    args = parser.parse_args(["submit", "experiments/demo.yaml", "--results", "/tmp/r"])
    assert (args.spec, args.results, args.address) == (
        Path("experiments/demo.yaml"), "/tmp/r", jobs.DEFAULT_ADDRESS)
    assert parser.parse_args(["stop", "job1"]).job == "job1"
    assert parser.parse_args(["fetch", "job1", "--cluster", "lab.yaml"]).cluster == Path(
        "lab.yaml")


def test_an_actor_by_name_pickles_as_its_name_only():
    from ray_scout.actors.by_name import ActorByName

    ref = ActorByName("spec/recorder")
    ref._handle = object()  # what a lookup left behind stays on this side
    back = pickle.loads(pickle.dumps(ref))
    assert back.name == "spec/recorder" and back._handle is None


def test_fetch_copies_a_local_heads_results_and_asks_for_the_cluster_otherwise(
        tmp_path, monkeypatch):
    on_head = tmp_path / "head" / "scout-x-1"
    on_head.mkdir(parents=True)
    (on_head / "summary.md").write_text("# x\n")
    monkeypatch.setattr(jobs, "results_path", lambda job, address: str(on_head))
    got = jobs.fetch("scout-x-1", "http://127.0.0.1:9", tmp_path / "results")
    assert (got / "summary.md").read_text() == "# x\n"
    monkeypatch.setattr(jobs, "results_path", lambda job, address: "~/nowhere/scout-x-1")
    with pytest.raises(jobs.JobError, match="--cluster clusters/lab.yaml"):
        jobs.fetch("scout-x-1", "http://127.0.0.1:9", tmp_path / "results")
