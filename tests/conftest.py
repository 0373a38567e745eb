"""Shared fixtures: the tiny random model for fast unit tests, the embedded one for
integration tests (loaded once per session)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model():
    from ray_scout.core.models import load_model

    return load_model("random:tiny")


@pytest.fixture(scope="session")
def embedded_model():
    from ray_scout.core.models import load_model

    return load_model("embedded")
