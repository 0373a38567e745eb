"""A real Prometheus scrapes a running Ray whose actors emit the testbed's metrics.

Prometheus runs with dashboards/prometheus.yml, changed only to read this Ray's
service-discovery file and to scrape every second; the emitting actor uses the testbed's own
AgentMetrics / CloudMetrics. While it emits, every panel query of dashboards/ray-scout.json
must return numbers; afterwards the scraped series must carry exactly the values emitted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.cluster, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
STEPS = 23  # the last step uses scout (mode code 4), not bf16 (code 0)
STEP_S = 0.5
GRANT_BPS = 25e6
CAPACITY_BPS = 50e6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _values(port: int, expr: str) -> list[float]:
    return [float(r["value"][1]) for r in _query(port, expr)]


def _wait_for(what: str, check, port: int, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets") as r:
                targets = json.load(r)["data"]["activeTargets"]
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; "
                                 f"Prometheus targets: {targets}")
        time.sleep(1)


def _panel_queries(session: str) -> list[tuple[str, str]]:
    dashboard = json.loads((REPO / "dashboards" / "ray-scout.json").read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = (target["expr"].replace("$SessionName", session).replace("$agent", ".+")
                    .replace("$__rate_interval", "20s"))
            out.append((f"{panel['title']} / {target['legendFormat']}", expr))
    return out


def _emitter_class():
    import ray

    @ray.remote(num_cpus=0)
    class Emitter:
        """Two agents and one cloud reporting through the testbed's metric emitters."""

        def __init__(self):
            from ray.util import metrics

            from ray_scout.actors.metrics import AgentMetrics, CloudMetrics
            self.agents = [AgentMetrics(f"agent{i}", "adaptive", "equal") for i in range(2)]
            self.cloud = CloudMetrics("cloud0")
            # The Allocator actor declares this gauge itself; test_dashboards_json checks
            # that the name is still the one it declares.
            self.capacity = metrics.Gauge("ray_scout_allocator_capacity_bps", "capacity",
                                          tag_keys=("strategy",))

        def step(self, i: int, mode: str, outcome: str, payload_bytes: int, latency_s: float):
            from ray_scout.core.modes import Mode
            for agent in self.agents:
                agent.grant(GRANT_BPS)
                agent.request(Mode(mode), outcome, payload_bytes, latency_s,
                              quality=0.8 if outcome == "hit" else 0.0,
                              estimate_bps=20e6, measured_bps=18e6)
            self.capacity.set(CAPACITY_BPS, tags={"strategy": "equal"})
            self.cloud.depth(i % 3)
            self.cloud.served(2, [0.01, 0.02], 0.05)

    return Emitter


def test_every_panel_query_returns_the_values_the_actors_emitted(ray_temp_dir, missing):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        missing("prometheus missing: scripts/setup.sh installs Debian's prometheus")
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray instance is already up in this process")
    tmp = ray_temp_dir
    prom_port = _free_port()
    prom = None
    try:
        info = ray.init(num_cpus=1, include_dashboard=True,
                        _metrics_export_port=_free_port(), _temp_dir=str(tmp / "ray"),
                        _system_config={"metrics_report_interval_ms": 1000},
                        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
                        log_to_driver=False)
        session = Path(info.address_info["session_dir"]).name
        export_port = info.address_info["metrics_export_port"]
        config = yaml.safe_load((REPO / "dashboards" / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = "1s"
        job = config["scrape_configs"][0]
        discovery = tmp / "ray" / "prom_metrics_service_discovery.json"
        job["file_sd_configs"][0]["files"] = [str(discovery)]
        job["file_sd_configs"][0]["refresh_interval"] = "1s"
        # The file names the node by its interface address and also lists Ray's fixed-port
        # autoscaler/dashboard exporters, which another Ray on this machine may own: scrape
        # only this node's exporter, over loopback.
        job["relabel_configs"] = [
            {"source_labels": ["__address__"], "regex": rf".*:{export_port}", "action": "keep"},
            {"source_labels": ["__address__"], "regex": r".*:(\d+)",
             "target_label": "__address__", "replacement": "127.0.0.1:$1"}]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = open(tmp / "prometheus.log", "wb")
        prom = subprocess.Popen(
            [prometheus, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=log, stderr=log, start_new_session=True)

        emitter = _emitter_class().remote()
        plan = [("int8", "hit", 4_000), ("int4", "hit", 2_000), ("scout", "hit", 100),
                ("bf16", "miss", 8_000)]
        emitted = []
        checked_panels = False
        for i in range(STEPS):
            mode, outcome, size = plan[i % len(plan)]
            latency_s = 0.1 + 0.1 * (i % len(plan))
            ray.get(emitter.step.remote(i, mode, outcome, size, latency_s))
            emitted.append((mode, outcome, size, latency_s))
            time.sleep(STEP_S)
            if i == STEPS - 4 and not checked_panels:
                # Mid-run, with rates still moving: every panel must show numbers.
                _wait_for("the testbed series in Prometheus", lambda: _values(
                    prom_port, f'ray_ray_scout_agent_mode{{SessionName="{session}"}}'), prom_port)
                for name, expr in _panel_queries(session):
                    values = _values(prom_port, expr)
                    assert values and all(not math.isnan(v) for v in values), (name, expr)
                checked_panels = True

        requests = 2 * len(emitted)
        hits = 2 * sum(1 for e in emitted if e[1] == "hit")
        payload = 2 * sum(e[2] for e in emitted)
        scoped = f'SessionName="{session}"'
        _wait_for("the last step's counters", lambda: _values(
            prom_port, f"sum(ray_ray_scout_agent_requests_total{{{scoped}}})") == [requests],
            prom_port)
        assert _values(prom_port, f'sum(ray_ray_scout_agent_requests_total{{{scoped},'
                                  f'outcome="hit"}})') == [hits]
        assert _values(prom_port, f"sum(ray_ray_scout_agent_payload_bytes_total{{{scoped}}})") \
            == [payload]
        assert _values(prom_port, f"max(ray_ray_scout_agent_granted_rate_bps{{{scoped}}})") \
            == [GRANT_BPS]
        assert _values(prom_port, f"sum(ray_ray_scout_agent_latency_seconds_count{{{scoped}}})") \
            == [requests]
        assert _values(prom_port, f"sum(ray_ray_scout_cloud_batch_size_count{{{scoped}}})") \
            == [STEPS]
        assert _values(prom_port, f"max(ray_ray_scout_allocator_capacity_bps{{{scoped}}})") \
            == [CAPACITY_BPS]
        from ray_scout.actors.metrics import MODE_CODES
        from ray_scout.core.modes import Mode
        last_mode = Mode(emitted[-1][0])
        assert _values(prom_port, f"max(ray_ray_scout_agent_mode{{{scoped}}})") \
            == [MODE_CODES[last_mode]]
    finally:
        if prom is not None and prom.poll() is None:
            os.killpg(prom.pid, signal.SIGTERM)
            prom.wait(20)
        ray.shutdown()
