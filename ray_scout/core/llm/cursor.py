"""A bounds-checked cursor over bytes: the one reader under every binary format of the core.

What lives here: writing LEB128 varints, and taking counted slices, struct fields, UTF-8
text and varints off a buffer, each raising the caller's own error type (``WireError``,
``ScoutFormatError``) with what was being read and where, instead of running off the end;
and ``decompress_zstd``, zstd with a hard cap on the output, for the same callers.
What it leaves to the formats: their layout and their checks.
"""

from __future__ import annotations

import struct

MAX_VARINT_SHIFT = 63


def put_varint(out: bytearray, value: int) -> None:
    """Append ``value`` as an unsigned LEB128 varint (7 bits a byte, low bits first)."""
    if value < 0:
        raise ValueError(f"varints are unsigned, got {value}")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


class ByteCursor:
    """Reads ``data`` front to back; ``error`` is the exception type every failure raises."""

    def __init__(self, data: bytes | memoryview, what: str, error: type[Exception] = ValueError):
        self.data = memoryview(data)
        self.at = 0
        self.what = what
        self.error = error

    @property
    def remaining(self) -> int:
        return len(self.data) - self.at

    def take(self, count: int, part: str = "") -> memoryview:
        """The next ``count`` bytes (a view: copy it if it must outlive ``data``)."""
        if count < 0 or count > self.remaining:
            raise self.error(f"{self.what} truncated: {part or 'field'} needs {count} bytes at "
                             f"offset {self.at}, only {self.remaining} left")
        chunk = self.data[self.at:self.at + count]
        self.at += count
        return chunk

    def unpack(self, fmt: struct.Struct, part: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, part))

    def text(self, count: int, part: str) -> str:
        try:
            return bytes(self.take(count, part)).decode()
        except UnicodeDecodeError:
            raise self.error(f"{self.what}: {part} is not UTF-8") from None

    def varint(self, part: str = "varint") -> int:
        """An unsigned LEB128 integer of at most 64 bits."""
        value, shift = 0, 0
        while True:
            byte = self.take(1, part)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > MAX_VARINT_SHIFT:
                raise self.error(f"{self.what}: {part} longer than 64 bits at offset {self.at}")

    def finish(self) -> None:
        """Raise unless every byte was read."""
        if self.remaining:
            raise self.error(f"{self.what}: {self.remaining} trailing bytes")


def decompress_zstd(data: bytes | memoryview, max_bytes: int, what: str,
                    error: type[Exception] = ValueError) -> bytes:
    """One zstd frame decompressed to at most ``max_bytes``, or ``error`` saying why not.

    python-zstandard ignores ``max_output_size`` when the frame header declares its content
    size and allocates the declared size (a 17-byte frame can ask for 2**40 bytes), so the
    declared size is checked first; a frame that declares none is held to the cap by
    ``max_output_size``.
    """
    import zstandard

    data = bytes(data)
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as err:
        raise error(f"{what} is not a zstd frame: {err}") from None
    if declared > max_bytes:
        raise error(f"{what} declares {declared} bytes decompressed, over the limit of {max_bytes}")
    try:
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=max_bytes)
    except zstandard.ZstdError as err:
        raise error(f"{what} does not decompress within {max_bytes} bytes: {err}") from None
