"""Scout: send which context positions matter instead of their KV, and answer from them.

What lives here: the compact position code (delta + varint or bitmap, whichever is
smaller), the content-addressed ``DocumentStore``, the ``ScoutPayload`` body (document
identity, the document itself zstd-compressed when the cloud lacks it, the question, the
selected edge-tokenizer positions and the character spans they cover), the mapping of
positions between tokenizers through character offsets, and the cloud end of scout mode:
prefill the whole prompt and decode with only the selected context positions plus every
non-context token in KV (``scout_answer``). What it leaves to others: picking the positions
on the edge (``stages.full.EdgeStage``), the versioned container around the body (``wire``),
transport, and the choice of retention (the policy).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np
import torch
import zstandard

from ray_scout.core.llm.cursor import ByteCursor, decompress_zstd, put_varint
from ray_scout.core.llm.generation import DEFAULT_MAX_NEW_TOKENS, Answer, answer_pruned, prefill
from ray_scout.core.llm.models import LoadedModel
from ray_scout.core.llm.prompt import build_prompt

DELTA_VARINT = 0
BITMAP = 1
HAS_DOCUMENT = 0x01
HASH_BYTES = 32
ZSTD_LEVEL = 19
# A bound on what one payload may make the cloud decompress: a document of a few thousand
# tokens is tens of KB; anything near this limit is malformed or hostile.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
# A bound on the context a position code may declare: 8x the longest context of the models
# the project runs (128 K tokens). It bounds the decoder's work per payload (a bitmap of at
# most 128 KiB, at most this many varints) whatever the bytes say.
MAX_CONTEXT_TOKENS = 1 << 20


class ScoutFormatError(ValueError):
    """Bytes that are not a valid position code or scout payload body."""


class DocumentMissing(KeyError):
    """The cloud does not hold the document a payload refers to."""


def _check_positions(positions: Sequence[int], num_context: int) -> list[int]:
    positions = [int(p) for p in positions]
    if num_context < 0:
        raise ValueError(f"num_context must be non-negative, got {num_context}")
    for a, b in zip(positions, positions[1:]):
        if b <= a:
            raise ValueError(f"positions must be strictly increasing, got {a} then {b}")
    if positions and (positions[0] < 0 or positions[-1] >= num_context):
        raise IndexError(f"positions must lie in [0, {num_context}), got {positions[0]}..{positions[-1]}")
    return positions


def encode_indices(positions: Sequence[int] | torch.Tensor, num_context: int) -> bytes:
    """One flag byte, then delta-varints (count, first, gaps-1) or a bitmap; the smaller."""
    if isinstance(positions, torch.Tensor):
        positions = positions.tolist()
    positions = _check_positions(positions, num_context)
    delta = bytearray([DELTA_VARINT])
    put_varint(delta, len(positions))
    previous = -1
    for p in positions:
        put_varint(delta, p - previous - 1)
        previous = p
    bitmap = bytearray((num_context + 7) // 8)
    for p in positions:
        bitmap[p >> 3] |= 1 << (p & 7)
    bitmap = bytes([BITMAP]) + bitmap
    return bytes(delta) if len(delta) <= len(bitmap) else bitmap


def _decode_indices(reader: ByteCursor, num_context: int) -> np.ndarray:
    if num_context > MAX_CONTEXT_TOKENS:
        raise ScoutFormatError(f"num_context: {num_context} tokens, over the limit of "
                               f"{MAX_CONTEXT_TOKENS} (scout.MAX_CONTEXT_TOKENS)")
    flag = reader.take(1)[0]
    if flag == DELTA_VARINT:
        count = reader.varint()
        if count > num_context:
            raise ScoutFormatError(f"{count} positions for a context of {num_context} tokens")
        if count > reader.remaining:  # every position takes at least one byte
            raise ScoutFormatError(f"position code truncated: {count} positions declared, only "
                                   f"{reader.remaining} bytes left")
        positions, previous = [], -1
        for _ in range(count):
            previous += reader.varint() + 1
            if previous >= num_context:
                raise ScoutFormatError(f"position {previous} outside the context [0, {num_context})")
            positions.append(previous)
        return np.array(positions, dtype=np.int64)
    if flag == BITMAP:
        bitmap = reader.take((num_context + 7) // 8, "bitmap")
        bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
        positions = np.flatnonzero(bits)
        if positions.size and positions[-1] >= num_context:
            raise ScoutFormatError(f"bitmap sets bit {positions[-1]} past the context of {num_context} tokens")
        return positions
    raise ScoutFormatError(f"unknown position-code flag {flag}; expected {DELTA_VARINT} or {BITMAP}")


def decode_indices(data: bytes, num_context: int) -> torch.Tensor:
    """Inverse of ``encode_indices``; raises ``ScoutFormatError`` on malformed input."""
    reader = ByteCursor(data, "position code", ScoutFormatError)
    positions = _decode_indices(reader, num_context)
    reader.finish()
    return torch.from_numpy(positions.astype(np.int64, copy=False))


def document_hash(text: str) -> bytes:
    """The document identity both sides agree on: sha256 of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).digest()


