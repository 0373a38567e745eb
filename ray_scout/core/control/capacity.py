"""Capacity traces: how fast the shared bottleneck is, second by second.

What lives here: a piecewise-constant rate over time (``CapacityTrace``), the 6-state Markov
chain of Paper B, readers for Mahimahi packet-delivery traces and Pensieve-style throughput
logs, and YAML/CSV save and load. What it knows: rates in bits per second over seconds.
What it leaves to others: applying a rate to a real link (``net`` replays ``.segments``) and
sharing it among agents (``allocation``, the simulator).
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import yaml

MBIT = 1e6
MAHIMAHI_PACKET_BYTES = 1500
PAPER_B_STATES_BPS = tuple(r * MBIT for r in (5, 10, 25, 50, 100, 200))


class TraceError(ValueError):
    """A trace file or trace parameters that cannot describe a capacity over time."""


@dataclasses.dataclass(frozen=True)
class CapacityTrace:
    """A rate that holds from each segment's start until the next start, then to the end.

    ``segments`` are ``(start_s, rate_bps)`` with strictly increasing starts, the first at 0;
    the trace ends at ``duration_s`` (after the last start). Past the end the last rate holds,
    so a run longer than its trace does not fall off a cliff; ``looped`` wraps instead.
    """

    segments: tuple[tuple[float, float], ...]
    duration_s: float

    def __post_init__(self) -> None:
        segs = tuple((float(s), float(r)) for s, r in self.segments)
        object.__setattr__(self, "segments", segs)
        if not segs:
            raise TraceError("a capacity trace needs at least one (start_s, rate_bps) segment")
        if segs[0][0] != 0.0:
            raise TraceError(f"the first segment must start at 0 s, not {segs[0][0]}")
        starts = [s for s, _ in segs]
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise TraceError("segment starts must be strictly increasing")
        if any(r < 0 or not math.isfinite(r) for _, r in segs):
            raise TraceError("segment rates must be finite and >= 0 bit/s")
        if not self.duration_s > starts[-1]:
            raise TraceError(
                f"duration_s={self.duration_s} must exceed the last segment start {starts[-1]}"
            )

    @classmethod
    def constant(cls, rate_bps: float, duration_s: float) -> "CapacityTrace":
        return cls(((0.0, rate_bps),), duration_s)

    @property
    def change_times_s(self) -> tuple[float, ...]:
        """Times at which the rate changes (segment starts after the first)."""
        return tuple(s for s, _ in self.segments[1:])

    def rate_at(self, t: float) -> float:
        if t < 0:
            raise TraceError(f"no capacity before time 0 (asked for t={t})")
        i = bisect.bisect_right([s for s, _ in self.segments], t) - 1
        return self.segments[i][1]

    def mean_rate_bps(self) -> float:
        starts = [s for s, _ in self.segments] + [self.duration_s]
        return sum((b - a) * r for (a, _), b, (_, r) in
                   zip(self.segments, starts[1:], self.segments)) / self.duration_s

    def looped(self, duration_s: float) -> "CapacityTrace":
        """This trace repeated until ``duration_s``, as Mahimahi replays its traces."""
        segs: list[tuple[float, float]] = []
        offset = 0.0
        while offset < duration_s:
            for start, rate in self.segments:
                if offset + start >= duration_s:
                    break
                if not segs or segs[-1][1] != rate:
                    segs.append((offset + start, rate))
            offset += self.duration_s
        return CapacityTrace(tuple(segs), duration_s)

    # --- I/O -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write YAML (``.yaml``/``.yml``) or CSV (``start_s,rate_bps`` plus an end row)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            doc = {"duration_s": self.duration_s,
                   "segments": [{"start_s": s, "rate_bps": r} for s, r in self.segments]}
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
        elif path.suffix == ".csv":
            with path.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["start_s", "rate_bps"])
                writer.writerows(self.segments)
                # The end row carries no rate: it only closes the last segment.
                writer.writerow([self.duration_s, ""])
        else:
            raise TraceError(f"cannot save a trace as {path.suffix!r}; use .yaml or .csv")

    @classmethod
    def load(cls, path: str | Path) -> "CapacityTrace":
        """Read what ``save`` wrote."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            doc = yaml.safe_load(path.read_text())
            try:
                segs = tuple((d["start_s"], d["rate_bps"]) for d in doc["segments"])
                return cls(segs, float(doc["duration_s"]))
            except (KeyError, TypeError) as exc:
                raise TraceError(f"{path}: expected duration_s and segments of "
                                 f"start_s/rate_bps ({exc})") from None
        if path.suffix == ".csv":
            with path.open() as f:
                rows = list(csv.reader(f))
            if len(rows) < 3 or rows[0] != ["start_s", "rate_bps"]:
                raise TraceError(f"{path}: expected a start_s,rate_bps header, segments and "
                                 "an end row")
            segs = tuple((float(s), float(r)) for s, r in rows[1:-1])
            return cls(segs, float(rows[-1][0]))
        raise TraceError(f"cannot load a trace from {path.suffix!r}; use .yaml or .csv")


