"""The profiled stages: one call per request at the edge, one per batch in the cloud."""

from __future__ import annotations

import math
import time

import pytest

from ray_scout.core.control.policy import (
    PAPER_B_PAYLOAD_BYTES, Decision, paper_b_latency, paper_b_profile,
)
from ray_scout.core.modes import CLOUD_MODES, Mode
from ray_scout.core.stages.profiled import (
    PaperBTiming, ProfiledEdge, ProfiledRequest, ProfiledService,
)
from ray_scout.core.stages.request import Arrival, RequestShape

LATENCY = paper_b_latency()
# Edge times scaled down 100x so the slept time is measurable but short.
FAST = {m: s / 100 for m, s in LATENCY.edge_s.items()}
SHAPE = RequestShape(170, 128, dict(PAPER_B_PAYLOAD_BYTES), LATENCY, FAST)


def _edge(shape: RequestShape = SHAPE) -> ProfiledEdge:
    return ProfiledEdge({170: shape}, "qwen2.5-7b", 24, paper_b_profile("3b-7b"))


def _choose(mode: Mode):
    return lambda sizes, latency: Decision(mode, "test", {}, {}, (mode,), 1e6)


@pytest.mark.parametrize("mode", CLOUD_MODES)
def test_profiled_edge_sleeps_the_edge_time_and_pads_the_body_to_the_exact_size(mode):
    start = time.perf_counter()
    outcome = _edge().handle(Arrival(0, 0.0, 170), _choose(mode))
    assert time.perf_counter() - start >= FAST[mode]
    assert len(outcome.body) == PAPER_B_PAYLOAD_BYTES[mode]
    request = ProfiledRequest.from_body(outcome.body)
    assert (request.mode, request.context_tokens, request.selected_tokens) == (mode, 170, 128)
    assert math.isnan(outcome.prefill_s) and outcome.answer is None


def test_profiled_edge_offers_the_shapes_sizes_and_latency_to_the_decision():
    seen = []
    _edge().handle(Arrival(0, 0.0, 170),
                   lambda sizes, latency: seen.append((sizes, latency)) or None)
    assert seen == [(SHAPE.payload_bytes, LATENCY)]


def test_profiled_edge_reports_a_mode_it_has_no_edge_time_for():
    outcome = _edge().handle(Arrival(0, 0.0, 170), _choose(Mode.LOCAL))
    assert Mode.LOCAL not in FAST  # Paper B publishes no edge-only time
    assert outcome.body is None and outcome.answer is None
    assert outcome.error == "unanswered: no edge time for local in this fidelity"


def test_profiled_edge_answers_locally_when_the_profile_knows_local():
    shape = RequestShape(170, 128, SHAPE.payload_bytes, LATENCY, {**FAST, Mode.LOCAL: 0.001})
    outcome = _edge(shape).handle(Arrival(0, 0.0, 170), _choose(Mode.LOCAL))
    assert outcome.answer == "" and outcome.body is None


def test_profiled_edge_scores_with_the_quality_profile():
    profile = paper_b_profile("3b-7b")
    for mode in CLOUD_MODES:
        assert _edge().score(Arrival(0, 0.0, 170), mode, "").quality == profile.quality(mode)


def test_profiled_service_answers_every_slot_and_hands_back_bad_bodies():
    service = ProfiledService({"qwen2.5-7b": PaperBTiming()})
    good = ProfiledRequest(Mode.SCOUT, "qwen2.5-7b", 170, 128, 24).to_body(400)
    start = time.perf_counter()
    answers = service([good, b"not a profiled body"])
    slept = time.perf_counter() - start
    assert answers[0]["mode"] == "scout" and answers[0]["model_id"] == "qwen2.5-7b"
    assert answers[0]["decode_s"] == pytest.approx(LATENCY.cloud_s[Mode.SCOUT])
    assert slept >= LATENCY.cloud_s[Mode.SCOUT]
    assert isinstance(answers[1], Exception)