class DocumentStore:
    """Documents by content hash; the cloud's copy decides whether a payload carries text."""

    def __init__(self) -> None:
        self._documents: dict[bytes, str] = {}

    def put(self, text: str) -> bytes:
        digest = document_hash(text)
        self._documents[digest] = text
        return digest

    def get(self, digest: bytes) -> str:
        try:
            return self._documents[digest]
        except KeyError:
            raise DocumentMissing(
                f"document {digest.hex()[:16]}… is not in the store; "
                "resend the scout payload with the document included"
            ) from None

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._documents

    def __len__(self) -> int:
        return len(self._documents)


def char_spans(offsets: torch.Tensor, positions: Sequence[int] | torch.Tensor) -> tuple[tuple[int, int], ...]:
    """Character spans covered by the tokens at ``positions``, touching spans merged."""
    spans: list[list[int]] = []
    for p in torch.as_tensor(positions, dtype=torch.long).tolist():
        start, end = (int(x) for x in offsets[p])
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    return tuple((s, e) for s, e in spans)


def positions_in_spans(offsets: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Token positions whose character range overlaps any span (spans sorted, disjoint)."""
    if not spans:
        return torch.zeros(0, dtype=torch.long)
    starts = torch.tensor([s for s, _ in spans])
    ends = torch.tensor([e for _, e in spans])
    if bool((ends < starts).any()) or bool((starts[1:] < ends[:-1]).any()):
        raise ValueError("character spans must be sorted, non-overlapping and have end >= start")
    token_start, token_end = offsets[:, 0].contiguous(), offsets[:, 1]
    # A zero-width token (part of a multi-token character) counts as one character wide.
    token_end = torch.maximum(token_end, token_start + 1)
    first = torch.searchsorted(ends, token_start, right=True)  # first span ending after the token starts
    candidate = first.clamp(max=len(spans) - 1)
    hit = (first < len(spans)) & (starts[candidate] < token_end)
    return torch.nonzero(hit).view(-1)


def map_positions(edge_offsets: torch.Tensor, cloud_offsets: torch.Tensor,
                  positions: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Edge-tokenizer positions to cloud-tokenizer positions through character offsets."""
    return positions_in_spans(cloud_offsets, char_spans(edge_offsets, positions))


def char_mask(offsets: torch.Tensor, positions: Sequence[int] | torch.Tensor,
              length: int) -> torch.Tensor:
    """Boolean ``[length]``: the characters the tokens at ``positions`` cover."""
    mask = torch.zeros(length, dtype=torch.bool)
    for start, end in char_spans(offsets, positions):
        mask[start:end] = True
    return mask


@dataclasses.dataclass(frozen=True)
class MappingCoverage:
    """How an edge selection lands on the cloud's tokens (shares of characters).

    ``coverage``: of the characters the edge kept, the share inside kept cloud tokens (1
    unless a kept character belongs to no cloud token). ``precision``: of the characters
    the kept cloud tokens cover, the share the edge kept (below 1 where a cloud token
    straddles a selection boundary). ``cloud_retention``: kept cloud tokens over all.
    """

    coverage: float
    precision: float
    cloud_retention: float
    cloud_positions: torch.Tensor


def mapping_coverage(edge_offsets: torch.Tensor, cloud_offsets: torch.Tensor,
                     positions: Sequence[int] | torch.Tensor, length: int) -> MappingCoverage:
    """Map edge ``positions`` to cloud tokens (as scout does) and measure the mapping;
    ``length`` is the context's length in characters."""
    cloud = map_positions(edge_offsets, cloud_offsets, positions)
    edge_chars = char_mask(edge_offsets, positions, length)
    cloud_chars = char_mask(cloud_offsets, cloud, length)
    both = int((edge_chars & cloud_chars).sum())
    return MappingCoverage(
        coverage=both / max(1, int(edge_chars.sum())),
        precision=both / max(1, int(cloud_chars.sum())),
        cloud_retention=cloud.numel() / max(1, cloud_offsets.shape[0]),
        cloud_positions=cloud,
    )


@dataclasses.dataclass(frozen=True)
class ScoutPayload:
    """The scout body the edge sends; ``document_zstd`` is None when the cloud has the text."""

    doc_hash: bytes
    question: str
    num_context: int
    positions: tuple[int, ...]
    char_spans: tuple[tuple[int, int], ...]
    document_zstd: bytes | None = None

    def __post_init__(self) -> None:
        if len(self.doc_hash) != HASH_BYTES:
            raise ScoutFormatError(f"doc_hash must be {HASH_BYTES} bytes (sha256), got {len(self.doc_hash)}")
        _check_positions(self.positions, self.num_context)

    @property
    def size_bytes(self) -> int:
        return len(self.to_bytes())

    def document(self) -> str:
        """The carried document, decompressed and checked against ``doc_hash``.

        ``DocumentMissing`` when the payload carries none; ``ScoutFormatError`` when it is
        no zstd frame, would decompress past ``MAX_DOCUMENT_BYTES``, is not UTF-8 or does
        not match ``doc_hash``."""
        if self.document_zstd is None:
            raise DocumentMissing("this payload carries no document; look it up by doc_hash")
        raw = decompress_zstd(self.document_zstd, MAX_DOCUMENT_BYTES, "carried document",
                              ScoutFormatError)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ScoutFormatError(f"carried document is not UTF-8 ({error}); the payload is "
                                   "corrupt") from None
        if document_hash(text) != self.doc_hash:
            raise ScoutFormatError("carried document does not match doc_hash; the payload is corrupt")
        return text

    def to_bytes(self) -> bytes:
        out = bytearray([HAS_DOCUMENT if self.document_zstd is not None else 0])
        out += self.doc_hash
        put_varint(out, self.num_context)
        code = encode_indices(self.positions, self.num_context)
        put_varint(out, len(code))
        out += code
        put_varint(out, len(self.char_spans))
        previous_end = 0
        for start, end in self.char_spans:
            put_varint(out, start - previous_end)
            put_varint(out, end - start)
            previous_end = end
        question = self.question.encode("utf-8")
        put_varint(out, len(question))
        out += question
        if self.document_zstd is not None:
            put_varint(out, len(self.document_zstd))
            out += self.document_zstd
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> "ScoutPayload":
        """Parse a payload body; anything malformed raises ``ScoutFormatError``."""
        reader = ByteCursor(data, "scout payload", ScoutFormatError)
        flags = reader.take(1)[0]
        if flags & ~HAS_DOCUMENT:
            raise ScoutFormatError(f"unknown scout payload flags {flags:#04x}")
        doc_hash = bytes(reader.take(HASH_BYTES, "document hash"))
        num_context = reader.varint()
        code = ByteCursor(reader.take(reader.varint()), "position code", ScoutFormatError)
        positions = _decode_indices(code, num_context)
        code.finish()
        spans, previous_end = [], 0
        for _ in range(reader.varint()):
            start = previous_end + reader.varint()
            previous_end = start + reader.varint()
            spans.append((start, previous_end))
        question = reader.text(reader.varint(), "question")
        document = None
        if flags & HAS_DOCUMENT:
            length = reader.varint()
            if length > MAX_DOCUMENT_BYTES:
                raise ScoutFormatError(f"carried document of {length} bytes exceeds {MAX_DOCUMENT_BYTES}")
            document = bytes(reader.take(length, "document"))
        reader.finish()
        return cls(doc_hash, question, num_context, tuple(positions.tolist()), tuple(spans),
                   document)


def build_payload(context: str, question: str, offsets: torch.Tensor, positions: torch.Tensor,
                  *, include_document: bool) -> ScoutPayload:
    """The payload for edge-tokenizer ``positions`` of ``context`` (``offsets`` per token)."""
    document = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(context.encode("utf-8")) if include_document else None
    return ScoutPayload(
        doc_hash=document_hash(context),
        question=question,
        num_context=int(offsets.shape[0]),
        positions=tuple(int(p) for p in positions),
        char_spans=char_spans(offsets, positions),
        document_zstd=document,
    )


def scout_answer(cloud_lm: LoadedModel, context: str, question: str,
                 selected: ScoutPayload | Sequence[tuple[int, int]], *,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Answer:
    """Cloud side: prefill the whole prompt, decode with only the selected context in KV.

    ``selected`` is a payload (its character spans are used, so any edge tokenizer works)
    or the character spans themselves.
    """
    if isinstance(selected, ScoutPayload):
        if document_hash(context) != selected.doc_hash:
            raise ValueError("context does not match the payload's doc_hash; fetch the right document")
        spans = selected.char_spans
    else:
        spans = tuple(selected)
    layout = build_prompt(cloud_lm.tokenizer, context, question)
    pre = prefill(cloud_lm, layout, capture="none")
    positions = positions_in_spans(layout.context_offsets, spans)
    return answer_pruned(cloud_lm, pre, positions, max_new_tokens=max_new_tokens)
