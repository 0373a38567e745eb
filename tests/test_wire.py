import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_scout.core.llm import wire
from ray_scout.core.llm.kv import KVSnapshot
from ray_scout.core.llm.kvcodec import codec_for
from ray_scout.core.llm.models import KVFacts, facts_for
from ray_scout.core.modes import Mode
from ray_scout.core.llm.wire import WireError

FACTS = KVFacts("test/model", num_layers=3, num_kv_heads=2, head_dim=16, num_attention_heads=4)
ALL = [(Mode.BF16, ()), (Mode.INT8, ()), (Mode.INT4, ()), (Mode.MIXED_INT4, (2,))]


def snapshot(facts=FACTS, tokens=21, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (facts.num_kv_heads, tokens, facts.head_dim)
    draw = lambda: torch.randn(*shape, generator=gen)  # noqa: E731
    return KVSnapshot(tuple(draw() for _ in range(facts.num_layers)),
                      tuple(draw() for _ in range(facts.num_layers)), torch.arange(tokens) * 2)


def kv_bytes(mode=Mode.INT4, protected=(), compress=False, facts=FACTS, tokens=21, group=32):
    encoded = codec_for(mode, group_size=group, protected_layers=protected).encode(
        snapshot(facts, tokens))
    return wire.encode_kv(encoded, facts.model_id, compress=compress)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("mode, protected", ALL)
def test_kv_roundtrip_through_bytes_is_bit_exact(mode, protected, compress):
    codec = codec_for(mode, protected_layers=protected)
    snap = snapshot()
    encoded = codec.encode(snap)
    data = wire.encode_kv(encoded, FACTS.model_id, compress=compress)
    back = wire.decode_kv(data, facts=FACTS, max_bytes=1 << 20).encoded
    direct, via_wire = codec.decode(encoded), codec.decode(back)
    for a, b in zip(direct.keys + direct.values, via_wire.keys + via_wire.values):
        assert torch.equal(a, b)
    assert torch.equal(via_wire.positions, snap.positions)


@pytest.mark.parametrize("mode, protected", ALL)
@pytest.mark.parametrize("tokens, group", [(0, 32), (1, 32), (21, 32), (64, 32), (65, 16), (9, 4)])
def test_wire_length_equals_size_formula(mode, protected, tokens, group):
    data = kv_bytes(mode, protected, tokens=tokens, group=group)
    assert len(data) == wire.payload_size_bytes(mode, FACTS, tokens, group_size=group,
                                                protected_layers=protected)


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 5), heads=st.integers(1, 3), head_dim=st.integers(1, 24),
       tokens=st.integers(0, 40), group=st.integers(1, 48), mode=st.sampled_from(
           [Mode.BF16, Mode.INT8, Mode.INT4, Mode.MIXED_INT4]), data=st.data())
def test_wire_length_equals_size_formula_for_any_shape(layers, heads, head_dim, tokens, group,
                                                       mode, data):
    facts = KVFacts("m" * data.draw(st.integers(1, 30)), layers, heads, head_dim, heads)
    protected = ()
    if mode == Mode.MIXED_INT4:
        protected = tuple(sorted(data.draw(st.sets(st.integers(0, layers - 1), min_size=1))))
    encoded = kv_bytes(mode, protected, facts=facts, tokens=tokens, group=group)
    assert len(encoded) == wire.payload_size_bytes(mode, facts, tokens, group_size=group,
                                                   protected_layers=protected)
    assert wire.decode_kv(encoded, facts=facts).encoded.layout.protected_layers == protected


def test_header_overhead_is_stated_and_small():
    facts = facts_for("qwen2.5-7b")
    per_mode = wire.payload_size_bytes(Mode.BF16, facts, 170)
    data = 170 * facts.bf16_bytes_per_token() + 4 * 170
    assert per_mode - data == wire.header_size_bytes(facts.model_id, (), wire.KV_SECTIONS)
    assert per_mode - data == 37 + len("qwen2.5-7b") + 3 * 9 + len("positions") + len("kv") + len("tail")


