"""The byte cursor under the wire and scout formats: exact reads, the caller's error type."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

from ray_scout.core.llm.cursor import ByteCursor, put_varint


class FormatError(ValueError):
    pass


@given(st.lists(st.integers(0, 2 ** 64 - 1), max_size=20))
def test_varints_round_trip_and_use_the_fewest_bytes(values):
    out = bytearray()
    for value in values:
        put_varint(out, value)
    cursor = ByteCursor(bytes(out), "varints", FormatError)
    assert [cursor.varint() for _ in values] == values
    cursor.finish()
    assert len(out) == sum(max(1, -(-v.bit_length() // 7)) for v in values)


@given(st.binary(max_size=64), st.integers(0, 80))
def test_a_read_past_the_end_raises_the_callers_error_and_moves_nothing(data, count):
    cursor = ByteCursor(data, "frame", FormatError)
    if count <= len(data):
        assert bytes(cursor.take(count, "body")) == data[:count]
        assert cursor.remaining == len(data) - count
    else:
        with pytest.raises(FormatError, match="frame truncated: body needs"):
            cursor.take(count, "body")
        assert cursor.at == 0


def test_structs_text_and_trailing_bytes():
    cursor = ByteCursor(struct.pack("<HI", 7, 9) + b"ok\xff" + b"!", "msg", FormatError)
    assert cursor.unpack(struct.Struct("<HI"), "header") == (7, 9)
    assert cursor.text(2, "name") == "ok"
    with pytest.raises(FormatError, match="tag is not UTF-8"):
        cursor.text(1, "tag")
    with pytest.raises(FormatError, match="1 trailing bytes"):
        cursor.finish()


def test_an_overlong_varint_is_refused():
    with pytest.raises(FormatError, match="longer than 64 bits"):
        ByteCursor(b"\xff" * 10 + b"\x01", "code", FormatError).varint()
    with pytest.raises(ValueError, match="unsigned"):
        put_varint(bytearray(), -1)
