"""What an edge stage takes and gives for one request, in every fidelity.

A request arrives (``Arrival``) with a context length the runner has priced once
(``RequestShape``). The edge stage turns it, in one call, into an ``EdgeOutcome``: the mode
the agent's ``decide`` chose on the sizes and latencies the stage offered, and either the
payload for that mode or a local answer. ``score`` then says what an answer was worth. The
stages of ``full`` (real models) and ``profiled`` (measured times) both follow ``Edge``; the
agent never asks which one it holds. Light on purpose: no torch here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Protocol

from ray_scout.core.control.policy import Decision, LatencyModel
from ray_scout.core.modes import Mode


@dataclasses.dataclass(frozen=True)
class Arrival:
    """One request of the workload: when (s after the run's start) and how long its context."""

    request_id: int
    t_s: float
    context_tokens: int
    sample_index: int = 0


@dataclasses.dataclass(frozen=True)
class RequestShape:
    """What a request of one context length costs, computed by the runner once.

    Precomputed so profiled agents import neither torch nor the codecs: exact payload bytes
    per mode, the policy's latency model, and the edge compute seconds per mode (``local``
    absent when the timing source cannot answer at the edge alone).
    """

    context_tokens: int
    selected_tokens: int
    payload_bytes: Mapping[Mode, int]
    latency: LatencyModel
    edge_s: Mapping[Mode, float]


# The agent's choice on what the stage offers (exact payload sizes, the latency model with
# the edge time already spent taken out); None when no time is left to decide.
Decide = Callable[[Mapping[Mode, int], LatencyModel], "Decision | None"]


@dataclasses.dataclass(frozen=True)
class EdgeOutcome:
    """One request after the edge: the decision and the payload or the local answer.

    ``body`` is set for a cloud mode, ``answer`` for ``local``; neither when ``decision`` is
    None (the deadline passed before the decision) or ``error`` says why the stage could not
    serve the chosen mode. Timings the fidelity does not measure are NaN.
    """

    decision: Decision | None
    body: bytes | None = None
    answer: str | None = None
    error: str = ""
    prefill_s: float = math.nan
    select_s: float = math.nan
    encode_s: float = math.nan


@dataclasses.dataclass(frozen=True)
class Score:
    """What an answer was worth: ``quality`` for the results, F1/EM where a gold answer exists."""

    quality: float
    f1: float = math.nan
    em: float = math.nan


class Edge(Protocol):
    """An edge stage: one call per request, then a score per answer."""

    def handle(self, arrival: Arrival, decide: Decide) -> EdgeOutcome: ...

    def score(self, arrival: Arrival, mode: Mode, answer: str) -> Score: ...
