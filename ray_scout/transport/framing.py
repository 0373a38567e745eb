"""The message envelope: a fixed, checksummed header in front of an opaque body.

What lives here: the header layout, encoding a frame, decoding one from a byte stream with a
size limit, and the `FrameError` family raised for every malformed input.
What it knows: bytes, lengths and checksums; the four message types and the ERROR body.
What it leaves to others: the body of REQUEST and RESPONSE frames is the core's wire format
(KV payloads, scout indices); this module never parses it. Sockets, deadlines and threads
belong to `server` and `client`.

Header (big-endian, 36 bytes)::

    magic        4s  b"RSCT"
    version      B   1
    msg_type     B   REQUEST=1 RESPONSE=2 ERROR=3 CANCEL=4
    flags        H   bit 0 NO_BODY_CRC (body_crc32 is 0 and not checked); any other set bit
                     is rejected, so a later version can use them
    request_id   Q   chosen by the client, echoed by the server
    deadline_ms  I   time budget left when the sender started the frame; 0 = no deadline
    body_length  Q
    body_crc32   I   zlib.crc32 of the body, unless NO_BODY_CRC
    header_crc32 I   zlib.crc32 of the 32 bytes before it

Why the deadline is a *relative* budget in milliseconds and not an absolute unix time: the
edge agent and the cloud actor run on different hosts (or namespaces of one host today, two
machines on a real cluster) whose clocks are not guaranteed to agree; an absolute time would
turn clock skew into phantom misses or phantom slack. The receiver anchors the budget at the
arrival of the frame's first byte, so transmission time of the body counts against it; only
the one-way propagation before that byte goes unaccounted (sub-millisecond to tens of ms, in
the receiver's favour). Milliseconds in a u32 cover 49 days; a budget that is positive but
below 1 ms is sent as 1 ms so it never reads as "no deadline".

Why NO_BODY_CRC exists: zlib.crc32 runs at about 1 GB/s on the dev box, paid once by each
side, which is most of the transport's cost on a 100 MB payload (docs/TRANSPORT.md). TCP
already checksums every segment; the body CRC catches our own bugs (a desynchronised stream)
and corruption TCP's 16-bit sum misses. The header CRC is always on, so a lost frame boundary
is still caught at the next header. Checksums stay on by default.
"""

from __future__ import annotations

import enum
import math
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Callable

MAGIC = b"RSCT"
VERSION = 1
HEADER = struct.Struct(">4sBBHQIQI")
HEADER_CRC = struct.Struct(">I")
HEADER_SIZE = HEADER.size + HEADER_CRC.size
MAX_DEADLINE_MS = 2**32 - 1
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024
NO_BODY_CRC = 0x0001
KNOWN_FLAGS = NO_BODY_CRC
# Reading the body in slices keeps each recv bounded and lets the crc run on warm cache.
_RECV_SLICE_BYTES = 1 << 20


class MessageType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    ERROR = 3
    CANCEL = 4


class ErrorCode(enum.IntEnum):
    """What an ERROR frame reports; the body is `>H` code then a UTF-8 message."""

    DEADLINE = 1  # the request's budget ran out before the handler started
    HANDLER = 2  # the handler raised
    TOO_LARGE = 3  # body_length over the receiver's max_body_bytes; connection closed
    BAD_FRAME = 4  # the receiver could not parse a frame; connection closed
    SHUTDOWN = 5  # the server is closing


class FrameError(ValueError):
    """A byte stream that is not a valid frame; the connection cannot be resynchronised."""


class TruncatedFrame(FrameError):
    pass


class BadMagic(FrameError):
    pass


class UnsupportedVersion(FrameError):
    pass


class UnknownMessageType(FrameError):
    pass


class UnknownFlags(FrameError):
    pass


class HeaderChecksumMismatch(FrameError):
    pass


class BodyChecksumMismatch(FrameError):
    pass


class FrameTooLarge(FrameError):
    def __init__(self, message: str, header: "Header"):
        super().__init__(message)
        self.header = header


@dataclass(frozen=True)
class Header:
    msg_type: MessageType
    request_id: int
    deadline_ms: int
    body_length: int
    body_crc32: int
    flags: int = 0
    version: int = VERSION


@dataclass(frozen=True)
class Frame:
    header: Header
    # The receive buffer itself (a bytearray on read): copying a 100 MB payload once more
    # would cost more than the rest of the envelope.
    body: bytes | bytearray


@dataclass(frozen=True)
class ReceivedFrame:
    """A frame plus when its first and last bytes came out of the socket (unix seconds)."""

    frame: Frame
    first_byte_unix_s: float
    last_byte_unix_s: float

    @property
    def size_bytes(self) -> int:
        return HEADER_SIZE + self.frame.header.body_length


def deadline_ms_from_budget(budget_s: float | None) -> int:
    """The wire value for a remaining budget in seconds (None = no deadline)."""
    if budget_s is None:
        return 0
    if not math.isfinite(budget_s) or budget_s <= 0:
        raise ValueError(f"deadline budget must be a positive finite number of seconds, got {budget_s!r}")
    return min(MAX_DEADLINE_MS, max(1, math.ceil(budget_s * 1000)))


def encode_header(
    msg_type: MessageType,
    request_id: int,
    body: bytes | bytearray | memoryview,
    *,
    deadline_ms: int = 0,
    body_crc: bool = True,
) -> bytes:
    """The 36 header bytes for `body`; send them, then the body itself (no copy of the body)."""
    if not 0 <= request_id < 2**64:
        raise ValueError(f"request_id must fit in 64 bits unsigned, got {request_id}")
    if not 0 <= deadline_ms <= MAX_DEADLINE_MS:
        raise ValueError(f"deadline_ms must be in [0, {MAX_DEADLINE_MS}], got {deadline_ms}")
    flags, crc = (0, zlib.crc32(body)) if body_crc else (NO_BODY_CRC, 0)
    head = HEADER.pack(MAGIC, VERSION, MessageType(msg_type), flags, request_id, deadline_ms, len(body), crc)
    return head + HEADER_CRC.pack(zlib.crc32(head))


