"""Ctrl-C in the middle of `scout run`, then `scout run --resume`: the CLI as a user drives it.

The run is a real profiled run in a child process (its own Ray, real namespaces and links);
the test sends it SIGINT while its second trial of three is recording rows (about 40% of
the run) and checks what it leaves: exit code 130 soon after, the finished rows on disk, a
summary that says the run is incomplete, and nothing else (no namespace, link, qdiscs or
emulator rule of its run, no process it started). `--resume` then runs only what is missing.
A second test SIGKILLs the driver instead: the rows finished before the kill are on disk, and
the next `scout run` on the machine removes the namespaces the killed run left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ray_scout.experiments.spec import REPO_ROOT
from ray_scout.net.cleanup import find_leftovers
from ray_scout.net.emulator import TUN_PREFIX

pytestmark = [pytest.mark.ray, pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and HTB")]

SPEC = {"name": "ctrl_c", "fidelity": "profiled", "duration_s": 6, "seed": 2,
        "capacity": {"kind": "constant", "rate": "50mbit"},
        "cloud": {"slots": 2, "models": {"qwen2.5-7b": {"timing": "paper_b"}}},
        "agents": [{"name": "a", "count": 2, "model": "qwen2.5-7b", "context_tokens": [64],
                    "deadline_s": 1.5, "arrival_rate_hz": 2, "quality": "paper_b:3b-7b"}],
        "policies": ["static:int4", "static:int8", "static:scout"], "allocators": ["equal"]}
# What the test allows from SIGINT to the process's exit: one trial's teardown (links,
# actors) plus Ray's shutdown on a loaded 2-core machine. Measured: docs/RELIABILITY.md.
EXIT_WITHIN_S = 30.0


def processes_with(marker: bytes) -> list[int]:
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes() and int(environ.parent.name) != os.getpid():
                found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def scout(argv: list[str], marker: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), RS_TEST_MARKER=marker)
    return subprocess.Popen([sys.executable, "-m", "ray_scout.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rows(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_gone(marker: str, within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while (left := processes_with(marker.encode())) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def start_run(tmp_path, marker: str, watched: str):
    """Start `scout run` on SPEC and wait until trial ``watched`` (a raw folder name) has
    recorded 3 requests; return the running process and the output folder."""
    spec_path, out = tmp_path / "ctrl_c.yaml", tmp_path / "out"
    spec_path.write_text(yaml.safe_dump(SPEC))
    run = scout(["run", str(spec_path), "--out", str(out), "--no-progress"], marker)
    requests = out / "raw" / watched / "requests.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and run.poll() is None and rows(requests) < 3:
        time.sleep(0.2)
    assert run.poll() is None, f"the run ended before the signal: {run.communicate()}"
    return run, out


def test_ctrl_c_mid_run_leaves_rows_and_nothing_else_and_resume_finishes_it(tmp_path):
    marker = f"rs-ctrl-c-{uuid.uuid4().hex}"
    run, out = start_run(tmp_path, marker, "01_static-int8_equal")
    assert rows(out / "trials.jsonl") == 1, "the first trial is not recorded as finished"
    first_rows = (out / "raw" / "00_static-int4_equal" / "requests.jsonl").read_text()
    # The driver's pid names its namespaces (the runner's Testbed run_id).
    prefix = f"rs-{run.pid % 0xFFFF:04x}"
    signalled = time.monotonic()
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=120)
    exit_s = time.monotonic() - signalled
    print(f"\nSIGINT to exit: {exit_s:.1f} s")
    assert run.returncode == 130, stderr
    assert exit_s < EXIT_WITHIN_S
    assert "Traceback" not in stderr and "--resume" in stderr

    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] is False and "trial 2 of 3" in meta["interrupted"]
    assert "Incomplete run" in (out / "summary.md").read_text()
    requests = pd.read_csv(out / "requests.csv")
    by_policy = requests.groupby("policy").size()
    assert by_policy["static:int4"] == len(first_rows.splitlines())
    assert by_policy["static:int8"] >= 3 and "static:scout" not in by_policy
    assert find_leftovers(prefix).empty, find_leftovers(prefix)
    # Its qdiscs, veths and TUN devices lived in those namespaces; none escaped to the host
    # (HTB of ours on a host interface, a TUN device or an emulator rule outside them).
    host = find_leftovers()
    assert not host.qdiscs and not host.rules, host
    assert not [link for link in host.links if link.startswith(TUN_PREFIX)], host
    assert wait_gone(marker, 20) == [], "processes of the interrupted run are still alive"

    resumed = scout(["run", "--resume", str(out), "--no-progress"], marker)
    stdout, stderr = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, stderr
    assert rows(out / "trials.jsonl") == 3
    # The finished trial was skipped, not run again: its rows are the same lines.
    assert (out / "raw" / "00_static-int4_equal" / "requests.jsonl").read_text() == first_rows
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] is True
    assert "Incomplete run" not in (out / "summary.md").read_text()
    requests = pd.read_csv(out / "requests.csv")
    assert set(requests.policy) == {"static:int4", "static:int8", "static:scout"}
    assert find_leftovers(f"rs-{resumed.pid % 0xFFFF:04x}").empty
    assert wait_gone(marker, 20) == []


# What the run after a SIGKILLed one runs: the least that builds links (its start is what
# cleans up; docs/RELIABILITY.md).
NEXT_SPEC = dict(SPEC, name="after_kill", duration_s=1, policies=["static:int4"],
                 agents=[dict(SPEC["agents"][0], count=1)])


def test_sigkill_of_the_driver_leaves_finished_rows_and_the_next_run_removes_its_links(tmp_path):
    from ray_scout.net.owner import live_prefixes

    marker = f"rs-kill-{uuid.uuid4().hex}"
    run, out = start_run(tmp_path, marker, "00_static-int4_equal")
    prefix = f"rs-{run.pid % 0xFFFF:04x}00-"
    assert prefix in live_prefixes()
    run.kill()
    run.communicate(timeout=60)
    # Rows are appended as they complete: what finished before the kill is on disk.
    first = out / "raw" / "00_static-int4_equal" / "requests.jsonl"
    recorded = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(recorded) >= 3 and all("request_id" in row for row in recorded)
    # Its link manager died with the driver's Ray; nothing tore the links down.
    deadline = time.monotonic() + 60
    while prefix in live_prefixes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert prefix not in live_prefixes(), "the killed run's link manager is still alive"
    assert find_leftovers(prefix).namespaces, "the killed run left no namespaces to clean"
    # The next `scout run` on this machine removes them before it builds its own.
    spec_path = tmp_path / "next.yaml"
    spec_path.write_text(yaml.safe_dump(NEXT_SPEC))
    following = scout(["run", str(spec_path), "--out", str(tmp_path / "next"), "--no-progress"],
                      marker)
    _, stderr = following.communicate(timeout=300)
    assert following.returncode == 0, stderr
    assert f"namespaces that a dead run left ({prefix}*)" in stderr
    assert find_leftovers(prefix).empty, find_leftovers(prefix)
    assert find_leftovers(f"rs-{following.pid % 0xFFFF:04x}00-").empty
    # Ray's raylet and GCS follow their killed driver; its dashboard and runtime-env agents
    # do not (ray 2.60: they live on with parent 1). Known and documented
    # (docs/RELIABILITY.md); this test ends what it started.
    left = wait_gone(marker, 30)
    names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] for pid in left
             if Path(f"/proc/{pid}/cmdline").exists()}
    for pid in names:
        os.kill(pid, signal.SIGKILL)
    assert set(names.values()) <= {b"ray::DashboardAgent", b"ray::RuntimeEnvAgent"}, names
