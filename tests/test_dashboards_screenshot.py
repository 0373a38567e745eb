"""Headless Chromium screenshots of the Ray dashboard's Jobs and Actors pages during a real
run submitted as a Ray Job.

The test starts a Ray with the testbed's ``edge``/``cloud`` resources and its dashboard,
submits a shortened allocation_congestion spec with `scout submit` (the Jobs API, the
project as the job's working_dir), waits until the EdgeHosts, the CloudActor and the
Allocator are alive, checks what the Actors table and the job say about them (each actor's
repr, its name, the job's metadata), photographs both pages, and ends the job with
`scout stop`. With RAY_SCOUT_UPDATE_SCREENSHOT=1 the pictures replace
docs/img/ray-dashboard-jobs.png and docs/img/ray-dashboard-actors.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.root]

REPO = Path(__file__).resolve().parents[1]
PICTURES = {"jobs": REPO / "docs" / "img" / "ray-dashboard-jobs.png",
            "actors": REPO / "docs" / "img" / "ray-dashboard-actors.png"}
WANTED = {"EdgeHost", "CloudActor", "Allocator"}
# Every actor the run starts, named <spec>/<who> (Ray's Actors table, Name column).
NAMED = WANTED | {"LinkManager", "Recorder"}
# What each class's repr says as the actor starts (the Actors table's Repr column).
REPRS = {
    # Hosts start before the trial hands them their agents: the repr names them (two
    # hosts for the four agents on this Ray's two CPUs; each agent then logs its own line
    # per request, `small0 qwen2.5-7b adaptive/model_aware: mode ...`).
    "EdgeHost": r"host[01]: 2 agents \((small0, small1|large0, large1)\), waiting for a trial",
    "CloudActor": r"cloud0: queue 0, batch 0/1, served 0, dropped 0",
    "Allocator": r"Allocator model_aware: no split yet",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(dashboard: str) -> list:
    from ray.util.state import list_actors

    # The dashboard's address, named: other Rays may run on this machine.
    return list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000,
                       detail=True)


def _scout(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray_scout.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


class HeadExited(AssertionError):
    """`ray start --head` ended before its Jobs API answered; the message ends with its output."""


def _wait_for_jobs_api(dashboard: str, head: subprocess.Popen, log: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    while True:
        if head.poll() is not None:
            raise HeadExited(f"`ray start --head` exited with {head.returncode}:\n"
                             + log.read_text(errors="replace")[-3000:])
        try:
            JobSubmissionClient(dashboard).list_jobs()
            return
        except Exception:  # noqa: BLE001 - not up yet
            assert time.monotonic() < deadline, f"no Jobs API at {dashboard} after 120 s"
            time.sleep(1)


def _start_head(tmp: Path, env: dict, agents: int, attempt: int) -> tuple[subprocess.Popen, str]:
    """A loopback-only head with a dashboard, its output in ``tmp/head<attempt>.log``; returns
    it and the dashboard's address once the Jobs API answers."""
    dashboard_port = _free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    log = tmp / f"head{attempt}.log"
    # The dashboard agent, which runs submitted jobs, listens on a fixed port (52365) by
    # default: another Ray of this machine holding it leaves no agent to take the job.
    with log.open("wb") as out:
        head = subprocess.Popen(
            [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start",
             "--head", "--block", "--port", str(_free_port()),
             "--num-cpus", "2", "--resources", json.dumps({"edge": agents, "cloud": 1}),
             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dashboard_port),
             "--dashboard-agent-listen-port", str(_free_port()),
             "--temp-dir", str(tmp / f"ray{attempt}"), "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_jobs_api(dashboard, head, log)
    except BaseException:
        _stop_head(head, tmp)
        raise
    return head, dashboard


def _stop_head(head: subprocess.Popen, tmp: Path) -> None:
    """End the head and every process of its Ray (each names the temp dir on its command
    line); `ray stop` would end every Ray of this machine."""
    head.terminate()
    head.wait(timeout=30)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(tmp).encode() in cmdline.read_bytes():
                    os.kill(int(cmdline.parent.name), signum)
            except (OSError, ValueError):
                pass  # already gone
        time.sleep(2)


def _screenshot(chromium: str, url: str, picture: Path) -> None:
    shot = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1600,1000", "--virtual-time-budget=20000",
         f"--screenshot={picture}", url], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and picture.exists(), shot.stderr[-2000:]
    from matplotlib.image import imread
    pixels = imread(picture)
    assert pixels.shape[:2] == (1000, 1600) and pixels.std() > 0.05, f"a blank page: {url}"


