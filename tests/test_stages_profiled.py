"""Profiled fidelity: the request body padded to the exact payload size, the sizes and
timings a request is priced with, and the stages: one call per request at the edge, one per
batch in the cloud."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ray_scout.core.control.policy import (
    PAPER_B_PAYLOAD_BYTES, Decision, paper_b_latency, paper_b_profile,
)
from ray_scout.core.llm.latency import LatencyProfile
from ray_scout.core.llm.models import facts_for
from ray_scout.core.modes import CLOUD_MODES, Mode
from ray_scout.core.stages.profiled import (
    ComputeError, PaperBTiming, ProfiledCloud, ProfiledEdge, ProfiledRequest, ProfiledService,
    ProfileTiming, latency_model, profiled_payload_bytes, scout_size_bound_bytes,
)
from ray_scout.core.stages.request import Arrival, RequestShape

LATENCY = paper_b_latency()
# Edge times scaled down 100x so the slept time is measurable but short.
FAST = {m: s / 100 for m, s in LATENCY.edge_s.items()}
SHAPE = RequestShape(170, 128, dict(PAPER_B_PAYLOAD_BYTES), LATENCY, FAST)

PROFILE = LatencyProfile("m", "cpu", ((128, 0.1), (1024, 0.5)), ((128, 0.01), (1024, 0.02)))

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


@given(mode=st.sampled_from(list(Mode)), tokens=st.integers(1, 1 << 20),
       extra=st.integers(0, 1 << 16))
def test_profiled_body_roundtrips_at_exactly_the_payload_size(mode, tokens, extra):
    req = ProfiledRequest(mode, "qwen2.5-7b", tokens, max(1, tokens // 2), 24)
    size = len(req.to_body(200)) + extra
    body = req.to_body(size)
    assert len(body) == size
    assert ProfiledRequest.from_body(body) == req


@given(st.binary(max_size=64))
def test_arbitrary_bytes_are_not_a_profiled_body(data):
    with pytest.raises(ComputeError):
        ProfiledRequest.from_body(b"XXXX" + data)


def test_a_payload_smaller_than_its_descriptor_is_refused():
    with pytest.raises(ComputeError, match="at least"):
        ProfiledRequest(Mode.SCOUT, "m", 10, 5, 24).to_body(10)


def test_kv_sizes_are_the_wire_formats_exact_sizes_and_shrink_with_bits():
    from ray_scout.core.llm.wire import payload_size_bytes

    facts = facts_for("random:qwen2.5-7b")
    sizes = profiled_payload_bytes(facts, 1000)
    # By hand from docs/CODECS.md's formula: 999 KV tokens x (28 layers x 2 (K, V) x 4 heads
    # x 128 dims x 2 B = 57,344 B, + 4 B of position) + a 100 B header with the one tail id.
    assert sizes[Mode.BF16] == 999 * (57_344 + 4) + 100 == 57_290_752
    assert sizes[Mode.BF16] == payload_size_bytes(Mode.BF16, facts, 999, tail_tokens=1)
    assert sizes[Mode.BF16] > sizes[Mode.INT8] > sizes[Mode.MIXED_INT4] > sizes[Mode.INT4]
    # Scout's stand-in: flag, 32 B hash, varints (7 B), a bitmap of ceil(1000 / 8) = 125 B,
    # 64 B of question and 64 of envelope (the 190 B of docs/TESTBED.md's modes table at 170).
    assert sizes[Mode.SCOUT] == scout_size_bound_bytes(1000) == 1 + 32 + 7 + 125 + 128 == 293
    assert scout_size_bound_bytes(170) == 190


def test_scout_pays_the_cloud_reprefill_and_kv_modes_do_not():
    t = ProfileTiming(PROFILE)
    kv = t.cloud_s(Mode.INT8, 1024, 512, 24)
    scout = t.cloud_s(Mode.SCOUT, 1024, 512, 24)
    # scout_answer prefills the whole prompt, then decodes over the selection and question.
    assert scout - kv == pytest.approx(PROFILE.prefill_s(1024 + 32) - PROFILE.prefill_s(32)
                                       + PROFILE.decode_s(512 + 32, 24)
                                       - PROFILE.decode_s(1024, 24))
    assert t.edge_s(Mode.LOCAL, 1024, 24) > t.edge_s(Mode.INT8, 1024, 24)


def test_paper_b_timing_has_no_local_answer_so_the_latency_model_leaves_it_out():
    lat = latency_model(PaperBTiming(), PaperBTiming(), 100, 50, 24, rtt_s=0.01)
    assert Mode.LOCAL not in lat.edge_s
    assert lat.cloud_s[Mode.SCOUT] == pytest.approx(0.557)
    with pytest.raises(ComputeError, match="latency profile"):
        PaperBTiming().edge_s(Mode.LOCAL, 100, 24)


def test_profiled_cloud_refuses_a_model_it_does_not_host():
    cloud = ProfiledCloud({"a": PaperBTiming()})
    with pytest.raises(ComputeError, match="hosts"):
        cloud.service_s(ProfiledRequest(Mode.INT8, "b", 10, 5, 24))
