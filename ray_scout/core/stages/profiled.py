"""Profiled fidelity: what one request costs in compute and bytes, and stages that spend it.

What lives here: compute timings of a model (Paper B's published stage times, or a measured
``LatencyProfile``), the latency model the policy plans with, the exact payload sizes, the
body a profiled request carries (a descriptor padded to the exact payload size), and the two
stages: ``ProfiledEdge`` (one call per request: decide, sleep the edge's time, the body) and
``ProfiledService`` (the cloud: sleep a batch's modelled time). What it knows: numbers from
profiles and the wire format's closed-form sizes. What it leaves to others: sending the bytes
(the actors), real models (``full``). No torch at import: agents stay light.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Protocol

from ray_scout.core.control.policy import LatencyModel, QualityProfile, paper_b_latency
from ray_scout.core.modes import CLOUD_MODES, KV_MODES, Mode
from ray_scout.core.stages.request import Arrival, Decide, EdgeOutcome, RequestShape, Score

if TYPE_CHECKING:  # torch comes with these; agents import this module and must stay light
    from ray_scout.core.llm.latency import LatencyProfile
    from ray_scout.core.llm.models import KVFacts

# Question tokens a request adds on the cloud side (the KV modes prefill only the question).
QUESTION_TOKENS = 32
PROFILED_MAGIC = b"RSPF"
_HEAD = struct.Struct(">4sI")


class ComputeError(ValueError):
    """A timing source, payload size or profiled body that cannot be used."""


class Timing(Protocol):
    """Compute time of one model for the stages of a request, in seconds."""

    model_id: str

    def edge_s(self, mode: Mode, context_tokens: int, new_tokens: int) -> float: ...

    def cloud_s(self, mode: Mode, context_tokens: int, selected_tokens: int,
                new_tokens: int) -> float: ...


@dataclasses.dataclass(frozen=True)
class PaperBTiming:
    """Paper A/B's published stage times (Qwen2.5-7B edge, 14B cloud): constants per mode.

    The paper publishes no edge-only answer time, so ``local`` is unknown here and a
    ``local`` request raises; ``model_id`` is only a label.
    """

    model_id: str = "paper_b"

    def edge_s(self, mode: Mode, context_tokens: int, new_tokens: int) -> float:
        return _published(paper_b_latency().edge_s, mode, "edge")

    def cloud_s(self, mode: Mode, context_tokens: int, selected_tokens: int,
                new_tokens: int) -> float:
        return _published(paper_b_latency().cloud_s, mode, "cloud")


def _published(terms: Mapping[Mode, float], mode: Mode, where: str) -> float:
    if mode not in terms:
        raise ComputeError(f"Paper B publishes no {where} time for mode {mode.value}; use a "
                           "measured latency profile (bench/latency_profiles.py) instead")
    return terms[mode]


@dataclasses.dataclass(frozen=True)
class ProfileTiming:
    """Stage times from a measured latency profile (prefill and per-token decode vs tokens).

    Edge, cloud modes: the prefill of the context (selection and encoding are not in the
    profile, so they count as 0 s). Edge, ``local``: prefill + decode of the answer. Cloud,
    KV modes: prefill of the question on the rebuilt cache + decode; cloud, scout: re-prefill
    of the whole prompt (``scout_answer`` prefills context and question, then keeps only the
    selected positions) + decode over the selected positions and the question.
    """

    profile: LatencyProfile

    @property
    def model_id(self) -> str:
        return self.profile.model_id

    def edge_s(self, mode: Mode, context_tokens: int, new_tokens: int) -> float:
        prefill = self.profile.prefill_s(context_tokens + QUESTION_TOKENS)
        if mode == Mode.LOCAL:
            return prefill + self.profile.decode_s(context_tokens, new_tokens)
        return prefill

    def cloud_s(self, mode: Mode, context_tokens: int, selected_tokens: int,
                new_tokens: int) -> float:
        prefill_tokens, decode_s = self.cloud_parts(mode, context_tokens, selected_tokens,
                                                    new_tokens)
        return self.profile.prefill_s(prefill_tokens) + decode_s

    def cloud_parts(self, mode: Mode, context_tokens: int, selected_tokens: int,
                    new_tokens: int) -> tuple[int, float]:
        """The cloud's prefill tokens and its decode time, which a batch combines."""
        if mode == Mode.SCOUT:
            return (context_tokens + QUESTION_TOKENS,
                    self.profile.decode_s(selected_tokens + QUESTION_TOKENS, new_tokens))
        return QUESTION_TOKENS, self.profile.decode_s(context_tokens, new_tokens)


def load_timing(source: str, base: Path | None = None) -> Timing:
    """``paper_b`` or the path of a latency profile (relative to ``base``)."""
    if source == "paper_b":
        return PaperBTiming()
    path = Path(source)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.exists():
        raise ComputeError(f"latency profile {path} not found; measure it with "
                           "`python3 bench/latency_profiles.py --source <model> --lengths ...` "
                           "or use `paper_b`")
    from ray_scout.core.llm.latency import LatencyProfile

    return ProfileTiming(LatencyProfile.load(path))


