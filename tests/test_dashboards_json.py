"""dashboards/ray-scout.json imports into Grafana: its structure, variables and metric names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DASHBOARDS / "ray-scout.json").read_text())


def test_dashboard_has_the_fields_grafana_import_requires(dashboard):
    assert isinstance(dashboard["title"], str) and dashboard["title"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["panels"] and all(isinstance(p, dict) for p in dashboard["panels"])


def test_panels_have_unique_ids_and_tile_the_24_column_grid_without_overlap(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y"))
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_every_panel_queries_prometheus_through_the_datasource_variable(dashboard):
    names = {v["name"] for v in dashboard["templating"]["list"]}
    source = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
            assert used <= names | BUILTIN_VARIABLES, f"{panel['title']}: unknown {used - names}"


def test_dashboard_covers_what_the_lab_guide_explains(dashboard):
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("mode", "granted", "bytes", "latency", "deadline", "quality", "queue"):
        assert topic in titles


def test_metric_names_are_the_testbeds_with_rays_prefix(dashboard):
    actors = Path(__file__).resolve().parents[1] / "ray_scout" / "actors"
    declared = {name for module in actors.glob("*.py")
                for name in re.findall(r'"(ray_scout_\w+)"', module.read_text())}
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = set(re.findall(r"\bray_(ray_scout_\w+?)(?:_bucket|_sum|_count)?\b", exprs))
    assert used and used <= declared, f"not declared by the testbed: {used - declared}"


def test_prometheus_config_is_valid_for_promtool(missing):
    if shutil.which("promtool") is None:
        missing("promtool missing: scripts/setup.sh installs Debian's prometheus")
    done = subprocess.run(["promtool", "check", "config", str(DASHBOARDS / "prometheus.yml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
