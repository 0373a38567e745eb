"""The envelope: round trips, and every kind of malformed stream raises a FrameError subclass."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_scout.transport.framing import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    NO_BODY_CRC,
    BadMagic,
    BodyChecksumMismatch,
    ErrorCode,
    FrameError,
    FrameTooLarge,
    HeaderChecksumMismatch,
    MessageType,
    TruncatedFrame,
    UnknownFlags,
    UnknownMessageType,
    UnsupportedVersion,
    deadline_ms_from_budget,
    decode_error_body,
    encode_error_body,
    encode_frame,
    read_frame,
    write_frame,
)

LIMIT = 1 << 20
bodies = st.binary(max_size=4096)
ids = st.integers(0, 2**64 - 1)
deadlines = st.integers(0, 2**32 - 1)
types = st.sampled_from(list(MessageType))


def read(data: bytes, limit: int = LIMIT):
    return read_frame(io.BytesIO(data).readinto, max_body_bytes=limit)


def raw_header(*, magic=MAGIC, version=1, msg_type=1, flags=0, request_id=7, deadline_ms=0, body=b"", length=None):
    """A header with arbitrary field values and a correct header checksum."""
    head = HEADER.pack(
        magic, version, msg_type, flags, request_id, deadline_ms,
        len(body) if length is None else length, zlib.crc32(body),
    )
    return head + struct.pack(">I", zlib.crc32(head))


@given(types, ids, bodies, deadlines)
def test_frame_roundtrips_every_field_and_the_body(msg_type, request_id, body, deadline_ms):
    received = read(encode_frame(msg_type, request_id, body, deadline_ms=deadline_ms))
    header = received.frame.header
    assert (header.msg_type, header.request_id, header.deadline_ms) == (msg_type, request_id, deadline_ms)
    assert bytes(received.frame.body) == body
    assert received.size_bytes == HEADER_SIZE + len(body)
    assert received.first_byte_unix_s <= received.last_byte_unix_s


@given(st.lists(st.tuples(ids, bodies), min_size=1, max_size=5))
def test_back_to_back_frames_are_read_one_at_a_time_then_end_of_stream(frames):
    stream = io.BytesIO(b"".join(encode_frame(MessageType.REQUEST, i, b) for i, b in frames))
    for request_id, body in frames:
        received = read_frame(stream.readinto, max_body_bytes=LIMIT)
        assert (received.frame.header.request_id, bytes(received.frame.body)) == (request_id, body)
    assert read_frame(stream.readinto, max_body_bytes=LIMIT) is None


@given(bodies, st.data())
def test_stream_cut_anywhere_inside_a_frame_raises_truncated(body, data):
    frame = encode_frame(MessageType.RESPONSE, 3, body)
    cut = data.draw(st.integers(1, len(frame) - 1))
    with pytest.raises(TruncatedFrame):
        read(frame[:cut])


@given(bodies, st.data())
def test_any_flipped_header_byte_is_caught(body, data):
    frame = bytearray(encode_frame(MessageType.REQUEST, 11, body, deadline_ms=500))
    pos = data.draw(st.integers(0, HEADER_SIZE - 1))
    frame[pos] ^= data.draw(st.integers(1, 255))
    expected = BadMagic if pos < len(MAGIC) else HeaderChecksumMismatch
    with pytest.raises(expected):
        read(bytes(frame))


@given(st.binary(min_size=1, max_size=4096), st.data())
def test_any_flipped_body_byte_is_caught_by_the_body_checksum(body, data):
    frame = bytearray(encode_frame(MessageType.REQUEST, 11, body))
    pos = data.draw(st.integers(HEADER_SIZE, len(frame) - 1))
    frame[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(BodyChecksumMismatch, match="request 11"):
        read(bytes(frame))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_frame_errors(data):
    try:
        read(data, limit=64)
    except FrameError:
        pass


def test_over_limit_length_is_rejected_from_the_header_alone():
    # Only the header is supplied: the reader must refuse before it tries to read 2**40 bytes.
    with pytest.raises(FrameTooLarge, match="max_body_bytes=1024") as info:
        read(raw_header(length=2**40, request_id=42), limit=1024)
    assert info.value.header.request_id == 42


def test_body_at_exactly_the_limit_is_accepted():
    assert len(read(encode_frame(MessageType.REQUEST, 1, b"z" * 1024), limit=1024).frame.body) == 1024


def test_unknown_version_says_to_upgrade():
    with pytest.raises(UnsupportedVersion, match="version 2"):
        read(raw_header(version=2))


def test_unknown_message_type_is_rejected():
    with pytest.raises(UnknownMessageType, match="type 9"):
        read(raw_header(msg_type=9))


def test_reserved_flags_are_rejected():
    with pytest.raises(UnknownFlags):
        read(raw_header(flags=2))


@given(st.binary(min_size=1, max_size=512), st.data())
def test_no_body_crc_frames_skip_the_body_check_but_keep_the_header_check(body, data):
    frame = bytearray(encode_frame(MessageType.REQUEST, 4, body, body_crc=False))
    assert read(bytes(frame)).frame.header.flags == NO_BODY_CRC
    pos = data.draw(st.integers(HEADER_SIZE, len(frame) - 1))
    frame[pos] ^= 0xFF
    assert read(bytes(frame)).frame.body != body  # the documented trade: body damage passes
    frame[len(MAGIC) + 4] ^= 0xFF  # a header byte
    with pytest.raises(HeaderChecksumMismatch):
        read(bytes(frame))


def test_empty_stream_is_a_clean_end_not_an_error():
    assert read(b"") is None


def test_write_frame_sends_large_bodies_without_joining_them_to_the_header():
    chunks: list[bytes] = []
    body = b"q" * (1 << 17)
    sent = write_frame(chunks.append, MessageType.REQUEST, 5, body)
    assert sent == HEADER_SIZE + len(body) and len(chunks) == 2
    assert bytes(read(b"".join(bytes(c) for c in chunks)).frame.body) == body


@given(st.sampled_from(list(ErrorCode)), st.text(max_size=200))
def test_error_body_roundtrips(code, message):
    assert decode_error_body(encode_error_body(code, message)) == (code, message)


def test_error_body_with_unknown_code_is_a_frame_error():
    with pytest.raises(FrameError, match="unknown error code"):
        decode_error_body(b"\xff\xff")


@pytest.mark.parametrize(
    "budget_s, expected_ms", [(None, 0), (0.0001, 1), (0.25, 250), (1.0001, 1001), (1e12, 2**32 - 1)]
)
def test_deadline_budget_is_rounded_up_and_never_reads_as_no_deadline(budget_s, expected_ms):
    assert deadline_ms_from_budget(budget_s) == expected_ms


@pytest.mark.parametrize("budget_s", [0.0, -1.0, float("nan"), float("inf")])
def test_nonpositive_or_nonfinite_budget_is_refused(budget_s):
    with pytest.raises(ValueError, match="positive finite"):
        deadline_ms_from_budget(budget_s)