def latency_model(edge: Timing, cloud: Timing, context_tokens: int, selected_tokens: int,
                  new_tokens: int, rtt_s: float, cloud_queue_s: float = 0.0) -> LatencyModel:
    """The latency model a policy plans one agent's requests with."""
    edge_s, cloud_s = {}, {}
    for mode in CLOUD_MODES:
        edge_s[mode] = edge.edge_s(mode, context_tokens, new_tokens)
        cloud_s[mode] = cloud.cloud_s(mode, context_tokens, selected_tokens, new_tokens)
    try:
        edge_s[Mode.LOCAL] = edge.edge_s(Mode.LOCAL, context_tokens, new_tokens)
    except ComputeError:
        pass  # the timing source cannot say how long the edge takes alone: local stays unplanned
    return LatencyModel(edge_s, cloud_s, rtt_s=rtt_s, cloud_queue_s=cloud_queue_s)


def selected_tokens(context_tokens: int, retention: float) -> int:
    if not 0 < retention <= 1:
        raise ComputeError(f"scout retention must lie in (0, 1], not {retention}")
    return max(1, math.ceil(context_tokens * retention))


def scout_size_bound_bytes(context_tokens: int) -> int:
    """Upper bound of a scout payload without the document: the bitmap position code.

    A scout body (``core.llm.scout``) is a flag, a 32-byte document hash, varints, the position
    code (the smaller of delta-varints and a bitmap of ceil(n/8) + 1 bytes), character spans
    and the question. Its exact size depends on the text, which profiled fidelity does not
    have; the bitmap plus 64 bytes of question and 64 of envelope stands in.
    """
    return 1 + 32 + 6 + 1 + (context_tokens + 7) // 8 + 64 + 64


def profiled_payload_bytes(facts: KVFacts, context_tokens: int, *, group_size: int = 32,
                           protected_layers: tuple[int, ...] = (0,)) -> dict[Mode, int]:
    """Exact wire bytes of every KV mode (the codec's closed form) and scout's bound.

    ``context_tokens`` counts the whole prompt the edge prefilled (context and question).
    """
    if context_tokens < 2:
        raise ComputeError(f"a prompt of {context_tokens} tokens leaves no KV besides its tail")
    from ray_scout.core.llm.wire import payload_size_bytes

    sizes = {}
    for mode in KV_MODES:
        protected = protected_layers if mode == Mode.MIXED_INT4 else ()
        # The KV holds every prompt token but the last, which travels as the tail
        # (core.llm.generation continues from it), so the cloud's first logits see the KV.
        sizes[mode] = payload_size_bytes(mode, facts, context_tokens - 1, group_size=group_size,
                                         protected_layers=protected, tail_tokens=1)
    sizes[Mode.SCOUT] = scout_size_bound_bytes(context_tokens)
    return sizes


