"""The run's console: the project's own lines and progress bars on the terminal, everything
else in the run's log file.

What lives here: ``quiet`` moves this process's standard output and error (the file
descriptors, so Ray's C++ core worker writes there too: its per-actor warnings, task retry
lines, the stack dump of a signal) into ``<out>/run.log`` and hands back a ``Console`` on the
terminal for what a user should read. Python's ``sys.stdout``/``sys.stderr`` keep writing to
descriptors 1 and 2, so Ray's loggers, warnings and the actors' output that Ray forwards to
the driver (``log_to_driver``) land in the log as well. ``loud`` is the ``-v`` console: the
terminal for everything. What it leaves to others: what a run prints (``runner``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import TextIO

LOG_NAME = "run.log"


@dataclasses.dataclass(frozen=True)
class Console:
    """Where the project's own output goes; ``log`` is the file Ray's output went to, if any."""

    out: TextIO
    err: TextIO
    log: Path | None = None


def loud() -> Console:
    """Everything on the terminal (``scout run -v``)."""
    return Console(sys.stdout, sys.stderr)


def quiet(out_dir: Path) -> Console:
    """From now on, this process's descriptors 1 and 2 write to ``out_dir/run.log``.

    Deliberately not undone: Ray's C++ threads and its exit handlers write until the
    interpreter is gone, and a late line on the terminal reads as a failure.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / LOG_NAME
    # A file, not a terminal: every actor line as it came, without colour codes.
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.stdout.flush()
    sys.stderr.flush()
    terminal_out = os.fdopen(os.dup(1), "w", buffering=1)
    terminal_err = os.fdopen(os.dup(2), "w", buffering=1)
    with open(log, "ab") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
    return Console(terminal_out, terminal_err, log)
