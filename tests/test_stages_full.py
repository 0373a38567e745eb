import pytest

from ray_scout.core.llm import scout, wire
from ray_scout.core.modes import CLOUD_MODES, Mode
from ray_scout.core.stages.full import CloudStage, EdgeOptions, EdgeStage, StageError

CONTEXT = ("The harbour of Velmora was rebuilt in 1911. Its lighthouse keeper, Ana Brist, "
           "kept a log of every ship. The code word for the vault is amberline. ") * 3
QUESTION = "What is the code word for the vault?"


@pytest.fixture(scope="module")
def edge(tiny_model):
    stage = EdgeStage(tiny_model, EdgeOptions(protected_layers=(0,), max_new_tokens=4))
    return stage, stage.analyze(CONTEXT, QUESTION)


@pytest.mark.parametrize("mode", [m for m in CLOUD_MODES if m != Mode.SCOUT])
def test_kv_payload_sizes_from_the_formula_equal_the_encoded_bytes(edge, mode):
    stage, analysis = edge
    assert stage.payload_sizes(analysis)[mode] == len(stage.encode(analysis, mode).data)


def _varint_bytes(value: int) -> int:
    return max(1, -(-value.bit_length() // 7))


def _merged_spans(offsets, positions) -> list[tuple[int, int]]:
    spans: list[list[int]] = []
    for p in sorted(int(p) for p in positions):
        start, end = (int(x) for x in offsets[p])
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    return [(s, e) for s, e in spans]


def test_scout_payload_size_and_content_follow_the_format_from_the_analysis(edge):
    # The size is derived here from the documented layout (wire container around the scout
    # body: flags, sha256, varint counts, the smaller of delta-varint and bitmap position
    # codes, delta-coded spans, the question), not from the code that builds the payload.
    stage, analysis = edge
    layout = analysis.layout
    positions = sorted(int(p) for p in analysis.scout_positions)
    gaps = [p - q - 1 for p, q in zip(positions, [-1] + positions[:-1])]
    delta_code = 1 + _varint_bytes(len(positions)) + sum(map(_varint_bytes, gaps))
    code = min(delta_code, 1 + -(-layout.num_context // 8))
    spans = _merged_spans(layout.context_offsets, positions)
    ends = [0] + [e for _, e in spans[:-1]]
    span_bytes = sum(_varint_bytes(s - prev) + _varint_bytes(e - s)
                     for (s, e), prev in zip(spans, ends))
    question = len(QUESTION.encode())
    body = (1 + 32 + _varint_bytes(layout.num_context) + _varint_bytes(code) + code
            + _varint_bytes(len(spans)) + span_bytes + _varint_bytes(question) + question)
    container = (37 + len(stage.cloud_model_id.encode())  # fixed header + crc, model id
                 + 1 + len(b"scout") + 8)                 # one section: name length, name, size
    data = stage.encode(analysis, Mode.SCOUT).data
    assert stage.payload_sizes(analysis)[Mode.SCOUT] == len(data) == container + body

    decoded = wire.decode_payload(data)
    assert decoded.mode == Mode.SCOUT and decoded.model_id == stage.cloud_model_id
    carried = scout.ScoutPayload.from_bytes(decoded.sections["scout"])
    assert list(carried.positions) == positions and list(carried.char_spans) == spans
    assert carried.question == QUESTION and carried.document_zstd is None
    assert carried.doc_hash == scout.document_hash(CONTEXT)


@pytest.mark.parametrize("mode", CLOUD_MODES)
def test_every_mode_reaches_an_answer_through_the_cloud(edge, tiny_model, mode):
    stage, analysis = edge
    cloud = CloudStage({tiny_model.model_id: tiny_model}, max_new_tokens=4)
    cloud.documents.put(CONTEXT)
    answer = cloud.answer(stage.encode(analysis, mode).data)
    assert answer.mode == mode and answer.model_id == tiny_model.model_id
    assert answer.decode_s > 0


def test_scout_carries_the_document_only_when_the_cloud_lacks_it(edge, tiny_model):
    stage, analysis = edge
    without = stage.payload_sizes(analysis, cloud_has_document=True)[Mode.SCOUT]
    with_doc = stage.payload_sizes(analysis, cloud_has_document=False)[Mode.SCOUT]
    carried = len(scout.build_payload(CONTEXT, QUESTION, analysis.layout.context_offsets,
                                      analysis.scout_positions, include_document=True).document_zstd)
    assert without < 300
    assert carried < with_doc - without <= carried + 4  # the compressed text and its length
    cloud = CloudStage({tiny_model.model_id: tiny_model}, max_new_tokens=2)
    with pytest.raises(scout.DocumentMissing):
        cloud.answer(stage.encode(analysis, Mode.SCOUT, cloud_has_document=True).data)
    cloud.answer(stage.encode(analysis, Mode.SCOUT, cloud_has_document=False).data)
    cloud.answer(stage.encode(analysis, Mode.SCOUT, cloud_has_document=True).data)


def test_cloud_refuses_models_it_does_not_host_and_corrupt_payloads(edge, tiny_model):
    stage, analysis = edge
    data = stage.encode(analysis, Mode.INT8).data
    with pytest.raises(StageError, match="does not host"):
        CloudStage({"other": tiny_model}).answer(data)
    corrupt = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    with pytest.raises(wire.WireError, match="checksum"):
        CloudStage({tiny_model.model_id: tiny_model}).answer(corrupt)


def test_mixed_int4_without_protected_layers_is_a_clear_error(tiny_model):
    stage = EdgeStage(tiny_model)
    analysis = stage.analyze(CONTEXT, QUESTION)
    assert Mode.MIXED_INT4 not in stage.payload_sizes(analysis)
    with pytest.raises(StageError, match="bottleneck"):
        stage.encode(analysis, Mode.MIXED_INT4)


def test_pruned_kv_payload_shrinks_with_retention(tiny_model):
    full = EdgeStage(tiny_model)
    half = EdgeStage(tiny_model, EdgeOptions(kv_retention=0.25))
    size_full = full.payload_sizes(full.analyze(CONTEXT, QUESTION))[Mode.INT8]
    size_half = half.payload_sizes(half.analyze(CONTEXT, QUESTION))[Mode.INT8]
    assert size_half < 0.6 * size_full


@pytest.mark.model
@pytest.mark.parametrize("mode", [Mode.BF16, Mode.INT8])
def test_embedded_kv_modes_answer_like_the_edge_alone(embedded_model, mode):
    stage = EdgeStage(embedded_model)
    analysis = stage.analyze("The Eiffel Tower was completed in 1889 in Paris.",
                             "In which year was the Eiffel Tower completed?")
    cloud = CloudStage({embedded_model.model_id: embedded_model})
    remote = cloud.answer(stage.encode(analysis, mode).data)
    assert "1889" in remote.text
    assert remote.text == stage.answer_locally(analysis).text


def _shapes(tokens: int):
    from ray_scout.core.control.policy import paper_b_latency
    from ray_scout.core.stages.request import RequestShape

    latency = paper_b_latency()
    return {tokens: RequestShape(tokens, tokens // 2, {}, latency, dict(latency.edge_s))}


def _full_edge(tiny_model):
    from ray_scout.core.stages.full import FullEdge

    stage = EdgeStage(tiny_model, EdgeOptions(protected_layers=(0,), max_new_tokens=4))
    graded = []

    def grade(answer, gold):
        graded.append((answer, tuple(gold)))
        return 0.25, 0.0

    return FullEdge(stage, _shapes(100), [(CONTEXT, QUESTION, ("amberline",))], grade), graded


@pytest.mark.parametrize("mode", CLOUD_MODES)
def test_full_edge_offers_exact_sizes_and_returns_the_chosen_modes_payload(tiny_model, mode):
    from ray_scout.core.control.policy import Decision
    from ray_scout.core.stages.request import Arrival

    edge, _ = _full_edge(tiny_model)
    seen = {}

    def decide(sizes, latency):
        seen.update(sizes=dict(sizes), latency=latency)
        return Decision(mode, "test", {}, {}, (mode,), 1e6)

    outcome = edge.handle(Arrival(0, 0.0, 100), decide)
    assert outcome.decision.mode == mode and outcome.answer is None and not outcome.error
    assert len(outcome.body) == seen["sizes"][mode]
    assert wire.decode_payload(outcome.body).mode == mode
    # The prefill is already spent when the policy plans: no edge time left for cloud modes.
    assert all(seen["latency"].edge_s[m] == 0.0 for m in CLOUD_MODES)
    assert outcome.prefill_s > 0 and outcome.select_s >= 0 and outcome.encode_s > 0


def test_full_edge_answers_locally_or_stops_when_no_time_is_left(tiny_model):
    from ray_scout.core.control.policy import Decision
    from ray_scout.core.stages.request import Arrival

    edge, graded = _full_edge(tiny_model)
    local = edge.handle(Arrival(0, 0.0, 100),
                        lambda s, l: Decision(Mode.LOCAL, "test", {}, {}, (), 0.0))
    assert local.body is None and isinstance(local.answer, str)
    expired = edge.handle(Arrival(1, 0.0, 100), lambda s, l: None)
    assert expired.decision is None and expired.body is None and expired.answer is None
    score = edge.score(Arrival(0, 0.0, 100), Mode.LOCAL, "amberline")
    assert (score.quality, score.f1, score.em) == (0.25, 0.25, 0.0)
    assert graded == [("amberline", ("amberline",))]
