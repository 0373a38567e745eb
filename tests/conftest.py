"""Shared fixtures: the tiny random model for fast unit tests, the embedded one for
integration tests (loaded once per session)."""

from __future__ import annotations

import pytest
import torch
from ci import in_ci

# Tests marked `netem` run where sch_netem is: here, or in one boot of the netem lab.
from netem_lab import (  # noqa: F401 - pytest finds hooks by name
    pytest_collection_modifyitems,
    pytest_runtest_protocol,
    pytest_terminal_summary,
)

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def missing():
    """``missing(reason)`` for a required tool that is not installed: a skip on a developer's
    machine, a failure in CI (``CI=true``), where scripts/setup.sh must have installed it, so
    a broken install cannot pass as skipped tests."""
    def report(reason: str) -> None:
        if in_ci():
            pytest.fail(f"{reason} (CI=true: this test must run in CI)")
        pytest.skip(reason)

    return report


@pytest.fixture(scope="session")
def tiny_model():
    from ray_scout.core.llm.models import load_model

    return load_model("random:tiny")


@pytest.fixture(scope="session")
def embedded_model():
    from ray_scout.core.llm.models import load_model

    return load_model("embedded")


@pytest.fixture()
def ray_temp_dir():
    """A short temp dir for a test's own Ray (socket paths are length-limited), removed once
    every process naming it has exited: ray.shutdown() returns before the dashboard's last
    write there."""
    import shutil
    import tempfile
    import time
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="rs-"))
    yield path
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
            str(path).encode() in p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline")
            if p.exists()):
        time.sleep(0.5)
    shutil.rmtree(path, ignore_errors=True)
