"""The wire format: one versioned, checksummed binary container for every payload mode.

What lives here: the byte layout of a payload (header, named sections, optional zstd body,
crc32 trailer), its strict decoder, the KV convenience pair ``encode_kv``/``decode_kv`` and
the closed-form ``payload_size_bytes``. What it knows: the KV layout (to validate shapes
against the expected model and split the KV section). What it leaves to others: what the
sections of other modes mean (the scout payload builds its own sections), sockets and
framing on a stream (``transport``). No pickle: every field is a fixed-width little-endian
integer or length-prefixed UTF-8.

Layout (little-endian)::

    magic "RSWP" | version u8 | mode u8 | flags u8 (bit0: zstd body) | dtype u8
    model_id_len u16 | model_id utf-8
    num_layers u16 | num_kv_heads u16 | num_tokens u32 | head_dim u16 | group_size u16
    num_protected u16 | protected layers u16 each
    num_sections u8 | per section: name_len u8, name utf-8, raw_len u64
    body_len u64 | body (sections concatenated in order; zstd-compressed if flagged)
    crc32 u32 over every byte before it

Uncompressed size = 37 + len(model_id) + 2 * protected + sum(9 + len(name)) + data; a KV
payload has three sections: ``positions`` (int32 per token), ``kv`` (per layer: key data, key
scales, key zeros, value data, value scales, value zeros; raw bf16 layers only their data)
and ``tail`` (int32 ids of the prompt tokens that follow the KV: the cloud runs them before
decoding, so its first answer token is conditioned on exactly the KV it received).
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy
import torch

from ray_scout.core.llm.cursor import ByteCursor, decompress_zstd
from ray_scout.core.llm.kvcodec import EncodedKV, KVLayout, encoded_size_bytes
from ray_scout.core.llm.kvcodec.base import POSITION_DTYPE, RAW_DTYPE
from ray_scout.core.llm.models import KVFacts
from ray_scout.core.modes import Mode

MAGIC = b"RSWP"
VERSION = 1
DEFAULT_MAX_BYTES = 1 << 30
FLAG_ZSTD = 0x01
KV_SECTIONS = ("positions", "kv", "tail")
TAIL_DTYPE = torch.int32

_MODE_CODES = {Mode.BF16: 1, Mode.INT8: 2, Mode.INT4: 3, Mode.MIXED_INT4: 4, Mode.SCOUT: 5}
_MODES_BY_CODE = {code: mode for mode, code in _MODE_CODES.items()}
_DTYPE_CODES = {None: 0, torch.bfloat16: 1}
_DTYPES_BY_CODE = {code: dtype for dtype, code in _DTYPE_CODES.items()}

_PREFIX = struct.Struct("<4sBBBBH")  # magic, version, mode, flags, dtype, model_id_len
_SHAPE = struct.Struct("<HHIHHH")  # layers, kv_heads, tokens, head_dim, group, num_protected
_U8, _U16, _U32, _U64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<Q"))
_FIXED_BYTES = _PREFIX.size + _SHAPE.size + _U8.size + _U64.size + _U32.size  # = 37


class WireError(ValueError):
    """Bytes that are not a valid payload; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class Payload:
    """A decoded container: header fields and the raw sections, in order."""

    mode: Mode
    model_id: str
    layout: KVLayout | None
    sections: dict[str, bytes]
    wire_size_bytes: int
    compressed: bool
    stored_body_bytes: int

    @property
    def body_size_bytes(self) -> int:
        """Uncompressed body bytes (sections concatenated)."""
        return sum(len(s) for s in self.sections.values())

    @property
    def compression_ratio(self) -> float:
        """Uncompressed over stored body bytes (1.0 without zstd)."""
        return self.body_size_bytes / self.stored_body_bytes if self.stored_body_bytes else 1.0


def header_size_bytes(model_id: str, protected_layers: tuple[int, ...],
                      section_names: tuple[str, ...]) -> int:
    """Bytes a payload adds around its sections' data (header and crc trailer)."""
    names = sum(_U8.size + len(n.encode()) + _U64.size for n in section_names)
    return _FIXED_BYTES + len(model_id.encode()) + _U16.size * len(protected_layers) + names


