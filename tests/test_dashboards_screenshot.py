"""A headless Chromium screenshot of the Ray dashboard's actors page during a real run.

The test starts a Ray with the testbed's ``edge``/``cloud`` resources and its dashboard,
runs `scout run` on a shortened allocation_congestion spec against it, waits until the
EdgeAgents, the CloudActor and the Allocator are alive, and photographs the actors page.
With RAY_SCOUT_UPDATE_SCREENSHOT=1 the picture replaces docs/img/ray-dashboard-actors.png.
"""

from __future__ import annotations

import os
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
PICTURE = REPO / "docs" / "img" / "ray-dashboard-actors.png"
WANTED = {"EdgeAgent", "CloudActor", "Allocator"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive_classes(dashboard_url: str) -> set[str]:
    from ray.util.state import list_actors

    # The dashboard's address, named: other Rays may run on this machine.
    return {a.class_name for a in list_actors(address=f"http://{dashboard_url}",
                                              filters=[("state", "=", "ALIVE")], limit=1000)}


def test_dashboard_actors_page_shows_agents_cloud_and_allocator(monkeypatch, ray_temp_dir,
                                                               missing):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        missing("chromium missing: scripts/setup.sh installs Debian's chromium")
    if os.geteuid() != 0:
        pytest.skip("the run shapes links: needs root")
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray instance is already up in this process")
    # A private, loopback-only dashboard: without token auth the headless browser needs no
    # login (a lab's dashboard keeps it on: docs/LAB_GUIDE.md says how to log in).
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    tmp = ray_temp_dir
    spec = yaml.safe_load((REPO / "experiments" / "allocation_congestion.yaml").read_text())
    spec.update(name="dashboard_screenshot", duration_s=40, policies=["adaptive"],
                allocators=["model_aware"])
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    agents = sum(a["count"] for a in spec["agents"])
    run = None
    try:
        info = ray.init(num_cpus=2, resources={"edge": agents, "cloud": 1},
                        include_dashboard=True, dashboard_host="127.0.0.1",
                        dashboard_port=_free_port(), _temp_dir=str(tmp / "ray"),
                        log_to_driver=False)
        run = subprocess.Popen(
            [sys.executable, "-m", "ray_scout.cli", "run", str(tmp / "spec.yaml"),
             "--address", info.address_info["address"], "--out", str(tmp / "results"),
             "--no-progress"], cwd=REPO, stdout=open(tmp / "run.log", "wb"),
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while not WANTED <= (alive := _alive_classes(info.dashboard_url)):
            assert run.poll() is None, (tmp / "run.log").read_text()[-4000:]
            assert time.monotonic() < deadline, f"alive after 120 s: {alive}"
            time.sleep(1)
        time.sleep(3)  # a few requests in, so the agents' rows show work
        picture = tmp / "actors.png"
        shot = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--window-size=1600,1000", "--virtual-time-budget=20000",
             f"--screenshot={picture}", f"http://{info.dashboard_url}/#/actors"],
            capture_output=True, text=True, timeout=120)
        assert shot.returncode == 0 and picture.exists(), shot.stderr[-2000:]
        assert WANTED <= _alive_classes(info.dashboard_url), "the run ended before the picture"
        from matplotlib.image import imread
        pixels = imread(picture)
        assert pixels.shape[:2] == (1000, 1600) and pixels.std() > 0.05, "a blank page"
        if os.environ.get("RAY_SCOUT_UPDATE_SCREENSHOT") == "1":
            PICTURE.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(picture, PICTURE)
    finally:
        if run is not None and run.poll() is None:
            os.killpg(run.pid, signal.SIGINT)  # the runner tears links and actors down
            try:
                run.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        ray.shutdown()