@dataclasses.dataclass(frozen=True)
class ProfiledRequest:
    """What the cloud needs to time a profiled request; padded to the payload's exact size."""

    mode: Mode
    cloud_model: str
    context_tokens: int
    selected_tokens: int
    new_tokens: int

    def to_body(self, size_bytes: int) -> bytes:
        doc = json.dumps({"mode": self.mode.value, "cloud_model": self.cloud_model,
                          "context_tokens": self.context_tokens,
                          "selected_tokens": self.selected_tokens,
                          "new_tokens": self.new_tokens}).encode()
        head = _HEAD.pack(PROFILED_MAGIC, len(doc)) + doc
        if size_bytes < len(head):
            raise ComputeError(f"a profiled body needs at least {len(head)} bytes for its "
                               f"descriptor; the payload is {size_bytes}")
        return head + bytes(size_bytes - len(head))

    @classmethod
    def from_body(cls, body: bytes | memoryview) -> "ProfiledRequest":
        if len(body) < _HEAD.size:
            raise ComputeError(f"profiled body of {len(body)} bytes is shorter than its header")
        magic, length = _HEAD.unpack_from(body)
        if magic != PROFILED_MAGIC or _HEAD.size + length > len(body):
            raise ComputeError("not a profiled request body (bad magic or descriptor length); "
                               "is the agent running another fidelity than the cloud?")
        try:
            doc = json.loads(bytes(body[_HEAD.size:_HEAD.size + length]))
            return cls(Mode.parse(doc["mode"]), doc["cloud_model"], int(doc["context_tokens"]),
                       int(doc["selected_tokens"]), int(doc["new_tokens"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ComputeError(f"profiled descriptor is malformed ({exc})") from None


class ProfiledCloud:
    """The cloud's compute in profiled fidelity: the service time of its model's timing."""

    def __init__(self, timings: Mapping[str, Timing]):
        if not timings:
            raise ComputeError("a profiled cloud needs at least one model timing")
        self.timings = dict(timings)

    def service_s(self, request: ProfiledRequest) -> float:
        try:
            timing = self.timings[request.cloud_model]
        except KeyError:
            raise ComputeError(f"cloud hosts no model {request.cloud_model!r}; it hosts "
                               f"{sorted(self.timings)}") from None
        return timing.cloud_s(request.mode, request.context_tokens, request.selected_tokens,
                              request.new_tokens)

    def batch_service_s(self, requests: list[ProfiledRequest]) -> float:
        """A modelled (not measured) service time of requests computed as one batch.

        Per cloud model, with a measured profile: one prefill of the members' summed prefill
        tokens (a padded batch does about the work of its tokens) plus the longest member's
        decode (a decode step of a few rows costs about one row's step while reading the
        weights dominates, as on a GPU). Models run one after another. A timing without the
        split (``paper_b``'s constants) gains nothing from batching: its members' times add.
        """
        by_model: dict[str, list[ProfiledRequest]] = {}
        for request in requests:
            self.service_s(request)  # raises for a model this cloud does not host
            by_model.setdefault(request.cloud_model, []).append(request)
        total = 0.0
        for model, members in by_model.items():
            timing = self.timings[model]
            if not isinstance(timing, ProfileTiming):
                total += sum(self.service_s(r) for r in members)
                continue
            parts = [timing.cloud_parts(r.mode, r.context_tokens, r.selected_tokens,
                                        r.new_tokens) for r in members]
            total += (timing.profile.prefill_s(sum(tokens for tokens, _ in parts))
                      + max(decode for _, decode in parts))
        return total


# Bodies up to this size are kept (at most 16: a cell's shapes times the modes its policies
# pick are a handful), so an edge host holds at most 1 GiB of them.
_KEPT_BODY_BYTES = 64 << 20


def _padded(request: ProfiledRequest, size_bytes: int) -> bytes:
    """A profiled body, made once per process for each request shape and mode: building
    tens of MB holds the GIL for milliseconds, which every agent of an edge host would wait."""
    if size_bytes > _KEPT_BODY_BYTES:
        return request.to_body(size_bytes)
    return _kept_body(request, size_bytes)


@functools.lru_cache(maxsize=16)
def _kept_body(request: ProfiledRequest, size_bytes: int) -> bytes:
    return request.to_body(size_bytes)


class ProfiledEdge:
    """The edge stage of profiled fidelity: the profile's edge time is slept, not computed.

    The body it returns is a ``ProfiledRequest`` padded to the mode's exact payload size, so
    the link carries the bytes full fidelity would; quality is the profile's for the mode.
    """

    def __init__(self, shapes: Mapping[int, RequestShape], cloud_model: str, new_tokens: int,
                 quality: QualityProfile):
        self.shapes = shapes
        self.cloud_model = cloud_model
        self.new_tokens = new_tokens
        self.quality = quality

    def handle(self, arrival: Arrival, decide: Decide) -> EdgeOutcome:
        shape = self.shapes[arrival.context_tokens]
        decision = decide(shape.payload_bytes, shape.latency)
        if decision is None:
            return EdgeOutcome(None)
        mode = decision.mode
        if mode not in shape.edge_s:  # Paper B publishes no edge-only time
            return EdgeOutcome(decision, error=f"unanswered: no edge time for {mode.value} "
                                               "in this fidelity")
        time.sleep(shape.edge_s[mode])
        if mode == Mode.LOCAL:
            return EdgeOutcome(decision, answer="")
        body = ProfiledRequest(mode, self.cloud_model, shape.context_tokens,
                               shape.selected_tokens, self.new_tokens)
        return EdgeOutcome(decision, body=_padded(body, shape.payload_bytes[mode]))

    def score(self, arrival: Arrival, mode: Mode, answer: str) -> Score:
        quality = self.quality.quality(mode)
        return Score(math.nan if quality is None else quality)


class ProfiledService:
    """The cloud of profiled fidelity: a batch of bodies sleeps its modelled service time.

    Batches hold one cloud model each (``batch_key``): ``batch_service_s`` of a batch that
    mixed models would run them one after another, which no cloud serving a cell would do.

    Slot ``i`` of a call's answer holds body ``i``'s answer, or its error for a body that is
    not a profiled request.
    """

    def __init__(self, timings: Mapping[str, Timing]):
        self.cloud = ProfiledCloud(timings)

    @staticmethod
    def batch_key(body: bytes) -> str | None:
        """What the cloud batches by: the request's model (a GPU runs one model's batch at a
        time). None for a body that is no profiled request (its batch answers its error)."""
        try:
            return ProfiledRequest.from_body(body).cloud_model
        except ComputeError:
            return None

    def __call__(self, bodies: list[bytes]) -> list:
        requests: list[ProfiledRequest | Exception] = []
        for body in bodies:
            try:
                requests.append(ProfiledRequest.from_body(body))
            except Exception as exc:  # noqa: BLE001 -- handed back in the request's slot
                requests.append(exc)
        valid = [r for r in requests if not isinstance(r, Exception)]
        seconds = self.cloud.batch_service_s(valid) if valid else 0.0
        time.sleep(seconds)
        return [r if isinstance(r, Exception) else
                {"text": "", "mode": r.mode.value, "model_id": r.cloud_model,
                 "prefill_s": 0.0, "decode_s": seconds} for r in requests]
