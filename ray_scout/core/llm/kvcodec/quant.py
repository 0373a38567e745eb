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
SCALE_SLACK = 1.0 + 2.0**-10
NOT_FINITE = ("KV values are not finite or exceed the fp16 range of scales and zero-points; "
              "send this request in BF16 mode instead")


def num_groups(length: int, group_size: int) -> int:
    return -(-length // group_size)


def _split_groups(x: torch.Tensor, dim: int, group_size: int, pad_value=None) -> torch.Tensor:
    """View ``x`` with axis ``dim`` split into ``(groups, group_size)``, padding the last
    group with copies of the last element (or ``pad_value``) when the length is ragged."""
    length = x.shape[dim]
    groups = num_groups(length, group_size)
    pad = groups * group_size - length
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        filler = (x.narrow(dim, length - 1, 1).expand(shape) if pad_value is None
                  else x.new_full(shape, pad_value))
        x = torch.cat([x, filler], dim=dim)
    return x.reshape(x.shape[:dim] + (groups, group_size) + x.shape[dim + 1:])


def _merge_groups(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    merged = x.reshape(x.shape[:dim] + (x.shape[dim] * x.shape[dim + 1],) + x.shape[dim + 2:])
    return merged.narrow(dim, 0, length) if merged.shape[dim] != length else merged


def quantize(x: torch.Tensor, bits: int, group_size: int, dim: int):
    """Codes (uint8, same shape as ``x``), scales and zeros (fp16, the shape of ``x`` with
    axis ``dim`` shrunk to its number of groups). Dequantized value = code * scale + zero.

    Groups are formed by a reshape along ``dim`` (no transposes), so keys [heads, tokens,
    head_dim] grouped along tokens and values grouped along channels both stay contiguous.
    """
    if dim < 0:
        raise ValueError("give the group axis as a non-negative dimension")
    qmax = (1 << bits) - 1
    length = x.shape[dim]
    grouped = _split_groups(x.float(), dim, group_size)
    lo, hi = torch.aminmax(grouped, dim=dim + 1)
    scales = ((hi - lo) * (SCALE_SLACK / qmax)).to(torch.float16)
    zeros = lo.to(torch.float16)
    if not bool(torch.isfinite(scales).all() & torch.isfinite(zeros).all()):
        raise ValueError(NOT_FINITE)
    step = scales.float()
    # A constant group has scale 0: all its codes are 0 and it decodes exactly.
    inverse = torch.where(step > 0, step.reciprocal(), torch.zeros_like(step))
    # (x - zero) / scale + 0.5 in one fused pass; truncation to uint8 then rounds half up.
    bias = 0.5 - zeros.float() * inverse
    codes = torch.addcmul(bias.unsqueeze(dim + 1), grouped, inverse.unsqueeze(dim + 1))
    codes = codes.clamp_(0, qmax).to(torch.uint8)
    return _merge_groups(codes, dim, length).contiguous(), scales, zeros


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize`` (up to rounding), in ``dtype`` on the codes' device."""
    length = codes.shape[dim]
    grouped = _split_groups(codes, dim, group_size, pad_value=0).float()
    out = torch.addcmul(zeros.float().unsqueeze(dim + 1), grouped, scales.float().unsqueeze(dim + 1))
    return _merge_groups(out, dim, length).to(dtype).contiguous()


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