def default_transition(num_states: int, stay_prob: float = 0.8) -> np.ndarray:
    """Stay with ``stay_prob``, else step to a neighbouring state with equal odds.

    Paper B does not publish its matrix; this birth-death chain is the simplest one with its
    6 states that changes rate gradually, as a fading channel does between 1-s steps. At the
    two ends the single neighbour takes the whole move probability.
    """
    if not 0 <= stay_prob <= 1:
        raise TraceError(f"stay_prob must lie in [0, 1], not {stay_prob}")
    p = np.zeros((num_states, num_states))
    for i in range(num_states):
        neighbours = [j for j in (i - 1, i + 1) if 0 <= j < num_states]
        p[i, i] = stay_prob if neighbours else 1.0
        for j in neighbours:
            p[i, j] = (1 - stay_prob) / len(neighbours)
    return p


def markov_chain(
    states_bps: tuple[float, ...] = PAPER_B_STATES_BPS,
    transition: np.ndarray | None = None,
    step_s: float = 1.0,
    duration_s: float = 60.0,
    seed: int = 0,
    initial_state: int | None = None,
) -> CapacityTrace:
    """A rate that jumps between ``states_bps`` every ``step_s`` (Paper B's channel model).

    ``transition[i, j]`` is the chance to move from state i to j at a step; the default is
    ``default_transition(len(states_bps))``. The first state is drawn uniformly unless given.
    """
    n = len(states_bps)
    p = default_transition(n) if transition is None else np.asarray(transition, dtype=float)
    if p.shape != (n, n) or (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0):
        raise TraceError(f"transition must be a {n}x{n} row-stochastic matrix")
    if step_s <= 0 or duration_s <= 0:
        raise TraceError("step_s and duration_s must be positive")
    rng = np.random.default_rng(seed)
    state = int(rng.integers(n)) if initial_state is None else initial_state
    segs: list[tuple[float, float]] = []
    for k in range(math.ceil(duration_s / step_s)):
        if k:
            state = int(rng.choice(n, p=p[state]))
        if not segs or segs[-1][1] != states_bps[state]:
            segs.append((k * step_s, float(states_bps[state])))
    return CapacityTrace(tuple(segs), duration_s)


def load_mahimahi(path: str | Path, window_s: float = 0.1) -> CapacityTrace:
    """A Mahimahi trace: one line per 1500-byte delivery opportunity, at a ms timestamp.

    The rate of each ``window_s`` window is the bytes it may deliver over its length; the
    trace lasts until the last timestamp (rounded up to a whole window), where Mahimahi loops.
    """
    stamps_ms = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            stamps_ms.append(int(line))
        except ValueError:
            raise TraceError(f"{path}:{lineno}: expected an integer ms timestamp, "
                             f"got {line!r}") from None
    if not stamps_ms:
        raise TraceError(f"{path}: no delivery opportunities")
    if any(b < a for a, b in zip(stamps_ms, stamps_ms[1:])):
        raise TraceError(f"{path}: timestamps must not decrease")
    window_ms = window_s * 1e3
    num_windows = max(1, math.ceil(stamps_ms[-1] / window_ms))
    # A stamp exactly on a window's end belongs to that window, as Mahimahi delivers at t=ms.
    idx = np.minimum(np.maximum(np.ceil(np.array(stamps_ms) / window_ms) - 1, 0),
                     num_windows - 1).astype(int)
    counts = np.bincount(idx, minlength=num_windows)
    segs: list[tuple[float, float]] = []
    for w, count in enumerate(counts):
        rate = count * MAHIMAHI_PACKET_BYTES * 8 / window_s
        if not segs or segs[-1][1] != rate:
            segs.append((w * window_s, float(rate)))
    return CapacityTrace(tuple(segs), num_windows * window_s)


def load_throughput_log(path: str | Path) -> CapacityTrace:
    """Two whitespace-separated columns ``time_s Mbit/s`` (Pensieve's cooked traces).

    Each row's rate holds from its time until the next row; the last row lasts as long as the
    median gap, since the log does not say when it ends. Times are shifted to start at 0.
    """
    rows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            rows.append((float(parts[0]), float(parts[1])))
        except (ValueError, IndexError):
            raise TraceError(f"{path}:{lineno}: expected 'time_s Mbit/s', got {line!r}") from None
    if len(rows) < 2:
        raise TraceError(f"{path}: need at least two rows to know how long a row lasts")
    t0 = rows[0][0]
    times = [t - t0 for t, _ in rows]
    gaps = np.diff(times)
    if (gaps <= 0).any():
        raise TraceError(f"{path}: times must strictly increase")
    segs = tuple((t, mbit * MBIT) for t, (_, mbit) in zip(times, rows))
    return CapacityTrace(segs, times[-1] + float(np.median(gaps)))
