"""Transport modes: the one list that codecs, the policy and the wire format share."""

from __future__ import annotations

import enum


class Mode(str, enum.Enum):
    """How an edge agent hands a request to the cloud."""

    BF16 = "bf16"  # full KV in 16 bits
    INT8 = "int8"
    INT4 = "int4"
    MIXED_INT4 = "mixed_int4"  # INT4 except the bottleneck layers, kept in 16 bits
    SCOUT = "scout"  # selected position indices only; the cloud re-prefills
    LOCAL = "local"  # nothing is sent; the edge model answers alone

    @property
    def sends_kv(self) -> bool:
        return self in KV_MODES

    @classmethod
    def parse(cls, text: str) -> "Mode":
        try:
            return cls(text.lower())
        except ValueError:
            known = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown mode {text!r}; known modes: {known}") from None


KV_MODES = (Mode.BF16, Mode.INT8, Mode.INT4, Mode.MIXED_INT4)
CLOUD_MODES = KV_MODES + (Mode.SCOUT,)
