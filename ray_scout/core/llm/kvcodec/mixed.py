"""Mixed INT4: INT4 everywhere except the protected (bottleneck) layers, kept in bf16.

Which layers to protect is measured per model by ``ray_scout.core.llm.bottleneck``.
"""

from __future__ import annotations

from ray_scout.core.llm.kvcodec.base import RAW_BITS, KVCodec, register
from ray_scout.core.modes import Mode


@register
class MixedInt4Codec(KVCodec):
    mode = Mode.MIXED_INT4

    @classmethod
    def bits_per_layer(cls, num_layers, protected_layers):
        if not protected_layers:
            raise ValueError("mixed_int4 needs protected_layers (see "
                             "ray_scout.core.llm.bottleneck.protected_layers_for); "
                             "without any it is plain int4")
        bad = [p for p in protected_layers if not 0 <= p < num_layers]
        if bad:
            raise ValueError(f"protected layers {bad} outside [0, {num_layers})")
        protected = set(protected_layers)
        return tuple(RAW_BITS if layer in protected else 4 for layer in range(num_layers))
