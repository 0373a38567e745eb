"""The netem lab's host side: which host directories the guest sees, and the one command that
boots it (``scout net lab-kernel``) passing the guest's console and exit code back."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_scout.net.labkernel import LabUnavailable, _shares, check_lab


def test_a_checkout_under_tmp_is_shared_read_only_where_the_guest_mounts_its_tmpfs():
    reports = Path("/tmp/rs-labrep-x")
    assert _shares(Path("/tmp/clone"), [reports]) == [(reports, True), (Path("/tmp/clone"), False)]
    assert _shares(Path("/run/user/0/clone"), []) == [(Path("/run/user/0/clone"), False)]


def test_a_checkout_the_host_root_share_shows_or_a_writable_share_holds_is_not_shared_again():
    assert _shares(Path("/work/main"), [Path("/tmp/out")]) == [(Path("/tmp/out"), True)]
    assert _shares(Path("/tmp/out/clone"), [Path("/tmp/out")]) == [(Path("/tmp/out"), True)]
    assert _shares(Path("/tmpfoo/clone"), []) == []  # a sibling of /tmp, visible through the root


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the netem lab reads /boot/vmlinuz-*")
def test_scout_net_lab_kernel_passes_the_guests_console_and_exit_code_back(missing):
    try:
        kernel = check_lab()
    except LabUnavailable as error:
        missing(str(error))
    # In the guest: `scout net probe` (what a user runs first), then an exit code of our own.
    run = subprocess.run([sys.executable, "-m", "ray_scout.cli", "net", "lab-kernel", "--", "sh", "-c",
                          f"{sys.executable} -m ray_scout.cli net probe; exit 3"],
                         capture_output=True, text=True, timeout=300, check=False,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 3, run.stderr
    lines = {line.split(":")[0].strip(): line for line in run.stdout.splitlines()}
    assert f"kernel {kernel.release}" in run.stdout, "the guest's own kernel answered, on this console"
    assert "netem" in lines["qdiscs"] and "netem" not in lines["missing"], run.stdout
    assert "exit 3; command started" in run.stderr


def test_the_lab_only_ray_start_refuses_to_run_outside_the_guest(monkeypatch):
    from ray_scout.net.errors import NetError
    from ray_scout.experiments.labray import start_ray_for_tcg

    monkeypatch.delenv("RAY_SCOUT_IN_LAB", raising=False)
    with pytest.raises(NetError, match="guest only"):
        start_ray_for_tcg()