def payload_size_bytes(mode: Mode, facts: KVFacts, num_tokens: int, *, group_size: int = 32,
                       protected_layers: tuple[int, ...] = (), tail_tokens: int = 0) -> int:
    """Exact length of ``encode_kv`` without zstd, from the model's KV facts alone."""
    layout = KVLayout(Mode(mode), facts.num_layers, facts.num_kv_heads, num_tokens,
                      facts.head_dim, group_size, tuple(sorted(protected_layers)))
    return (encoded_size_bytes(layout) + tail_tokens * TAIL_DTYPE.itemsize
            + header_size_bytes(facts.model_id, layout.protected_layers, KV_SECTIONS))


def encode_payload(mode: Mode, model_id: str, sections: dict[str, bytes], *,
                   layout: KVLayout | None = None, compress: bool = False,
                   zstd_level: int = 3) -> bytes:
    """Frame ``sections`` (name -> bytes, order kept) as one payload of ``mode``."""
    mode = Mode(mode)
    if mode not in _MODE_CODES:
        raise ValueError(f"mode {mode.value} sends nothing; it has no wire payload")
    if layout is not None and layout.mode != mode:
        raise ValueError(f"layout is for {layout.mode.value}, payload mode is {mode.value}")
    model = model_id.encode()
    if len(model) > 0xFFFF or len(sections) > 0xFF:
        raise ValueError("model id over 65535 bytes or more than 255 sections")
    shape = layout or KVLayout(mode, 0, 0, 0, 0, 0)
    head = [_PREFIX.pack(MAGIC, VERSION, _MODE_CODES[mode], FLAG_ZSTD if compress else 0,
                         _DTYPE_CODES[RAW_DTYPE if layout else None], len(model)), model,
            _SHAPE.pack(shape.num_layers, shape.num_kv_heads, shape.num_tokens, shape.head_dim,
                        shape.group_size, len(shape.protected_layers)),
            b"".join(_U16.pack(p) for p in shape.protected_layers), _U8.pack(len(sections))]
    for name, data in sections.items():
        encoded_name = name.encode()
        if not 0 < len(encoded_name) <= 0xFF:
            raise ValueError(f"section name {name!r} must be 1..255 bytes")
        head += [_U8.pack(len(encoded_name)), encoded_name, _U64.pack(len(data))]
    body = b"".join(sections.values())
    if compress:
        import zstandard

        body = zstandard.ZstdCompressor(level=zstd_level).compress(body)
    out = b"".join(head) + _U64.pack(len(body)) + body
    return out + _U32.pack(zlib.crc32(out))