def test_tail_token_ids_travel_with_the_kv_and_count_in_the_size():
    facts = FACTS
    encoded = codec_for(Mode.INT8).encode(snapshot(facts, tokens=9))
    data = wire.encode_kv(encoded, facts.model_id, tail_ids=(7, 49_000))
    assert len(data) == wire.payload_size_bytes(Mode.INT8, facts, 9, tail_tokens=2)
    assert wire.decode_kv(data, facts=facts).tail_ids == (7, 49_000)


def test_zstd_stage_reports_its_ratio():
    data = kv_bytes(Mode.BF16, compress=True)
    payload = wire.decode_payload(data, expected_model=FACTS)
    assert payload.compressed and payload.compression_ratio > 1.0
    assert payload.body_size_bytes == pytest.approx(payload.stored_body_bytes * payload.compression_ratio)


def test_scout_sections_travel_in_the_same_container():
    sections = {"positions": bytes([1, 2, 200]), "doc_id": b"\x00" * 32, "text": "é".encode()}
    data = wire.encode_payload(Mode.SCOUT, "edge-model", sections, compress=True)
    payload = wire.decode_payload(data, max_bytes=4096, expected_model=FACTS)
    assert payload.mode == Mode.SCOUT and payload.layout is None
    assert payload.sections == sections and payload.model_id == "edge-model"
    assert payload.wire_size_bytes == len(data)


def test_local_mode_has_no_payload():
    with pytest.raises(ValueError, match="sends nothing"):
        wire.encode_payload(Mode.LOCAL, "m", {})


def reseal(data: bytes | bytearray) -> bytes:
    """Recompute the checksum, so a test reaches the validation behind it."""
    body = bytes(data[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[:-1], "truncated"),
    (lambda d: d[:10], "truncated"),
    (lambda d: b"", "truncated"),
    (lambda d: d + b"\x00", "trailing bytes"),
    (lambda d: b"XXXX" + d[4:], "bad magic"),
    (lambda d: reseal(d[:4] + bytes([9]) + d[5:]), "unknown wire version 9"),
    (lambda d: d[:-20] + bytes([d[-20] ^ 0xFF]) + d[-19:], "wrong checksum"),
    (lambda d: reseal(d[:5] + bytes([77]) + d[6:]), "unknown mode code 77"),
])
def test_malformed_bytes_raise_wire_error_saying_what(mutate, message):
    with pytest.raises(WireError, match=message):
        wire.decode_kv(mutate(kv_bytes()), facts=FACTS, max_bytes=1 << 20)


def test_payload_over_the_limit_is_refused_before_parsing():
    data = kv_bytes(Mode.BF16)
    with pytest.raises(WireError, match="exceeds the limit"):
        wire.decode_kv(data, facts=FACTS, max_bytes=len(data) - 1)


def test_zstd_bomb_is_refused_by_declared_lengths():
    sections = {"blob": b"\x00" * 100_000}
    data = wire.encode_payload(Mode.SCOUT, "m", sections, compress=True)
    assert len(data) < 200
    with pytest.raises(WireError, match="over the limit"):
        wire.decode_payload(data, max_bytes=10_000)


def test_kv_for_another_model_is_refused():
    data = kv_bytes()
    other = KVFacts(FACTS.model_id, 3, 2, 32, 4)
    with pytest.raises(WireError, match="are not those of"):
        wire.decode_kv(data, facts=other)
    with pytest.raises(WireError, match="same model"):
        wire.decode_kv(data, facts=KVFacts("other", 3, 2, 16, 4))


def test_scout_payload_is_not_kv():
    data = wire.encode_payload(Mode.SCOUT, FACTS.model_id, {"positions": b"\x01"})
    with pytest.raises(WireError, match="carries no KV"):
        wire.decode_kv(data, facts=FACTS)


