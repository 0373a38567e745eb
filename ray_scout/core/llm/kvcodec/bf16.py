"""BF16: every layer in 16 bits, the full-quality reference (2 bytes per scalar)."""

from __future__ import annotations

from ray_scout.core.llm.kvcodec.base import RAW_BITS, KVCodec, register
from ray_scout.core.modes import Mode


@register
class Bf16Codec(KVCodec):
    mode = Mode.BF16

    @classmethod
    def bits_per_layer(cls, num_layers, protected_layers):
        if protected_layers:
            raise ValueError("bf16 keeps every layer in 16 bits; protected_layers is for mixed_int4")
        return (RAW_BITS,) * num_layers
