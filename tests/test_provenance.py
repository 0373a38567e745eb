"""Result files say where they came from: the machine as the kernel reports it, the commit."""

from __future__ import annotations

import ast
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
    assert (result["n"], round(result["median_ms"], 2)) == (507, 0.30)
    assert result["resolution_ms"] == 2.0


def test_cell_scaling_records_the_machine_and_the_commit_with_its_dirty_mark(tmp_path):
    # Decisions only (no namespaces, no root): the provenance line comes first either way.
    out = tmp_path / "cell.jsonl"
    subprocess.run([sys.executable, "bench/cell_scaling.py", "--agents", "--topology",
                    "--simulate", "--decide", "10", "--strategies", "equal", "--repeats", "1",
                    "--out", str(out)], cwd=REPO, check=True, capture_output=True, timeout=300)
    first, *rows = (json.loads(line) for line in out.read_text().splitlines())
    assert first["kind"] == "provenance"
    assert first["machine"] == provenance.machine()
    assert first["commit"] == provenance.git_commit()
    assert rows and all(r["kind"] == "decision" for r in rows)


# How a bench script writes a results file; a script doing any of these must record where the
# figures came from (``ray_scout.provenance``, directly or through ``bench/gpu_common.py``).
_WRITING_METHODS = {"write_text", "to_csv", "save", "write_results"}
_OUT_OPTIONS = {"--out", "--out-dir", "--json"}


def _writes_a_file(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in _WRITING_METHODS:
            return True
        if (name == "dump" and isinstance(func, ast.Attribute)
                and getattr(func.value, "id", "") == "json"):
            return True
        if name == "open":
            modes = [a.value for a in node.args + [k.value for k in node.keywords
                                                   if k.arg == "mode"]
                     if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if any(set(mode) & set("wax") for mode in modes):
                return True
        if name == "add_argument" and any(isinstance(a, ast.Constant) and a.value in _OUT_OPTIONS
                                          for a in node.args):
            return True
    return False


def _references_provenance(tree: ast.AST) -> bool:
    """Imports ``ray_scout.provenance``, ``gpu_common.provenance`` (which merges its record),
    or writes latency profiles from ``latency.measure`` (whose provenance line is built from
    the record)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (
                node.module in ("ray_scout.provenance", "gpu_common")
                and any(alias.name in ("record", "provenance") for alias in node.names)
                or node.module == "ray_scout"
                and any(alias.name == "provenance" for alias in node.names)):
            return True
        if isinstance(node, ast.Import) and any(a.name == "ray_scout.provenance"
                                                for a in node.names):
            return True
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "measure" and getattr(node.func.value, "id", "") == "latency"):
            return True
    return False


def _imports_the_record(path: Path) -> bool:
    return any(isinstance(node, ast.ImportFrom) and node.module == "ray_scout.provenance"
               and any(alias.name == "record" for alias in node.names)
               for node in ast.walk(ast.parse(path.read_text())))


def test_every_bench_script_that_writes_results_records_provenance():
    writers = {path.name: ast.parse(path.read_text()) for path in sorted(REPO.glob("bench/*.py"))}
    writers = {name: tree for name, tree in writers.items() if _writes_a_file(tree)}
    # The detector itself must see the scripts known to write results.
    assert {"cell_scaling.py", "gpu_common.py", "snapkv_vs_q2c.py"} <= set(writers)
    missing = sorted(name for name, tree in writers.items() if not _references_provenance(tree))
    assert not missing, (f"{missing} write results without ray_scout.provenance: merge "
                         "provenance.record() into what they write")
    # What counts as provenance through another module does carry the record.
    assert "provenance.record()" in (REPO / "bench/gpu_common.py").read_text()
    assert _imports_the_record(REPO / "ray_scout/core/llm/latency.py")
