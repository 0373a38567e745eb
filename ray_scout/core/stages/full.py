"""Full fidelity: one request's compute on real models, at the edge and in the cloud.

What lives here: the edge side (prefill, score, select, and the payload bytes of each
transport mode, or a local answer) and the cloud side (validate a payload, rebuild the cache
or re-prefill for scout, decode). ``EdgeStage`` and ``CloudStage`` are the building blocks the
quality harness drives mode by mode; ``FullEdge`` (one call per request) and ``FullService``
(one call per batch of payloads) are what the actors run, so what is measured offline is what
runs on the testbed. What it leaves to others: when a mode is chosen (``control``), how bytes
travel (``transport``), and where it runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import time
from typing import Callable

import torch

from ray_scout.core.llm import generation, scout, selection, wire
from ray_scout.core.llm.generation import Answer, Prefill
from ray_scout.core.llm.kv import KVSnapshot
from ray_scout.core.llm.kvcodec import codec_for
from ray_scout.core.llm.models import LoadedModel
from ray_scout.core.llm.prompt import PromptLayout, build_prompt
from ray_scout.core.modes import CLOUD_MODES, KV_MODES, Mode
from ray_scout.core.stages.request import Arrival, Decide, EdgeOutcome, RequestShape, Score


class StageError(ValueError):
    """A request a full-fidelity stage cannot serve; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class EdgeOptions:
    """How the edge selects and encodes.

    ``kv_retention`` below 1 prunes the context of KV payloads to the top-scored share
    (Paper A); ``scout_retention`` is the share of context positions a scout payload names.
    ``protected_layers`` are the layers mixed INT4 keeps in 16 bits (the bottleneck layers).
    """

    scorer: str = "q2c"
    scout_retention: float = 0.5
    kv_retention: float = 1.0
    group_size: int = 32
    protected_layers: tuple[int, ...] = ()
    compress: bool = False
    max_new_tokens: int = generation.DEFAULT_MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        if self.scorer not in selection.SCORERS:
            raise StageError(f"unknown scorer {self.scorer!r}; known: "
                             f"{', '.join(sorted(selection.SCORERS))}")
        for name in ("scout_retention", "kv_retention"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise StageError(f"{name} must be in (0, 1], got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class EdgeAnalysis:
    """What the edge knows about one request after prefill and scoring."""

    prefill: Prefill
    scores: torch.Tensor
    scout_positions: torch.Tensor  # context positions a scout payload names
    kv_positions: torch.Tensor  # context positions KV payloads keep
    timings: dict[str, float]

    @property
    def layout(self) -> PromptLayout:
        return self.prefill.layout


@dataclasses.dataclass(frozen=True)
class EncodedRequest:
    """The payload of one mode, ready for the wire."""

    mode: Mode
    data: bytes
    encode_s: float


@dataclasses.dataclass(frozen=True)
class CloudAnswer:
    """The cloud's answer and what it cost."""

    text: str
    mode: Mode
    model_id: str
    decode_payload_s: float  # validate, parse and dequantize
    prefill_s: float  # scout's re-prefill; 0 for KV modes
    decode_s: float  # tail step and greedy decoding


class EdgeStage:
    """The edge model's side of a request."""

    def __init__(self, lm: LoadedModel, options: EdgeOptions = EdgeOptions(),
                 cloud_model_id: str | None = None):
        self.lm = lm
        self.options = options
        # Scout names the cloud model it asks for; KV modes name the edge model, whose KV it is.
        self.cloud_model_id = cloud_model_id or lm.model_id

    def analyze(self, context: str, question: str) -> EdgeAnalysis:
        layout = build_prompt(self.lm.tokenizer, context, question)
        pre = generation.prefill(self.lm, layout,
                                 capture=selection.CAPTURE.get(self.options.scorer, "last"))
        start = time.perf_counter()
        scores = selection.score(self.options.scorer, pre)
        scout_positions = selection.select_positions(scores, self.options.scout_retention)
        kv_positions = (selection.select_positions(scores, self.options.kv_retention)
                        if self.options.kv_retention < 1.0 else torch.arange(layout.num_context))
        select_s = time.perf_counter() - start
        return EdgeAnalysis(pre, scores, scout_positions, kv_positions,
                            {"prefill_s": pre.prefill_s, "select_s": select_s})

    def _kv_tokens(self, analysis: EdgeAnalysis) -> int:
        kept = generation.kept_prompt_positions(analysis.layout, analysis.kv_positions)
        return int(kept.numel()) - 1  # the last prompt token travels as the tail

    def _scout_payload(self, analysis: EdgeAnalysis, cloud_has_document: bool) -> bytes:
        layout = analysis.layout
        body = scout.build_payload(layout.context, layout.question, layout.context_offsets,
                                   analysis.scout_positions,
                                   include_document=not cloud_has_document).to_bytes()
        return wire.encode_payload(Mode.SCOUT, self.cloud_model_id, {"scout": body})

    def payload_sizes(self, analysis: EdgeAnalysis, *,
                      cloud_has_document: bool = True) -> dict[Mode, int]:
        """Exact wire bytes of every cloud mode (KV from the formula, scout built)."""
        options = self.options
        tokens = self._kv_tokens(analysis)
        sizes = {
            mode: wire.payload_size_bytes(mode, self.lm.facts, tokens,
                                          group_size=options.group_size,
                                          protected_layers=self._protected(mode),
                                          tail_tokens=1)
            for mode in KV_MODES if mode != Mode.MIXED_INT4 or options.protected_layers
        }
        sizes[Mode.SCOUT] = len(self._scout_payload(analysis, cloud_has_document))
        return sizes

    def _protected(self, mode: Mode) -> tuple[int, ...]:
        if mode != Mode.MIXED_INT4:
            return ()
        if not self.options.protected_layers:
            raise StageError("mixed_int4 needs protected_layers (the bottleneck layers): "
                             "run the bottleneck diagnosis and pass its top layers")
        return self.options.protected_layers

    def encode(self, analysis: EdgeAnalysis, mode: Mode, *,
               cloud_has_document: bool = True) -> EncodedRequest:
        """The wire bytes of ``mode`` for this request."""
        mode = Mode(mode)
        start = time.perf_counter()
        if mode == Mode.SCOUT:
            data = self._scout_payload(analysis, cloud_has_document)
        elif mode in KV_MODES:
            snapshot = generation.pruned_snapshot(analysis.prefill, analysis.kv_positions)
            codec = codec_for(mode, group_size=self.options.group_size,
                              protected_layers=self._protected(mode))
            tail = analysis.layout.input_ids[-1:].tolist()
            data = wire.encode_kv(codec.encode(snapshot), self.lm.model_id, tail_ids=tail,
                                  compress=self.options.compress)
        else:
            raise StageError(f"mode {mode.value} sends nothing; use answer_locally")
        return EncodedRequest(mode, data, time.perf_counter() - start)

    def answer_locally(self, analysis: EdgeAnalysis) -> Answer:
        """The edge model answers alone, from its full prefill."""
        pre = analysis.prefill
        answer = generation.greedy_answer(self.lm, pre.snapshot, pre.logits,
                                          max_new_tokens=self.options.max_new_tokens)
        return dataclasses.replace(answer, prefill_s=pre.prefill_s)


class CloudStage:
    """The cloud's side: any hosted model, any payload mode."""

    def __init__(self, models: dict[str, LoadedModel], *,
                 documents: scout.DocumentStore | None = None,
                 max_payload_bytes: int = wire.DEFAULT_MAX_BYTES,
                 max_new_tokens: int = generation.DEFAULT_MAX_NEW_TOKENS):
        if not models:
            raise StageError("the cloud needs at least one model")
        self.models = models
        self.documents = documents if documents is not None else scout.DocumentStore()
        self.max_payload_bytes = max_payload_bytes
        self.max_new_tokens = max_new_tokens

    def _model(self, model_id: str) -> LoadedModel:
        try:
            return self.models[model_id]
        except KeyError:
            raise StageError(f"this cloud does not host model {model_id!r}; it hosts "
                             f"{', '.join(sorted(self.models))}") from None

    def _validate(self, data: bytes) -> tuple[wire.Payload, LoadedModel]:
        payload = wire.decode_payload(data, max_bytes=self.max_payload_bytes)
        if payload.mode not in CLOUD_MODES:
            raise StageError(f"mode {payload.mode.value} is not served by the cloud")
        return payload, self._model(payload.model_id)

    def _kv_request(self, lm: LoadedModel, payload: wire.Payload,
                    data: bytes) -> tuple[KVSnapshot, list[int]]:
        # On a GPU the KV lands in pinned memory: its upload is then one DMA (issue 15).
        request = wire.decode_kv(data, facts=lm.facts, max_bytes=self.max_payload_bytes,
                                 pin_memory=lm.device.type == "cuda")
        codec = codec_for(payload.mode, group_size=payload.layout.group_size,
                          protected_layers=payload.layout.protected_layers)
        snapshot = codec.decode(request.encoded, dtype=lm.model.dtype, device=lm.device)
        return snapshot, list(request.tail_ids)

    def _scout_request(self, payload: wire.Payload) -> tuple[scout.ScoutPayload, str]:
        if tuple(payload.sections) != ("scout",):
            raise StageError(f"scout payload sections {tuple(payload.sections)}, "
                             "expected ('scout',)")
        body = scout.ScoutPayload.from_bytes(payload.sections["scout"])
        if body.document_zstd is not None:
            context = body.document()
            self.documents.put(context)
        else:
            context = self.documents.get(body.doc_hash)  # DocumentMissing names the hash
        return body, context

    def answer(self, data: bytes) -> CloudAnswer:
        """Validate ``data`` (raises ``wire.WireError`` or ``StageError``) and answer it."""
        start = time.perf_counter()
        payload, lm = self._validate(data)
        if payload.mode == Mode.SCOUT:
            body, context = self._scout_request(payload)
            decoded_s = time.perf_counter() - start
            answer = scout.scout_answer(lm, context, body.question, body,
                                        max_new_tokens=self.max_new_tokens)
            return CloudAnswer(answer.text, Mode.SCOUT, lm.model_id, decoded_s,
                               answer.prefill_s or 0.0, answer.decode_s)
        snapshot, tail = self._kv_request(lm, payload, data)
        decoded_s = time.perf_counter() - start
        answer = generation.continue_after(lm, snapshot, tail,
                                           max_new_tokens=self.max_new_tokens)
        return CloudAnswer(answer.text, payload.mode, lm.model_id, decoded_s, 0.0,
                           answer.decode_s)

    def answer_batch(self, payloads: Sequence[bytes]) -> list[CloudAnswer | Exception]:
        """Answer several payloads with batched compute; slot ``i`` answers ``payloads[i]``.

        A payload that fails validation gets its exception in its own slot and leaves the
        others alone. Scout re-prefills of one model run as one padded forward pass; then
        every request of one model (scout and KV modes alike, grouped by tail length) decodes
        as one batch. Answers equal ``answer``'s token for token up to float rounding.
        ``prefill_s`` and ``decode_s`` are the batch's wall times, shared by its members;
        ``decode_payload_s`` is the request's own.
        """
        results: list[CloudAnswer | Exception | None] = [None] * len(payloads)
        scouts: dict[str, list[tuple[int, PromptLayout, torch.Tensor, float]]] = {}
        decodes: dict[tuple[str, int], list[_Decode]] = {}
        for index, data in enumerate(payloads):
            start = time.perf_counter()
            try:
                payload, lm = self._validate(data)
                if payload.mode == Mode.SCOUT:
                    body, context = self._scout_request(payload)
                    layout = build_prompt(lm.tokenizer, context, body.question)
                    positions = scout.positions_in_spans(layout.context_offsets,
                                                           body.char_spans)
                    scouts.setdefault(lm.model_id, []).append(
                        (index, layout, positions, time.perf_counter() - start))
                else:
                    snapshot, tail = self._kv_request(lm, payload, data)
                    decodes.setdefault((lm.model_id, len(tail)), []).append(
                        _Decode(index, payload.mode, snapshot, tail,
                                time.perf_counter() - start, 0.0))
            except Exception as exc:  # noqa: BLE001 -- handed back in the request's slot
                results[index] = exc
        for model_id, group in scouts.items():
            lm = self.models[model_id]
            try:
                snapshots, prefill_s = generation.prefill_batch(lm, [g[1] for g in group])
            except Exception as exc:  # noqa: BLE001 -- the pass failed for all its members
                for index, *_ in group:
                    results[index] = exc
                continue
            for (index, layout, positions, decoded_s), full in zip(group, snapshots):
                kept = generation.kept_prompt_positions(layout, positions)
                decodes.setdefault((model_id, 1), []).append(
                    _Decode(index, Mode.SCOUT, full.select(kept[kept != layout.num_tokens - 1]),
                            layout.input_ids[-1:].tolist(), decoded_s, prefill_s))
        for (model_id, _), group in decodes.items():
            lm = self.models[model_id]
            try:
                answers, _ = generation.continue_after_batch(
                    lm, [d.snapshot for d in group], [d.tail for d in group],
                    max_new_tokens=self.max_new_tokens)
            except Exception as exc:  # noqa: BLE001 -- the pass failed for all its members
                for d in group:
                    results[d.index] = exc
                continue
            for d, answer in zip(group, answers):
                results[d.index] = CloudAnswer(answer.text, d.mode, lm.model_id, d.decoded_s,
                                               d.prefill_s, answer.decode_s)
        return results  # type: ignore[return-value]  # every slot was filled above


# (answer, gold answers) -> (F1, exact match): the evaluation room's metrics, handed in.
Grade = Callable[[str, Sequence[str]], tuple[float, float]]


class FullEdge:
    """The edge stage of full fidelity: one request in, a payload or a local answer out.

    ``samples`` holds one (context, question, gold answers) per sample index; ``shapes`` the
    runner's latency model per context length; ``grade`` scores an answer against the gold.
    """

    def __init__(self, stage: EdgeStage, shapes: Mapping[int, RequestShape],
                 samples: Sequence[tuple[str, str, Sequence[str]]], grade: Grade):
        self.stage = stage
        self.shapes = shapes
        self.samples = samples
        self.grade = grade

    def handle(self, arrival: Arrival, decide: Decide) -> EdgeOutcome:
        """Prefill and score first (ARCHITECTURE steps 2-3), then decide on the exact sizes."""
        context, question, _ = self.samples[arrival.sample_index]
        analysis = self.stage.analyze(context, question)
        timings = dict(prefill_s=analysis.timings["prefill_s"],
                       select_s=analysis.timings["select_s"])
        # The prefill is spent: the plan keeps only the edge time still ahead of a cloud mode.
        latency = self.shapes[arrival.context_tokens].latency
        latency = dataclasses.replace(latency, edge_s={
            m: (0.0 if m != Mode.LOCAL else s) for m, s in latency.edge_s.items()})
        decision = decide(self.stage.payload_sizes(analysis), latency)
        if decision is None:
            return EdgeOutcome(None, **timings)
        if decision.mode == Mode.LOCAL:
            return EdgeOutcome(decision, answer=self.stage.answer_locally(analysis).text,
                               **timings)
        encoded = self.stage.encode(analysis, decision.mode)
        return EdgeOutcome(decision, body=encoded.data, encode_s=encoded.encode_s, **timings)

    def score(self, arrival: Arrival, mode: Mode, answer: str) -> Score:
        f1, em = self.grade(answer, self.samples[arrival.sample_index][2])
        return Score(f1, f1, em)


class FullService:
    """The cloud of full fidelity: ``CloudStage`` over real models, loaded by ``prepare``.

    ``sources`` maps a model id as payloads name it to a ``load_model`` source;
    ``documents`` are the contexts the cloud already holds (scout payloads name them by hash).
    A call answers a batch of payload bodies: slot ``i`` holds body ``i``'s answer or error.
    """

    def __init__(self, sources: dict[str, str], documents: list[str], max_new_tokens: int):
        self.sources = dict(sources)
        self.documents = list(documents)
        self.max_new_tokens = max_new_tokens
        self.stage: CloudStage | None = None

    def prepare(self) -> None:
        from ray_scout.core.llm.models import load_model

        store = scout.DocumentStore()
        for text in self.documents:
            store.put(text)
        models = {}
        for model_id, source in self.sources.items():
            lm = load_model(source)
            models[model_id] = models[lm.model_id] = lm
        self.stage = CloudStage(models, documents=store, max_new_tokens=self.max_new_tokens)

    def __call__(self, bodies: list[bytes]) -> list:
        if self.stage is None:
            raise StageError("FullService.prepare() loads the models before the first call")
        if len(bodies) == 1:  # one request at a time: the unbatched path
            try:
                answers = [self.stage.answer(bodies[0])]
            except Exception as exc:  # noqa: BLE001 -- handed back in the request's slot
                answers = [exc]
        else:
            answers = self.stage.answer_batch(bodies)
        return [a if isinstance(a, Exception) else
                {"text": a.text, "mode": a.mode.value, "model_id": a.model_id,
                 "prefill_s": a.prefill_s, "decode_s": a.decode_s} for a in answers]


@dataclasses.dataclass(frozen=True)
class _Decode:
    """One request waiting for the batched decode."""

    index: int
    mode: Mode
    snapshot: KVSnapshot
    tail: list[int]
    decoded_s: float
    prefill_s: float
