"""Group-wise asymmetric integer quantization and 4-bit packing, as tensor algebra only.

What lives here: min/max quantization of one tensor along one axis in groups of
``group_size`` elements (fp16 scale and zero-point per group), its inverse, and packing two
4-bit codes per byte. What it knows: nothing about layers, keys or values; the codecs pick
the axis (KIVI: keys per channel, i.e. groups along tokens; values per token, i.e. groups
along channels). Everything is vectorized torch on the input's device, so the same code
runs on a GPU.

A group axis whose length is not a multiple of ``group_size`` ends in one shorter group:
its min/max cover only the real elements (the pad replicates the last element, which moves
neither the min nor the max), and the pad is dropped from the codes.
"""

from __future__ import annotations

import torch

# fp16 keeps 11 significant bits; widening the scale by 2**-10 before rounding guarantees
# the stored scale is never below the true one, so the group maximum never overflows qmax.
_SCALE_SLACK = 1.0 + 2.0**-10


def num_groups(length: int, group_size: int) -> int:
    return -(-length // group_size)


def quantize(x: torch.Tensor, bits: int, group_size: int, dim: int):
    """Codes (uint8, same shape as ``x``), scales and zeros (fp16, ``dim`` moved last and
    reduced to its groups). Dequantized value = code * scale + zero."""
    qmax = (1 << bits) - 1
    moved = x.movedim(dim, -1).float()
    length = moved.shape[-1]
    groups = num_groups(length, group_size)
    pad = groups * group_size - length
    if pad:
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
    grouped = moved.reshape(*moved.shape[:-1], groups, group_size)
    lo = grouped.amin(dim=-1)
    hi = grouped.amax(dim=-1)
    scales = ((hi - lo) * (_SCALE_SLACK / qmax)).to(torch.float16)
    zeros = lo.to(torch.float16)
    if not bool(torch.isfinite(scales).all() & torch.isfinite(zeros).all()):
        raise ValueError("KV values are not finite or exceed the fp16 range of scales and "
                         "zero-points; send this request in BF16 mode instead")
    step = scales.float()
    step = torch.where(step > 0, step, torch.ones_like(step))  # constant group: all codes 0
    codes = (grouped - zeros.float().unsqueeze(-1)).div_(step.unsqueeze(-1))
    codes = codes.round_().clamp_(0, qmax).to(torch.uint8)
    codes = codes.reshape(*moved.shape[:-1], groups * group_size)[..., :length]
    return codes.movedim(-1, dim).contiguous(), scales, zeros


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize`` (up to rounding), in ``dtype`` on the codes' device."""
    moved = codes.movedim(dim, -1).float()
    length = moved.shape[-1]
    step = scales.float().repeat_interleave(group_size, dim=-1)[..., :length]
    offset = zeros.float().repeat_interleave(group_size, dim=-1)[..., :length]
    return moved.mul_(step).add_(offset).to(dtype).movedim(-1, dim).contiguous()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, flat: element 2i in the low nibble, 2i+1 in the high one."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = 1
    for size in shape:
        count *= size
    flat = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(-1)
    return flat[:count].reshape(shape)