def decode_payload(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES,
                   expected_model: KVFacts | None = None) -> Payload:
    """Validate and parse a payload; raise ``WireError`` on anything malformed.

    ``max_bytes`` bounds both the wire length and the decompressed body. With
    ``expected_model``, a KV payload must come from that model id with its shapes.
    """
    if len(data) > max_bytes:
        raise WireError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}; "
                        "raise max_bytes if this size is expected")
    reader = ByteCursor(data, "payload", WireError)
    magic, version, mode_code, flags, dtype_code, model_len = reader.unpack(_PREFIX, "header")
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}: not a ray-scout payload")
    if version != VERSION:
        raise WireError(f"unknown wire version {version}; this build reads version {VERSION}")
    if mode_code not in _MODES_BY_CODE:
        raise WireError(f"unknown mode code {mode_code}")
    if flags & ~FLAG_ZSTD:
        raise WireError(f"unknown flags 0x{flags:02x}")
    if dtype_code not in _DTYPES_BY_CODE:
        raise WireError(f"unknown dtype code {dtype_code}")
    mode = _MODES_BY_CODE[mode_code]
    model_id = reader.text(model_len, "model id")
    layers, heads, tokens, head_dim, group, num_protected = reader.unpack(_SHAPE, "shape")
    protected = tuple(reader.unpack(_U16, "protected layer")[0] for _ in range(num_protected))
    (num_sections,) = reader.unpack(_U8, "section count")
    table = []
    for _ in range(num_sections):
        (name_len,) = reader.unpack(_U8, "section name length")
        name = reader.text(name_len, "section name")
        (raw_len,) = reader.unpack(_U64, "section length")
        table.append((name, raw_len))
    if len({name for name, _ in table}) != len(table):
        raise WireError("duplicate section names")
    raw_total = sum(length for _, length in table)
    if raw_total > max_bytes:
        raise WireError(f"sections declare {raw_total} bytes, over the limit of {max_bytes}")
    (body_len,) = reader.unpack(_U64, "body length")
    expected_total = reader.at + body_len + _U32.size
    if len(data) < expected_total:
        raise WireError(f"truncated payload: {len(data)} bytes, header declares {expected_total}")
    if len(data) > expected_total:
        raise WireError(f"{len(data) - expected_total} trailing bytes after the payload")
    body = reader.take(body_len, "body")
    (crc,) = reader.unpack(_U32, "checksum")
    if zlib.crc32(reader.data[:expected_total - _U32.size]) != crc:
        raise WireError("wrong checksum: the payload was corrupted in transit")
    if flags & FLAG_ZSTD:
        body = _decompress(body, raw_total)
    elif body_len != raw_total:
        raise WireError(f"body has {body_len} bytes, sections declare {raw_total}")
    sections, at = {}, 0
    for name, length in table:
        sections[name] = bytes(body[at:at + length])
        at += length
    layout = None
    if mode != Mode.SCOUT:
        layout = _kv_layout(mode, layers, heads, tokens, head_dim, group, protected, dtype_code)
        if expected_model is not None:
            _check_model(layout, model_id, expected_model)
    return Payload(mode, model_id, layout, sections, len(data), bool(flags & FLAG_ZSTD),
                   body_len)


def _decompress(body: memoryview, raw_total: int) -> bytes:
    out = decompress_zstd(body, raw_total, "zstd body", WireError)
    if len(out) != raw_total:
        raise WireError(f"zstd body holds {len(out)} bytes, sections declare {raw_total}")
    return out


def _kv_layout(mode, layers, heads, tokens, head_dim, group, protected, dtype_code) -> KVLayout:
    if _DTYPES_BY_CODE[dtype_code] != RAW_DTYPE:
        raise WireError(f"KV payload with dtype code {dtype_code}; KV travels as bf16 (code 1)")
    if min(layers, heads, head_dim, group) < 1:
        raise WireError(f"KV payload with empty shape: layers={layers} kv_heads={heads} "
                        f"head_dim={head_dim} group_size={group}")
    if list(protected) != sorted(set(protected)):
        raise WireError(f"protected layers {protected} are not sorted and unique")
    layout = KVLayout(mode, layers, heads, tokens, head_dim, group, protected)
    try:
        layout.layer_bits()
    except ValueError as err:
        raise WireError(f"inconsistent KV header: {err}") from None
    return layout


