"""Trace replay: drive a capacity trace live onto an HTB class, logging when each rate took effect.

Takes any trace with ``segments: list[tuple[float, float]]`` (start time in s, rate in bit/s;
piecewise constant, as ``ray_scout.core.control.capacity.CapacityTrace``) and any target with
``set_rate(rate_bps) -> call seconds`` (a ``LeafClass``). Parsing traces is not done here.
A timer thread sleeps to each segment start on the monotonic clock; each change is logged
with the trace time, the wall-clock time (to join with request logs) and the call's own
duration, so results can be joined to the capacity that was in force.
"""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from ray_scout.net.errors import NetError
from ray_scout.net.profiles import MAX_RATE_BPS, MIN_RATE_BPS


class Trace(Protocol):
    segments: list[tuple[float, float]]


class RateTarget(Protocol):
    def set_rate(self, rate_bps: float) -> float: ...


@dataclass(frozen=True)
class RateChange:
    """One applied segment. ``applied_bps`` differs from ``trace_bps`` only where HTB's range clips it."""

    trace_t_s: float
    late_s: float  # how long after its scheduled time the call started
    wall_time_s: float  # time.time() at the call
    trace_bps: float
    applied_bps: float
    call_s: float


def _check(segments: list[tuple[float, float]]) -> None:
    if not segments:
        raise NetError("the trace has no segments; give at least one (start_s, rate_bps)")
    starts = [start for start, _ in segments]
    if starts[0] < 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise NetError("trace segment starts must be >= 0 and strictly increasing; sort or fix the trace")


@dataclass
class TraceReplay:
    """Replay ``trace`` onto ``target``; ``start()``/``stop()`` or use as a context manager."""

    target: RateTarget
    trace: Trace
    time_scale: float = 1.0  # 0.5 plays twice as fast
    clock: Callable[[], float] = time.monotonic
    log: list[RateChange] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(list(self.trace.segments))
        if self.time_scale <= 0:
            raise NetError(f"time_scale must be > 0; got {self.time_scale}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trace-replay", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> TraceReplay:
        self._t0 = self.clock()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for start_s, rate_bps in self.trace.segments:
                due = self._t0 + start_s * self.time_scale
                if self._stop.wait(max(0.0, due - self.clock())):
                    return
                late_s = self.clock() - due
                applied = min(max(rate_bps, MIN_RATE_BPS), MAX_RATE_BPS)
                wall = time.time()
                call_s = self.target.set_rate(applied)
                self.log.append(RateChange(start_s, late_s, wall, rate_bps, applied, call_s))
        except BaseException as error:  # surfaced by join(); a replay must not fail silently
            self._error = error

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if self._error is not None:
            raise NetError(f"trace replay stopped: {self._error}") from self._error

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def __enter__(self) -> TraceReplay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def write_csv(self, path: str | Path) -> None:
        """The log as CSV, one row per applied segment (columns = ``RateChange`` fields)."""
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(RateChange.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(asdict(change) for change in self.log)