def test_unsorted_positions_are_refused():
    snap = snapshot()
    encoded = codec_for(Mode.INT8).encode(snap)
    flipped = encoded.positions.flip(0)
    import dataclasses

    data = wire.encode_kv(dataclasses.replace(encoded, positions=flipped), FACTS.model_id)
    with pytest.raises(WireError, match="strictly increasing"):
        wire.decode_kv(data, facts=FACTS)


VALID = [kv_bytes(m, p, compress=c) for m, p in ALL for c in (False, True)] + [
    wire.encode_payload(Mode.SCOUT, "m", {"positions": b"\x05\x07", "doc": b"abc"})]


def decode_any(data: bytes) -> None:
    wire.decode_payload(data, max_bytes=1 << 20)
    try:
        wire.decode_kv(data, facts=FACTS, max_bytes=1 << 20)
    except WireError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(VALID) - 1), data=st.data())
def test_random_corruption_raises_only_wire_error(which, data):
    original = VALID[which]
    corrupted = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(corrupted) - 1))
        corrupted[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):  # also defeat the checksum, to reach the field checks
        corrupted = bytearray(reseal(corrupted))
    try:
        decode_any(bytes(corrupted))
    except WireError:
        pass


@settings(max_examples=200, deadline=None)
@given(which=st.integers(0, len(VALID) - 1), cut=st.integers(0, 10_000))
def test_truncation_raises_wire_error(which, cut):
    original = VALID[which]
    with pytest.raises(WireError):
        wire.decode_payload(original[:cut % len(original)])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_wire_error(blob):
    try:
        decode_any(blob)
    except WireError:
        pass


def zstd_frame_declaring(size_bytes: int) -> bytes:
    """A 16-byte zstd frame whose header declares ``size_bytes`` of content (it holds none)."""
    # magic, descriptor (8-byte content size, single segment), the size, one empty raw block
    return bytes.fromhex("28b52ffd") + bytes([0xE0]) + struct.pack("<Q", size_bytes) + b"\x01\x00\x00"


@pytest.mark.parametrize("declared", [1 << 40, 3 << 30, 10_001])
def test_zstd_frame_declaring_more_than_the_sections_is_refused_before_allocating(declared):
    # python-zstandard allocates a frame's declared size whatever max_output_size says:
    # 2**40 raised a bare MemoryError, 3 GiB asked malloc for 3 GiB (issue 17, defect 2).
    head = wire.encode_payload(Mode.SCOUT, "m", {"blob": b"\x00" * 10_000}, compress=True)
    body_at = head.index(bytes.fromhex("28b52ffd"))  # the body length u64 sits right before
    body = zstd_frame_declaring(declared)
    out = head[:body_at - 8] + struct.pack("<Q", len(body)) + body
    data = out + struct.pack("<I", zlib.crc32(out))
    with pytest.raises(WireError, match=f"declares {declared} bytes"):
        wire.decode_payload(data, max_bytes=1 << 20)


def test_positions_that_wrap_in_int32_are_refused_naming_the_field():
    # An int32 diff of (2**31 - 1, -5) wraps to a positive step (issue 17, defect 4).
    snap = snapshot()
    encoded = codec_for(Mode.INT8).encode(snap)
    import dataclasses

    crafted = encoded.positions.clone()
    crafted[-2], crafted[-1] = 2**31 - 1, -5
    data = wire.encode_kv(dataclasses.replace(encoded, positions=crafted), FACTS.model_id)
    with pytest.raises(WireError, match=r"positions: must be strictly increasing.*-5 after 2147483647"):
        wire.decode_kv(data, facts=FACTS)


def test_negative_tail_token_ids_are_refused_naming_the_field():
    data = kv_bytes()
    payload = wire.decode_kv(data, facts=FACTS)
    crafted = wire.encode_kv(payload.encoded, FACTS.model_id, tail_ids=(5, -3))
    with pytest.raises(WireError, match="tail: token id -3"):
        wire.decode_kv(crafted, facts=FACTS)
