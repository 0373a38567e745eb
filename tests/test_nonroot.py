"""The CLI as an ordinary user: one clear line and a non-zero exit where root is needed, and
simulated fidelity works without it. Nothing is mocked: the commands run as `nobody`.

`nobody` keeps one capability, CAP_DAC_READ_SEARCH (ambient), only so it can reach the
Python interpreter installed under /root on this machine and in CI; it has neither
CAP_NET_ADMIN nor CAP_SYS_ADMIN, which is what the link layer needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ray_scout.experiments.spec import REPO_ROOT

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="switches to user nobody with setpriv, which needs root (and util-linux's setpriv)")

EXIT_NO_PRIVILEGE = 77


def as_nobody(home: Path, *argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    home.mkdir(exist_ok=True)
    home.chmod(0o777)
    command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
               "--inh-caps=-all,+dac_read_search", "--ambient-caps=+dac_read_search",
               "env", f"HOME={home}", f"PYTHONPATH={REPO_ROOT}", sys.executable,
               "-m", "ray_scout.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                          cwd=REPO_ROOT)


def test_scout_run_of_an_emulated_spec_says_it_needs_root_in_one_line_and_creates_nothing(tmp_path):
    # Issue 17, defect 7: a CapabilityError traceback suggesting `net probe`, after the
    # output folder and its spec.yaml had been created.
    out = tmp_path / "home" / "out"
    result = as_nobody(tmp_path / "home", "run", "experiments/demo.yaml", "--out", str(out))
    assert result.returncode == EXIT_NO_PRIVILEGE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("scout run: ") and "CAP_NET_ADMIN" in lines[0]
    assert "sudo scout run experiments/demo.yaml" in lines[0] and "--fidelity simulated" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("argv", [["net", "probe"], ["net", "cleanup", "--prefix", "rs-nobody-"],
                                  ["net", "cleanup", "--stale"], ["net", "up", "--edges", "1"]])
def test_net_commands_that_need_root_say_so_naming_the_command(tmp_path, argv):
    result = as_nobody(tmp_path / "home", *argv)
    assert result.returncode == EXIT_NO_PRIVILEGE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"scout {' '.join(argv[:2])}: ") and "CAP_NET_ADMIN" in lines[0]
    assert "net probe" not in lines[0] or argv[1] == "probe"


def test_scout_run_at_simulated_fidelity_works_without_root(tmp_path):
    out = tmp_path / "home" / "out"
    result = as_nobody(tmp_path / "home", "run", "experiments/demo.yaml", "--fidelity", "simulated",
                       "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert (out / "summary.md").exists() and (out / "requests.csv").exists()


def test_a_missing_latency_profile_is_one_line_and_creates_no_folder(tmp_path):
    # Issue 17, defect 8: a ComputeError traceback, after the output folder was created.
    spec = tmp_path / "home" / "spec.yaml"
    spec.parent.mkdir()
    text = (REPO_ROOT / "experiments" / "demo.yaml").read_text()
    spec.write_text(text.replace("timing: experiments/profiles/", "timing: experiments/nope/"))
    out = tmp_path / "home" / "out"
    result = as_nobody(tmp_path / "home", "run", str(spec), "--fidelity", "simulated", "--out", str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "agents[edge].edge_timing: latency profile" in lines[0] and "not found" in lines[0]
    assert not out.exists()
