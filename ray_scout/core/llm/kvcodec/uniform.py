"""INT8 and INT4: every layer at one bit width (KIVI granularity, fp16 scales/zeros)."""

from __future__ import annotations

from ray_scout.core.llm.kvcodec.base import KVCodec, register
from ray_scout.core.modes import Mode


class _UniformCodec(KVCodec):
    bits: int

    @classmethod
    def bits_per_layer(cls, num_layers, protected_layers):
        if protected_layers:
            raise ValueError(f"{cls.mode.value} quantizes every layer; use mixed_int4 to "
                             f"protect layers {protected_layers}")
        return (cls.bits,) * num_layers


@register
class Int8Codec(_UniformCodec):
    mode = Mode.INT8
    bits = 8


@register
class Int4Codec(_UniformCodec):
    mode = Mode.INT4
    bits = 4
