"""Batched cloud compute answers exactly as one request at a time does."""

import pytest
import torch

from ray_scout.core.llm import generation, wire
from ray_scout.core.modes import Mode
from ray_scout.core.stages.full import CloudStage, EdgeOptions, EdgeStage, StageError

CONTEXTS = [
    "The harbour of Velmora was rebuilt in 1911. The code word for the vault is amberline. " * 2,
    "Ana Brist kept the lighthouse log. Ships: Orca, Tern, Kestrel. " * 4,
    "The vault opens at dawn. " * 3,
]
QUESTIONS = ["What is the code word?", "Who kept the log?", "When does the vault open?"]


def _payloads(lm, modes, options):
    stage = EdgeStage(lm, options)
    out = []
    for index, mode in enumerate(modes):
        analysis = stage.analyze(CONTEXTS[index % 3], QUESTIONS[index % 3])
        out.append(stage.encode(analysis, mode, cloud_has_document=False).data)
    return out


def _cloud(lm, max_new_tokens):
    return CloudStage({lm.model_id: lm}, max_new_tokens=max_new_tokens)


def test_batched_scout_answers_equal_unbatched_token_for_token(tiny_model):
    payloads = _payloads(tiny_model, [Mode.SCOUT] * 3, EdgeOptions(scout_retention=0.4))
    single = [_cloud(tiny_model, 8).answer(p) for p in payloads]
    batched = _cloud(tiny_model, 8).answer_batch(payloads)
    assert [a.text for a in batched] == [a.text for a in single]
    assert all(a.mode == Mode.SCOUT and a.prefill_s > 0 for a in batched)
    assert len({a.prefill_s for a in batched}) == 1  # one pass, shared by its members


def test_kv_modes_with_different_pruned_lengths_join_the_scout_decode_batch(tiny_model):
    modes = [Mode.INT8, Mode.SCOUT, Mode.BF16, Mode.INT4, Mode.SCOUT, Mode.MIXED_INT4]
    options = EdgeOptions(kv_retention=0.5, protected_layers=(0,))
    payloads = _payloads(tiny_model, modes, options)
    single = [_cloud(tiny_model, 6).answer(p) for p in payloads]
    batched = _cloud(tiny_model, 6).answer_batch(payloads)
    assert [(a.mode, a.text) for a in batched] == [(a.mode, a.text) for a in single]
    assert len({a.decode_s for a in batched}) == 1


def test_a_bad_payload_fails_only_its_own_slot(tiny_model):
    good = _payloads(tiny_model, [Mode.SCOUT, Mode.INT8], EdgeOptions())
    corrupt = good[1][:100] + bytes([good[1][100] ^ 0xFF]) + good[1][101:]
    foreign = wire.encode_payload(Mode.SCOUT, "not-hosted", {"scout": b""})
    results = _cloud(tiny_model, 4).answer_batch([good[0], corrupt, foreign, good[1]])
    assert isinstance(results[1], wire.WireError)
    assert isinstance(results[2], StageError) and "does not host" in str(results[2])
    assert results[0].mode == Mode.SCOUT and results[3].mode == Mode.INT8


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(tiny_model,
                                                                          monkeypatch):
    stage = EdgeStage(tiny_model)
    snaps, tails = [], []
    for context, question in zip(CONTEXTS, QUESTIONS):
        pre = stage.analyze(context, question).prefill
        snaps.append(generation.pruned_snapshot(pre, torch.arange(pre.layout.num_context)))
        tails.append(pre.layout.input_ids[-1:].tolist())
    free = [generation.continue_after(tiny_model, s, t, max_new_tokens=8).token_ids
            for s, t in zip(snaps, tails)]
    # The random model never says EOS: make one token per row a stop token instead.
    stops = {free[0][1], free[2][4]}
    monkeypatch.setattr(generation, "_is_stop", lambda lm, token, text: token in stops)
    single = [generation.continue_after(tiny_model, s, t, max_new_tokens=8).token_ids
              for s, t in zip(snaps, tails)]
    batched, _ = generation.continue_after_batch(tiny_model, snaps, tails, max_new_tokens=8)
    assert [a.token_ids for a in batched] == single
    assert len({len(t) for t in single}) > 1  # rows did leave at different steps


def test_batched_prefill_matches_single_prefill(tiny_model):
    stage = EdgeStage(tiny_model)
    layouts = [stage.analyze(c, q).layout for c, q in zip(CONTEXTS, QUESTIONS)]
    snaps, seconds = generation.prefill_batch(tiny_model, layouts)
    assert seconds > 0
    for layout, snap in zip(layouts, snaps):
        ref = generation.prefill(tiny_model, layout, capture="none").snapshot
        assert torch.equal(snap.positions, ref.positions)
        for mine, theirs in zip(snap.keys + snap.values, ref.keys + ref.values):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_unequal_tails_are_a_clear_error(tiny_model):
    pre = EdgeStage(tiny_model).analyze(CONTEXTS[0], QUESTIONS[0]).prefill
    with pytest.raises(generation.GenerationError, match="same non-zero length"):
        generation.continue_after_batch(tiny_model, [pre.snapshot] * 2, [[1], [1, 2]])


