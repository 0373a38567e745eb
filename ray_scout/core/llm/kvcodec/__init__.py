"""KV codecs: one class per transport mode that carries KV, behind one registry.

What lives here: ``codec_for(mode)`` and the encoded form (``EncodedKV``) with its
closed-form size. Modules: ``quant`` (group quantization, 4-bit packing), ``base`` (layout,
encoded form, the layer-wise codec and the registry), ``bf16``, ``uniform`` (INT8, INT4),
``mixed`` (INT4 with protected bf16 layers). Adding a mode = one class decorated with
``@register`` in a new module imported below. What it leaves to others: bytes on the wire
(``ray_scout.core.llm.wire``), which layers to protect (``ray_scout.core.llm.bottleneck``).
"""

from __future__ import annotations

import torch

from ray_scout.core.llm.kvcodec import bf16, mixed, uniform  # noqa: F401  (registration)
from ray_scout.core.llm.kvcodec.base import (
    EncodedKV,
    EncodedTensor,
    KVCodec,
    KVLayout,
    codec_class,
    encoded_size_bytes,
)
from ray_scout.core.modes import Mode

__all__ = ["EncodedKV", "EncodedTensor", "KVCodec", "KVLayout", "codec_for",
           "encoded_size_bytes", "relative_error"]


def codec_for(mode: Mode, *, group_size: int = 32,
              protected_layers: tuple[int, ...] = ()) -> KVCodec:
    """The codec of a KV mode (bf16, int8, int4, mixed_int4)."""
    return codec_class(mode)(group_size=group_size, protected_layers=protected_layers)


def relative_error(reference, decoded) -> float:
    """||x̂ - x|| / ||x|| over all keys and values of two snapshots."""
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for ref, got in zip(reference.keys + reference.values, decoded.keys + decoded.values):
        ref = ref.double()
        num += (got.to(ref.device).double() - ref).square().sum().cpu()
        den += ref.square().sum().cpu()
    return float((num / den).sqrt())
