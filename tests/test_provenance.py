"""Result files say where they came from: the machine as the kernel reports it, the commit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ray_scout import provenance

REPO = Path(__file__).resolve().parents[1]


def test_the_machine_is_read_from_proc_not_typed():
    model = next(line.split(":", 1)[1].strip()
                 for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name"))
    assert provenance.machine().startswith(model)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert head.startswith(provenance.git_commit().removesuffix("+dirty"))


def test_testbed_figures_records_the_machine_that_ran_it_and_the_commit(tmp_path):
    out = tmp_path / "overhead.json"
    subprocess.run([sys.executable, "bench/testbed_figures.py", "overhead", "--results",
                    "experiments/results/allocation_congestion", "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["machine"] == provenance.machine()
    assert result["commit"] == provenance.git_commit()
    # The committed CSV reproduces docs/TESTBED.md's figure, at the resolution it states.
    assert (result["n"], round(result["median_ms"], 2)) == (296, 0.16)
    assert result["resolution_ms"] == 2.0


def test_cell_scaling_records_the_machine_and_the_commit_with_its_dirty_mark(tmp_path):
    # Decisions only (no namespaces, no root): the provenance line comes first either way.
    out = tmp_path / "cell.jsonl"
    subprocess.run([sys.executable, "bench/cell_scaling.py", "--agents", "--topology",
                    "--decide", "10", "--strategies", "equal", "--repeats", "1",
                    "--out", str(out)], cwd=REPO, check=True, capture_output=True, timeout=300)
    first, *rows = (json.loads(line) for line in out.read_text().splitlines())
    assert first["kind"] == "provenance"
    assert first["machine"] == provenance.machine()
    assert first["commit"] == provenance.git_commit()
    assert rows and all(r["kind"] == "decision" for r in rows)
