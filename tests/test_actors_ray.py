"""Ray integration: real namespaces, shaped links, actors; outages and killed actors.

Needs root (namespaces, HTB) and starts one local Ray for the module (2 cores: kept small).
"""

from __future__ import annotations

import os
import threading
import time

import pandas as pd
import pytest

from ray_scout.experiments.spec import REPO_ROOT, parse_spec

pytestmark = [pytest.mark.ray, pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and HTB")]

AGENT = {"model": "qwen2.5-7b", "context_tokens": [64], "deadline_s": 1.5,
         "quality": "paper_b:3b-7b"}


@pytest.fixture(scope="module")
def local_ray():
    import ray
    from pyroute2 import netns

    ray.init(resources={"edge": 4, "cloud": 1}, include_dashboard=False, log_to_driver=False,
             configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    yield ray
    ray.shutdown()
    # The runner names its namespaces rs-<pid % 0xFFFF as 4 hex><trial>-...
    mine = f"rs-{os.getpid() % 0xFFFF:04x}"
    assert not [n for n in netns.listnetns() if n.startswith(mine)], "namespaces left behind"


def spec(name, **changes):
    doc = {"name": name, "fidelity": "profiled", "duration_s": 8, "seed": 1,
           "capacity": {"kind": "constant", "rate": "50mbit"},
           "cloud": {"slots": 2, "models": {"qwen2.5-7b": {"timing": "paper_b"}}},
           "agents": [{**AGENT, "name": "a", "count": 2, "arrival_rate_hz": 1}],
           "policies": ["static:int4"], "allocators": ["equal"]}
    doc.update(changes)
    return parse_spec(doc)


def test_a_link_at_rate_zero_for_two_seconds_gives_misses_not_a_hang(local_ray, tmp_path):
    from ray_scout.experiments.runner import run_experiment

    s = spec("outage", capacity={"kind": "segments",
                                 "segments": [[0, "50mbit"], [3, "0kbit"], [5, "50mbit"]]})
    start = time.time()
    frames = run_experiment(s, tmp_path, show_progress=False)
    assert time.time() - start < 90
    r = frames["requests"]
    before = r[r.t_arrival_s < 2.5]
    # Arrivals in [3, 4) cannot finish by their 1.5 s deadline: the link returns at 5 s and
    # a payload then needs 0.37 s on the wire plus 0.52 s of compute.
    during = r[(r.t_arrival_s >= 3.0) & (r.t_arrival_s < 4.0)]
    after = r[r.t_arrival_s >= 5.5]
    assert len(during) >= 1  # the workload is seeded: this holds for seed 1
    assert before.deadline_met.any() and after.deadline_met.any()
    assert not during.deadline_met.any()
    assert (during.outcome != "error").all()
    changes = frames["rate_changes"]
    assert (changes.target == "bottleneck").sum() == 2  # down at 3 s, up at 5 s


def test_killed_edge_host_and_cloud_restart_and_every_request_keeps_one_row(local_ray,
                                                                           tmp_path):
    import ray

    from ray_scout.experiments.runner import run_experiment, workloads

    s = spec("kill", duration_s=10)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        frames=run_experiment(s, tmp_path, show_progress=False)), daemon=True)
    thread.start()
    raw = tmp_path / "raw" / "00_static-int4_equal" / "requests.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not raw.exists() or len(raw.read_text().splitlines()) < 4):
        time.sleep(0.2)
    assert raw.exists(), "no rows were recorded before the kill"
    killed_at = time.time()
    rows_before = raw.read_text().splitlines()
    ray.kill(ray.get_actor("kill/host0"), no_restart=False)  # the host of agent a0
    time.sleep(1.0)
    ray.kill(ray.get_actor("kill/cloud"), no_restart=False)
    thread.join(timeout=120)
    assert not thread.is_alive(), "the run hung after the kills"
    r = result["frames"]["requests"]
    kept = pd.read_json(raw, lines=True)
    assert kept.head(len(rows_before)).request_id.tolist() == \
        [pd.read_json(pd.io.common.StringIO(line), lines=True).request_id[0]
         for line in rows_before]
    a0 = r[r.agent == "a0"]
    assert (a0.done_unix_s > killed_at + 1).any(), "the restarted agent served nothing"
    assert (r.done_unix_s > killed_at + 3).any() and r[r.done_unix_s > killed_at + 3] \
        .deadline_met.any(), "nothing was answered after the cloud restarted"
    events = result["frames"]["events"]
    assert (events.event == "restarted").any()
    # Nothing vanished: every arrival has exactly one row, a request lost with the killed
    # host as a miss ('lost'), not a gap.
    issued = sorted(a.request_id for rows in workloads(s).values() for a in rows)
    assert sorted(r.request_id) == issued
    assert (r[r.outcome == "lost"].deadline_met == False).all()  # noqa: E712
