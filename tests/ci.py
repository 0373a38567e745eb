"""Whether this session is CI's (``.ci/run`` sets ``CI=true``): there a test that cannot run
for a missing tool fails instead of skipping."""

from __future__ import annotations

import os


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")