def test_dashboard_shows_the_job_and_its_actors_with_their_state(ray_temp_dir, missing):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        missing("chromium missing: scripts/setup.sh installs Debian's chromium")
    if os.geteuid() != 0:
        pytest.skip("the run shapes links: needs root")
    from ray.job_submission import JobSubmissionClient

    tmp = ray_temp_dir
    spec = yaml.safe_load((REPO / "experiments" / "allocation_congestion.yaml").read_text())
    spec.update(name="dashboard_screenshot", duration_s=40, policies=["adaptive"],
                allocators=["model_aware"])
    (tmp / "dashboard_screenshot.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    agents = sum(a["count"] for a in spec["agents"])
    # A private, loopback-only dashboard: without token auth the headless browser needs no
    # login (a lab's dashboard keeps it on: docs/LAB_GUIDE.md says how to log in). The Ray runs
    # in its own process: Ray reads RAY_AUTH_MODE once per process, so a Ray started here
    # would leave every later Ray of this test session disagreeing with its GCS.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    # Ray 2.60 gives a starting raylet a fixed 30 s to register ("The current node timed out
    # during startup"), which a loaded 2-core box can miss: a second head then, never a third.
    try:
        head, dashboard = _start_head(tmp, env, agents, 1)
    except HeadExited as first:
        if "timed out during startup" not in str(first):
            raise
        head, dashboard = _start_head(tmp, env, agents, 2)
    job = None
    try:
        submitted = _scout(env, "submit", str(tmp / "dashboard_screenshot.yaml"), "--address",
                           dashboard, "--results", str(tmp / "results"))
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        job = submitted.stdout.split()[1].rstrip(":")
        client = JobSubmissionClient(dashboard)
        # The job starts a driver, which starts a worker per actor: minutes on a busy box.
        deadline = time.monotonic() + 300
        while True:
            alive = _alive(dashboard)
            if WANTED <= {a.class_name for a in alive}:
                break
            status = str(client.get_job_status(job).value)
            assert status in ("PENDING", "RUNNING"), client.get_job_logs(job)[-4000:]
            assert time.monotonic() < deadline, (
                f"alive after 300 s: {[a.class_name for a in alive]}; the job's log:\n"
                f"{client.get_job_logs(job)[-3000:]}")
            time.sleep(1)
        for actor in alive:
            if actor.class_name in REPRS:
                assert re.fullmatch(REPRS[actor.class_name], actor.repr_name), actor
            if actor.class_name in NAMED:  # <spec>/<who>
                assert actor.name.startswith("dashboard_screenshot/"), actor
        assert NAMED <= {a.class_name for a in alive}, [a.class_name for a in alive]
        metadata = client.get_job_info(job).metadata
        assert metadata["ray_scout_spec"] == metadata["job_name"] == "dashboard_screenshot", (
            metadata)
        assert metadata["trials"] == "0: adaptive/model_aware", metadata
        time.sleep(3)  # a few requests in, so the agents' rows show work
        for page, picture in PICTURES.items():
            _screenshot(chromium, f"{dashboard}/#/{page}", tmp / picture.name)
        assert WANTED <= {a.class_name for a in _alive(dashboard)}, "the run ended early"
        if os.environ.get("RAY_SCOUT_UPDATE_SCREENSHOT") == "1":
            for picture in PICTURES.values():
                picture.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(tmp / picture.name, picture)
        stopped = _scout(env, "stop", job, "--address", dashboard)  # links torn down ...
        job = None
        assert stopped.returncode == 0 and stopped.stdout.strip().endswith("STOPPED"), (
            stopped.stdout + stopped.stderr)
        # ... and the actors: none of the run's is left alive once the job is STOPPED.
        left = [a.name for a in _alive(dashboard)
                if (a.name or "").startswith("dashboard_screenshot/")]
        assert left == [], left
    finally:
        if job is not None:
            _scout(env, "stop", job, "--address", dashboard)
        _stop_head(head, tmp)