def encode_frame(
    msg_type: MessageType, request_id: int, body: bytes = b"", *, deadline_ms: int = 0, body_crc: bool = True
) -> bytes:
    """Header and body in one bytes object (convenient for small frames and tests)."""
    return encode_header(msg_type, request_id, body, deadline_ms=deadline_ms, body_crc=body_crc) + bytes(body)


def decode_header(data: bytes | bytearray | memoryview, *, max_body_bytes: int) -> Header:
    """Parse and check the 36 header bytes; the body length is checked against the limit."""
    if len(data) != HEADER_SIZE:
        raise TruncatedFrame(f"header needs {HEADER_SIZE} bytes, got {len(data)}")
    magic, version, msg_type, flags, request_id, deadline_ms, body_length, body_crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BadMagic(
            f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): the peer does not speak the ray-scout "
            "transport, or the stream lost sync; close the connection"
        )
    (header_crc,) = HEADER_CRC.unpack_from(data, HEADER.size)
    if zlib.crc32(data[: HEADER.size]) != header_crc:
        raise HeaderChecksumMismatch("header checksum mismatch: the header was corrupted in transit")
    if version != VERSION:
        raise UnsupportedVersion(
            f"frame version {version}, this side speaks {VERSION}: upgrade the older peer"
        )
    try:
        kind = MessageType(msg_type)
    except ValueError:
        raise UnknownMessageType(f"unknown message type {msg_type} (known: 1-4)") from None
    if flags & ~KNOWN_FLAGS:
        raise UnknownFlags(f"flags {flags:#06x} set; version {VERSION} defines only {KNOWN_FLAGS:#06x}")
    header = Header(kind, request_id, deadline_ms, body_length, body_crc, flags, version)
    if body_length > max_body_bytes:
        raise FrameTooLarge(
            f"body of {body_length} bytes exceeds max_body_bytes={max_body_bytes}; "
            "raise the receiver's limit or split the payload",
            header,
        )
    return header


RecvInto = Callable[[memoryview], int]


def _fill(recv_into: RecvInto, view: memoryview, what: str) -> None:
    got = 0
    while got < len(view):
        n = recv_into(view[got:])
        if n == 0:
            raise TruncatedFrame(f"stream ended after {got} of {len(view)} {what} bytes")
        got += n


def read_frame(
    recv_into: RecvInto,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    clock: Callable[[], float] = time.time,
    on_header: Callable[[Header], None] | None = None,
) -> ReceivedFrame | None:
    """Read one frame through `recv_into` (a socket's recv_into, a file's readinto).

    Returns None on a clean end of stream before any byte of a frame. Memory is bounded by
    `max_body_bytes`: the body buffer is allocated only after the header passed its checks.
    `on_header` runs after the header is parsed and before the body is read (the server uses
    it to apply backpressure); it may raise to abandon the frame.
    """
    head = bytearray(HEADER_SIZE)
    view = memoryview(head)
    n = recv_into(view)
    if n == 0:
        return None
    first_byte = clock()
    _fill(recv_into, view[n:], "header")
    header = decode_header(head, max_body_bytes=max_body_bytes)
    if on_header is not None:
        on_header(header)
    body = bytearray(header.body_length)
    body_view = memoryview(body)
    check = not header.flags & NO_BODY_CRC
    crc = 0
    got = 0
    while got < header.body_length:
        chunk = body_view[got : got + _RECV_SLICE_BYTES]
        k = recv_into(chunk)
        if k == 0:
            raise TruncatedFrame(f"stream ended after {got} of {header.body_length} body bytes")
        if check:
            crc = zlib.crc32(chunk[:k], crc)
        got += k
    last_byte = clock() if header.body_length else first_byte
    if check and crc != header.body_crc32:
        raise BodyChecksumMismatch(
            f"body checksum mismatch on request {header.request_id}: the body was corrupted in transit"
        )
    return ReceivedFrame(Frame(header, body), first_byte, last_byte)


# Below this size header and body go out in one send: one syscall, one segment.
_COALESCE_BYTES = 64 * 1024


def write_frame(
    sendall: Callable[[bytes | bytearray | memoryview], None],
    msg_type: MessageType,
    request_id: int,
    body: bytes | bytearray | memoryview = b"",
    *,
    deadline_ms: int = 0,
    body_crc: bool = True,
) -> int:
    """Send one frame through `sendall` (a socket's); returns the bytes written."""
    head = encode_header(msg_type, request_id, body, deadline_ms=deadline_ms, body_crc=body_crc)
    if len(body) <= _COALESCE_BYTES:
        sendall(head + bytes(body))
    else:
        sendall(head)
        sendall(body)
    return HEADER_SIZE + len(body)


_ERROR_CODE = struct.Struct(">H")


def encode_error_body(code: ErrorCode, message: str) -> bytes:
    return _ERROR_CODE.pack(ErrorCode(code)) + message.encode("utf-8", "replace")


def decode_error_body(body: bytes) -> tuple[ErrorCode, str]:
    if len(body) < _ERROR_CODE.size:
        raise FrameError(f"ERROR body needs at least {_ERROR_CODE.size} bytes, got {len(body)}")
    (raw,) = _ERROR_CODE.unpack_from(body)
    try:
        code = ErrorCode(raw)
    except ValueError:
        raise FrameError(f"unknown error code {raw} in ERROR frame") from None
    return code, body[_ERROR_CODE.size :].decode("utf-8", "replace")