def _check_model(layout: KVLayout, model_id: str, facts: KVFacts) -> None:
    got = (layout.num_layers, layout.num_kv_heads, layout.head_dim)
    want = (facts.num_layers, facts.num_kv_heads, facts.head_dim)
    if model_id != facts.model_id:
        raise WireError(f"KV from model {model_id!r} cannot feed {facts.model_id!r}; "
                        "the edge and the cloud must run the same model for KV modes")
    if got != want:
        raise WireError(f"KV shapes (layers, kv_heads, head_dim)={got} are not those of "
                        f"{facts.model_id} {want}")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if t.device.type == "cuda":  # one DMA into pinned memory, ≈ 4x a pageable copy
        host = torch.empty(t.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(t)
        t = host
    return t.cpu().numpy().tobytes()


@dataclasses.dataclass(frozen=True)
class KVPayload:
    """A decoded KV payload: the encoded KV and the prompt tokens that follow it."""

    encoded: EncodedKV
    tail_ids: tuple[int, ...]


def encode_kv(encoded: EncodedKV, model_id: str, *, tail_ids: tuple[int, ...] = (),
              compress: bool = False, zstd_level: int = 3) -> bytes:
    """One KV payload: positions, all layers' encoded tensors (the encoded buffer, already
    in the wire's order), and the tail token ids. Raises ``ValueError`` if the encoder met
    non-finite KV."""
    encoded.check_finite()
    sections = {"positions": _tensor_bytes(encoded.positions), "kv": _tensor_bytes(encoded.data),
                "tail": _tensor_bytes(torch.tensor(tail_ids, dtype=TAIL_DTYPE))}
    return encode_payload(encoded.mode, model_id, sections, layout=encoded.layout,
                          compress=compress, zstd_level=zstd_level)


def decode_kv(data: bytes, *, facts: KVFacts, max_bytes: int = DEFAULT_MAX_BYTES,
              pin_memory: bool = False) -> KVPayload:
    """Parse and validate a KV payload for the model of ``facts``. With ``pin_memory`` (a
    receiver that decodes on a GPU), the encoded KV lands in pinned host memory: the copy
    the parse makes anyway goes there, and the decoder's host-to-device copy is then one
    DMA, with no staging copy on the calling thread (issue 15). Anything malformed, or over
    ``max_bytes`` on the wire or decompressed, raises ``WireError`` naming the field."""
    payload = decode_payload(data, max_bytes=max_bytes, expected_model=facts)
    layout = payload.layout
    if layout is None:
        raise WireError(f"a {payload.mode.value} payload carries no KV")
    if tuple(payload.sections) != KV_SECTIONS:
        raise WireError(f"KV payload sections {tuple(payload.sections)}, expected {KV_SECTIONS}")
    data_bytes = encoded_size_bytes(layout)
    got = len(payload.sections["positions"]) + len(payload.sections["kv"])
    if got != data_bytes:
        raise WireError(f"KV sections hold {got} bytes; the header's shapes need {data_bytes}")
    if len(payload.sections["positions"]) != POSITION_DTYPE.itemsize * layout.num_tokens:
        raise WireError(f"positions section holds {len(payload.sections['positions'])} bytes "
                        f"for {layout.num_tokens} tokens")
    if len(payload.sections["tail"]) % TAIL_DTYPE.itemsize:
        raise WireError("tail section is not a whole number of int32 token ids")
    tail = _from_bytes(payload.sections["tail"], TAIL_DTYPE)
    if tail.numel() and int(tail.min()) < 0:
        raise WireError(f"tail: token id {int(tail.min())} is negative")
    tail_ids = tuple(int(t) for t in tail)
    positions = _from_bytes(payload.sections["positions"], POSITION_DTYPE)
    # In int64: an int32 diff of crafted values wraps and passes as increasing.
    wide = positions.to(torch.int64)
    if wide.numel() and int(wide[0]) < 0:
        raise WireError(f"positions: the first position is {int(wide[0])}, must be >= 0")
    if wide.numel() > 1 and not bool((wide.diff() > 0).all()):
        at = int(torch.nonzero(wide.diff() <= 0)[0])
        raise WireError(f"positions: must be strictly increasing, but position {at + 1} is "
                        f"{int(wide[at + 1])} after {int(wide[at])}")
    kv = _from_bytes(payload.sections["kv"], torch.uint8, pin_memory=pin_memory)
    return KVPayload(EncodedKV(layout, positions, kv), tail_ids)


def _from_bytes(data: bytes, dtype: torch.dtype, *, pin_memory: bool = False) -> torch.Tensor:
    """A tensor that owns a copy of ``data``, in pinned memory if asked."""
    if not data:  # torch.frombuffer refuses an empty buffer
        return torch.empty(0, dtype=dtype)
    if not pin_memory:
        return torch.frombuffer(bytearray(data), dtype=dtype)
    out = torch.empty(len(data) // dtype.itemsize, dtype=dtype, pin_memory=True)
    out.view(torch.uint8).numpy()[:] = numpy.frombuffer(data, dtype=numpy.uint8)
    return out