@pytest.mark.model
def test_embedded_batched_answers_equal_unbatched(embedded_model):
    modes = [Mode.SCOUT, Mode.SCOUT, Mode.INT8, Mode.SCOUT]
    payloads = _payloads(embedded_model, modes, EdgeOptions(scout_retention=0.5))
    single = [_cloud(embedded_model, 12).answer(p) for p in payloads]
    batched = _cloud(embedded_model, 12).answer_batch(payloads)
    assert [a.text for a in batched] == [a.text for a in single]
    assert any(a.text for a in single)


def _actor(service, **batching):
    from ray_scout.actors.cloud import CloudActor

    return CloudActor("c", [("127.0.0.1", 0)], None, service, **batching)


def _send(actor, bodies, deadline_unix_s=None):
    import json
    import threading
    import time

    from ray_scout.transport.server import Request

    replies: dict[int, object] = {}

    def one(index, body):
        now = time.time()
        try:
            replies[index] = json.loads(actor._handle(
                Request(body, index, deadline_unix_s, ("x", 0), now, now, len(body)))
                .result(timeout=10))
        except Exception as exc:  # noqa: BLE001 -- the test inspects it
            replies[index] = exc

    threads = [threading.Thread(target=one, args=(i, b)) for i, b in enumerate(bodies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    return [replies[i] for i in range(len(bodies))]


def _echo(seen):
    def serve(bodies):
        seen.append(len(bodies))
        return [ValueError("bad") if b == b"bad" else {"text": b.decode()} for b in bodies]
    return serve


def test_actor_collects_up_to_max_batch_within_the_window():
    seen = []
    actor = _actor(_echo(seen), max_batch=4, batch_window_s=0.5)
    # The cloud in a few words (Ray's Actors table shows it as the actor starts).
    assert repr(actor) == "c: queue 0, batch 0/4, served 0, dropped 0"
    try:
        replies = _send(actor, [b"a", b"b", b"bad", b"d"])
    finally:
        actor.close()
    assert seen == [4]
    assert repr(actor) == "c: queue 0, batch 4/4, served 3, dropped 0"  # "bad" failed
    assert isinstance(replies[2], ValueError)
    ok = [r for r in replies if isinstance(r, dict)]
    assert sorted(r["text"] for r in ok) == ["a", "b", "d"]
    assert all(r["batch_size"] == 4 and r["cloud_compute_s"] >= 0 for r in ok)
    assert len({r["cloud_compute_s"] for r in ok}) == 1  # the batch's time is each member's


def test_actor_defaults_to_one_request_at_a_time():
    seen = []
    actor = _actor(_echo(seen))
    try:
        replies = _send(actor, [b"a", b"b", b"c"])
    finally:
        actor.close()
    assert seen == [1, 1, 1] and all(r["batch_size"] == 1 for r in replies)


def test_actor_does_not_wait_past_the_window_for_a_full_batch():
    import time

    seen = []
    actor = _actor(_echo(seen), max_batch=8, batch_window_s=0.05)
    try:
        start = time.monotonic()
        replies = _send(actor, [b"only"])
        elapsed = time.monotonic() - start
    finally:
        actor.close()
    assert seen == [1] and replies[0]["cloud_queue_s"] >= 0.04 and elapsed < 2


def test_profiled_batch_model_sums_prefill_tokens_and_keeps_the_longest_decode():
    from ray_scout.core.stages.profiled import PaperBTiming, ProfiledCloud, ProfiledRequest, \
        ProfileTiming
    from ray_scout.core.llm.latency import LatencyProfile

    profile = LatencyProfile("m", "cpu", ((32, 0.1), (2048, 2.0)), ((32, 0.01), (2048, 0.02)))
    cloud = ProfiledCloud({"m": ProfileTiming(profile), "p": PaperBTiming()})
    scout = ProfiledRequest(Mode.SCOUT, "m", 1024, 256, 24)
    kv = ProfiledRequest(Mode.INT8, "m", 512, 256, 24)
    batch = cloud.batch_service_s([scout, kv])
    expected = (profile.prefill_s(1024 + 32 + 32)
                + max(profile.decode_s(256 + 32, 24), profile.decode_s(512, 24)))
    assert batch == pytest.approx(expected)
    assert batch < cloud.service_s(scout) + cloud.service_s(kv)
    paper = ProfiledRequest(Mode.INT8, "p", 512, 256, 24)
    assert cloud.batch_service_s([paper, paper]) == pytest.approx(2 * cloud.service_s(paper))


def test_actor_batches_one_key_at_a_time_and_keeps_the_others_in_order():
    seen: list[list[bytes]] = []

    def serve(bodies):
        seen.append(list(bodies))
        return [{"text": b.decode()} for b in bodies]

    serve.batch_key = lambda body: body[:1]  # a body's model: its first letter
    actor = _actor(serve, max_batch=8, batch_window_s=0.3)
    try:
        replies = _send(actor, [b"a1", b"b1", b"a2", b"b2", b"a3"])
    finally:
        actor.close()
    assert sorted(r["text"] for r in replies) == ["a1", "a2", "a3", "b1", "b2"]
    assert all(len({body[:1] for body in batch}) == 1 for batch in seen)  # one model each
    assert sum(len(batch) for batch in seen) == 5 and len(seen) <= 3


def test_profiled_service_batches_by_cloud_model():
    from ray_scout.core.stages.profiled import ProfiledRequest, ProfiledService

    body = ProfiledRequest(Mode.SCOUT, "qwen2.5-7b", 256, 128, 24).to_body(200)
    assert ProfiledService.batch_key(body) == "qwen2.5-7b"
    assert ProfiledService.batch_key(b"not a profiled body") is None
