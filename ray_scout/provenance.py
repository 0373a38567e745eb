"""Where a measured number came from: the machine as the kernel reports it, the commit, the
load. Read, never typed, so a result file cannot claim a machine it did not run on.

Stdlib only: benchmarks that never import torch use it too.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The processor's model name and core count, for provenance lines."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.machine()} x{os.cpu_count()}"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def machine() -> str:
    """``<cpu> x<cores>, <n> GiB, kernel <release>, Python <version>``."""
    memory = memory_gib()
    return (f"{cpu_name()}, {memory if memory is not None else '?'} GiB, kernel "
            f"{platform.release()}, Python {platform.python_version()}")


def git_commit() -> str:
    """The checked-out commit, ``+dirty`` when tracked files differ from it; ``unknown``
    outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                              text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def record() -> dict:
    """The provenance fields every result file of ``bench/`` carries."""
    return {"machine": machine(), "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_1_5_15": list(os.getloadavg())}
