"""Triton kernels for the KIVI group quantization of whole snapshots, one launch per call.

What lives here: fused encode (min/max, fp16 scale and zero, codes, 4-bit packing) and
decode (unpacking, code * scale + zero, bf16 output) of the keys AND values of many layers
in one launch each, keys grouped along tokens and values along channels, in exactly the
layout of ``quant`` (codes ``[heads, tokens, head_dim]``, 4-bit codes flat with the low
nibble first, scales and zeros with the grouped axis shrunk). Layers are reached through one
table of their addresses per call, so a snapshot whose layers are separate tensors (a
transformers cache) needs no stacking copy. What it knows: the arithmetic of
``quant.quantize``/``quant.dequantize``, step for step (fp32 min/max, the same scale slack,
``fma`` where torch's ``addcmul`` contracts to one), so the codes and scales agree with the
torch path. What it leaves to others: when to use it (``base``, which falls back to
``quant`` where ``supports`` says no) and the finiteness check (the caller reads one flag
per call instead of one per tensor).

Why: the torch path makes about ten passes over float32 temporaries and one host sync per
tensor; at 7B shapes it reaches a small fraction of the GPU's copy bandwidth
(docs/PERFORMANCE.md). Keys and values share one launch (a grid over both halves of the
table) because at 7B a call is only about 0.13 ms of GPU work and each launch's ramp and
tail cost a few percent of it. Importing this module needs Triton; ``base`` treats
ImportError as "use torch".
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# (key tokens per program, value tokens per program, warps) of each kernel and bit width, one
# program per tile: what bench/gpu_codec.py --sweep picked at 7B and 14B. The widths differ
# at encode: at 32 key tokens the 8-bit launch ran 1.7 to 2.4x slower than at 64, the 4-bit
# one 6% faster (bench/results/gpu_codec.json, "sweep").
LAUNCH = {"encode": {8: (64, 32, 4), 4: (32, 32, 2)}, "decode": {8: (32, 32, 2), 4: (32, 32, 4)}}
# Alignment of every encoded tensor's start (``supports`` checks it; the kernel relies on it).
ALIGN_BYTES = 16
# Address tables kept on the device, by the addresses they hold (see ``_table``).
TABLE_CACHE_SIZE = 64


# Triton's CPU interpreter (TRITON_INTERPRET=1) runs these kernels on CPU tensors: slow,
# but it lets machines without a GPU check the kernels against the torch path.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def device_ok(device: torch.device) -> bool:
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


def shape_ok(shape, group_size: int) -> bool:
    """Power-of-two head_dim and group size, and the group size divides head_dim (value
    groups run along channels and never straddle tokens)."""
    head_dim = shape[-1]
    return (len(shape) == 3 and head_dim >= 2 and _power_of_two(head_dim)
            and _power_of_two(group_size) and head_dim % group_size == 0)


def supports(tensors, group_size: int) -> bool:
    """Whether these ``[heads, tokens, head_dim]`` tensors (keys and values) can be encoded
    together here: contiguous bf16 of one shape on one device that ``device_ok`` accepts,
    each starting on a 16-byte boundary (the encoder promises Triton that alignment)."""
    if not tensors:
        return False
    first = tensors[0]
    return (device_ok(first.device) and shape_ok(first.shape, group_size)
            and all(t.dtype == torch.bfloat16 and t.is_contiguous() and t.shape == first.shape
                    and t.device == first.device and t.data_ptr() % ALIGN_BYTES == 0
                    for t in tensors))


_tables: dict[tuple, torch.Tensor] = {}


def _table(tensors) -> torch.Tensor:
    """int64 addresses of ``tensors``, on their device.

    Memoized by the addresses themselves: a table's content is a function of its key, so a
    hit is never stale, and a repeated layout (the caching allocator hands the same blocks
    to the next request of the same size) costs no host-to-device copy and no host work.
    """
    device = tensors[0].device
    key = (device, *(t.data_ptr() for t in tensors))
    table = _tables.get(key)
    if table is None:
        if len(_tables) >= TABLE_CACHE_SIZE:
            _tables.pop(next(iter(_tables)))
        table = _tables[key] = torch.tensor(key[1:], dtype=torch.int64, device=device)
    return table


@triton.jit
def _flag_non_finite(flag_ptr, step, zero, valid):
    # A program that met a NaN/inf scale or zero writes 1 (every writer writes the same
    # value, so no atomic is needed: the flag may live in pinned host memory, where PCIe
    # atomics are not a given). The caller reads one flag for the whole call.
    finite = (tl.abs(step) < float("inf")) & (tl.abs(zero) < float("inf"))
    bad = tl.max(tl.where(valid & (finite == 0), 1, 0))
    if bad > 0:
        tl.store(flag_ptr, 1)


@triton.jit
def _scale_zero(lo, hi, scale_factor):
    """fp16 scale and zero of groups with range [lo, hi], the fp32 step, and the inverse and
    bias that turn x into code + 0.5 in one fma (``quant.quantize``'s arithmetic)."""
    scale = ((hi - lo) * scale_factor).to(tl.float16)
    zero = lo.to(tl.float16)
    step = scale.to(tl.float32)
    inverse = tl.where(step > 0, tl.math.div_rn(1.0, step), 0.0)
    return scale, zero, step, inverse, 0.5 - zero.to(tl.float32) * inverse


@triton.jit
def _group_range(x3, rows3):
    """Min and max over axis 1 (the tokens of a group) of ``[groups, GS, C]``, ignoring
    rows past the prompt."""
    return (tl.min(tl.where(rows3, x3, float("inf")), axis=1),
            tl.max(tl.where(rows3, x3, float("-inf")), axis=1))


@triton.jit
def _encode_key_tile(src, codes_ptr, scales_ptr, zeros_ptr, flag_ptr, layer, head, tb, H, T, G,
                     scale_factor, D: tl.constexpr, GS: tl.constexpr, QMAX: tl.constexpr,
                     PACK: tl.constexpr, BT: tl.constexpr):
    # BT tokens (BT // GS token groups) of one head of one layer, all D channels.
    NGT: tl.constexpr = BT // GS
    t = tb * BT + tl.arange(0, BT)
    offs = (head * T + t)[:, None].to(tl.int64) * D + tl.arange(0, D)[None, :]
    x = tl.reshape(tl.load(src + offs, mask=(t < T)[:, None], other=0.0).to(tl.float32),
                   (NGT, GS, D))
    t3 = (tb * BT + tl.arange(0, NGT)[:, None] * GS + tl.arange(0, GS)[None, :])[:, :, None]
    lo, hi = _group_range(x, t3 < T)
    scale, zero, step, inverse, bias = _scale_zero(lo, hi, scale_factor)
    g = tb * NGT + tl.arange(0, NGT)
    valid = (g < G)[:, None]
    soffs = ((layer * H + head) * G + g)[:, None] * D + tl.arange(0, D)[None, :]
    tl.store(scales_ptr + soffs, scale, mask=valid)
    tl.store(zeros_ptr + soffs, zero, mask=valid)
    _flag_non_finite(flag_ptr, step, zero.to(tl.float32), valid)
    codes = tl.minimum(tl.maximum(tl.math.fma(x, inverse[:, None, :], bias[:, None, :]), 0.0),
                       QMAX).to(tl.uint8)
    # Which shape to store from was chosen by timing (bench/gpu_codec.py --sweep, 14B):
    # int8 codes stored as the [groups, GS, D] tile they were computed in ran 3x faster than
    # after a reshape to [BT, D]; 4-bit packing after that reshape was the fast variant.
    if PACK:
        even, odd = tl.split(tl.reshape(codes, (BT, D // 2, 2)))
        poffs = layer * (H * T * D // 2) + (head * T + t)[:, None].to(tl.int64) * (D // 2) \
            + tl.arange(0, D // 2)[None, :]
        tl.store(codes_ptr + poffs, even | (odd << 4), mask=(t < T)[:, None])
    else:
        offs3 = layer * (H * T * D) + (head * T + t3).to(tl.int64) * D \
            + tl.arange(0, D)[None, None, :]
        tl.store(codes_ptr + offs3, codes, mask=t3 < T)


@triton.jit
def _encode_value_tile(src, src32, codes_ptr, scales_ptr, zeros_ptr, flag_ptr, layer, head, tb,
                       H, T, scale_factor, D: tl.constexpr, GS: tl.constexpr,
                       QMAX: tl.constexpr, PACK: tl.constexpr, BT: tl.constexpr):
    # BT tokens of one head of one layer; groups of GS channels per token.
    NG: tl.constexpr = D // GS
    t = tb * BT + tl.arange(0, BT)
    rows = t < T
    if PACK:
        # Each 4-byte word holds channels 2i (low half) and 2i+1: a bf16 is the top half of
        # its fp32, so shifts give both as fp32 tiles [BT, NG, GS/2] whose codes pack into
        # one byte in place (reshape+split variants ran 3x slower in the sweep).
        woffs = (head * T + t)[:, None].to(tl.int64) * (D // 2) + tl.arange(0, D // 2)[None, :]
        words = tl.load(src32 + woffs, mask=rows[:, None], other=0)
        xe = tl.reshape((words << 16).to(tl.float32, bitcast=True), (BT, NG, GS // 2))
        xo = tl.reshape((words & -65536).to(tl.float32, bitcast=True), (BT, NG, GS // 2))
        lo = tl.minimum(tl.min(xe, axis=2), tl.min(xo, axis=2))
        hi = tl.maximum(tl.max(xe, axis=2), tl.max(xo, axis=2))
    else:
        offs = (head * T + t)[:, None].to(tl.int64) * D + tl.arange(0, D)[None, :]
        x = tl.reshape(tl.load(src + offs, mask=rows[:, None], other=0.0).to(tl.float32),
                       (BT, NG, GS))
        lo = tl.min(x, axis=2)
        hi = tl.max(x, axis=2)
    scale = ((hi - lo) * scale_factor).to(tl.float16)
    zero = lo.to(tl.float16)
    soffs = ((layer * H + head) * T + t)[:, None] * NG + tl.arange(0, NG)[None, :]
    tl.store(scales_ptr + soffs, scale, mask=rows[:, None])
    tl.store(zeros_ptr + soffs, zero, mask=rows[:, None])
    step = scale.to(tl.float32)
    _flag_non_finite(flag_ptr, step, zero.to(tl.float32), rows[:, None])
    inverse = tl.where(step > 0, tl.math.div_rn(1.0, step), 0.0)
    bias = (0.5 - zero.to(tl.float32) * inverse)[:, :, None]
    inverse = inverse[:, :, None]
    if PACK:
        ce = tl.minimum(tl.maximum(tl.math.fma(xe, inverse, bias), 0.0), QMAX).to(tl.uint8)
        co = tl.minimum(tl.maximum(tl.math.fma(xo, inverse, bias), 0.0), QMAX).to(tl.uint8)
        tl.store(codes_ptr + layer * (H * T * D // 2) + woffs,
                 tl.reshape(ce | (co << 4), (BT, D // 2)), mask=rows[:, None])
    else:
        codes = tl.minimum(tl.maximum(tl.math.fma(x, inverse, bias), 0.0), QMAX).to(tl.uint8)
        tl.store(codes_ptr + layer * (H * T * D) + offs, tl.reshape(codes, (BT, D)),
                 mask=rows[:, None])


@triton.jit
def _tile(tile, key_tiles, key_blocks, value_blocks, H):
    """(is a key tile, layer, head, token block) of tile number ``tile``: the key tiles of
    every layer and head first, then the value tiles; a head's blocks are consecutive."""
    is_key = tile < key_tiles
    rest = tl.where(is_key, tile, tile - key_tiles)
    blocks = tl.where(is_key, key_blocks, value_blocks)
    lh = rest // blocks
    return is_key, (lh // H).to(tl.int64), lh % H, rest % blocks


@triton.jit
def _encode_kv(table, kcodes, kscales, kzeros, vcodes, vscales, vzeros, flag_ptr, L, H, T, G,
               key_blocks, value_blocks, scale_factor, D: tl.constexpr, GS: tl.constexpr,
               QMAX: tl.constexpr, PACK: tl.constexpr, BTK: tl.constexpr, BTV: tl.constexpr):
    # One program per tile. ``table``: the L key addresses, then the L value addresses.
    is_key, layer, head, block = _tile(tl.program_id(0), L * H * key_blocks, key_blocks,
                                       value_blocks, H)
    if is_key:
        src = tl.load(table + layer).to(tl.pointer_type(tl.bfloat16))
        _encode_key_tile(src, kcodes, kscales, kzeros, flag_ptr, layer, head, block, H, T, G,
                         scale_factor, D, GS, QMAX, PACK, BTK)
    else:
        # An address read from the table has no known alignment, so Triton would load the
        # value tile one scalar at a time (16 cache lines per 4-byte warp load); the
        # promise of 16 bytes (``supports`` checks it) makes each load a 16-byte vector:
        # the 4-bit value half went from 0.79 to 0.99 of its copy floor at 7B
        # (docs/PERFORMANCE.md). The key tile keeps scalar loads: with the promise Triton
        # spreads a group's tokens over threads and warps, and the key half's best time
        # was 10% slower than without it (2 to 5x at most launch shapes).
        address = tl.load(table + L + layer)
        _encode_value_tile(tl.multiple_of(address.to(tl.pointer_type(tl.bfloat16)), 16),
                           tl.multiple_of(address.to(tl.pointer_type(tl.int32)), 16),
                           vcodes, vscales, vzeros, flag_ptr, layer, head, block, H, T,
                           scale_factor, D, GS, QMAX, PACK, BTV)


@triton.jit
def _load_codes(codes, head, t, rows, T, D: tl.constexpr, R: tl.constexpr, PACK: tl.constexpr):
    """Codes ``[R, D]`` (uint8 values 0..QMAX) of tokens ``t`` of one head."""
    if PACK:
        d2 = tl.arange(0, D // 2)
        packed = tl.load(codes + (head * T + t)[:, None].to(tl.int64) * (D // 2) + d2[None, :],
                         mask=rows[:, None], other=0)
        return tl.reshape(tl.join(packed & 0x0F, packed >> 4), (R, D))
    d = tl.arange(0, D)
    return tl.load(codes + (head * T + t)[:, None].to(tl.int64) * D + d[None, :],
                   mask=rows[:, None], other=0)


@triton.jit
def _layer_parts(table, L, layer, first: tl.constexpr):
    """Codes, scales and zeros of ``layer`` from entries ``first``..``first + 2`` (each L
    long) of the decode table."""
    return (tl.load(table + first * L + layer).to(tl.pointer_type(tl.uint8)),
            tl.load(table + (first + 1) * L + layer).to(tl.pointer_type(tl.float16)),
            tl.load(table + (first + 2) * L + layer).to(tl.pointer_type(tl.float16)))


@triton.jit
def _decode_key_tile(codes, scales, zeros, out_ptr, layer, head, tb, H, T, G,
                     D: tl.constexpr, GS: tl.constexpr, PACK: tl.constexpr, BT: tl.constexpr):
    NGT: tl.constexpr = BT // GS
    t = tb * BT + tl.arange(0, BT)
    rows = t < T
    d = tl.arange(0, D)
    c = tl.reshape(_load_codes(codes, head, t, rows, T, D, BT, PACK).to(tl.float32), (NGT, GS, D))
    g = tb * NGT + tl.arange(0, NGT)
    soffs = (head * G + g)[:, None] * D + d[None, :]
    s = tl.load(scales + soffs, mask=(g < G)[:, None], other=0.0).to(tl.float32)
    z = tl.load(zeros + soffs, mask=(g < G)[:, None], other=0.0).to(tl.float32)
    out = tl.reshape(tl.math.fma(c, s[:, None, :], z[:, None, :]), (BT, D)).to(tl.bfloat16)
    offs = layer * H * T * D + (head * T + t)[:, None].to(tl.int64) * D + d[None, :]
    tl.store(out_ptr + offs, out, mask=rows[:, None])


@triton.jit
def _decode_value_tile(codes, scales, zeros, out_ptr, layer, head, tb, H, T,
                       D: tl.constexpr, GS: tl.constexpr, PACK: tl.constexpr, BT: tl.constexpr):
    NG: tl.constexpr = D // GS
    t = tb * BT + tl.arange(0, BT)
    rows = t < T
    c = tl.reshape(_load_codes(codes, head, t, rows, T, D, BT, PACK).to(tl.float32), (BT, NG, GS))
    soffs = (head * T + t)[:, None].to(tl.int64) * NG + tl.arange(0, NG)[None, :]
    s = tl.load(scales + soffs, mask=rows[:, None], other=0.0).to(tl.float32)
    z = tl.load(zeros + soffs, mask=rows[:, None], other=0.0).to(tl.float32)
    out = tl.reshape(tl.math.fma(c, s[:, :, None], z[:, :, None]), (BT, D)).to(tl.bfloat16)
    d = tl.arange(0, D)
    offs = layer * H * T * D + (head * T + t)[:, None].to(tl.int64) * D + d[None, :]
    tl.store(out_ptr + offs, out, mask=rows[:, None])


@triton.jit
def _decode_kv(table, kout, vout, L, H, T, G, key_blocks, value_blocks, D: tl.constexpr,
               GS: tl.constexpr, PACK: tl.constexpr, BTK: tl.constexpr, BTV: tl.constexpr):
    # Tiles as ``_encode_kv``'s. ``table``: key codes, key scales, key zeros, value codes,
    # value scales, value zeros, each L addresses long.
    is_key, layer, head, block = _tile(tl.program_id(0), L * H * key_blocks, key_blocks,
                                       value_blocks, H)
    if is_key:
        codes, scales, zeros = _layer_parts(table, L, layer, 0)
        _decode_key_tile(codes, scales, zeros, kout, layer, head, block, H, T, G,
                         D, GS, PACK, BTK)
    else:
        codes, scales, zeros = _layer_parts(table, L, layer, 3)
        _decode_value_tile(codes, scales, zeros, vout, layer, head, block, H, T,
                           D, GS, PACK, BTV)


def _blocks(tokens: int, block: int) -> int:
    return -(-tokens // block)


def _launch_shape(stage: str, bits: int, tokens: int, layers: int, heads: int,
                  group_size: int):
    """(key tokens per program, value tokens per program, warps, key blocks, value blocks,
    grid) of ``stage`` ("encode" or "decode") at ``bits`` from ``LAUNCH``: one program per
    tile, the key tiles of every layer and head first, then the value tiles."""
    block_keys, block_values, warps = LAUNCH[stage][bits]
    block_keys = max(block_keys, group_size)
    key_blocks, value_blocks = _blocks(tokens, block_keys), _blocks(tokens, block_values)
    return (block_keys, block_values, warps, key_blocks, value_blocks,
            (layers * heads * (key_blocks + value_blocks),))


def quantize_kv(keys, values, bits: int, group_size: int, scale_factor: float,
                flag: torch.Tensor, only: str | None = None):
    """Codes, scales and zeros of every layer's keys and of every layer's values, each
    stacked on a new leading layer axis, from one launch.

    Returns ``(key_codes, key_scales, key_zeros), (value_codes, value_scales, value_zeros)``.
    Codes are ``[layers, heads, tokens, head_dim]`` uint8, or ``[layers, count // 2]`` when
    4-bit; scales and zeros are fp16 with the grouped axis shrunk (tokens for keys,
    channels for values), as ``quant.quantize``. ``scale_factor`` is the slack over ``qmax``
    that ``quant`` uses. ``flag`` (one int32, zero; on the device or in pinned host memory)
    becomes nonzero if any scale or zero is not finite, once the launch has completed.
    ``only`` ("keys" or "values") launches that half's tiles alone and leaves the other
    half's outputs unwritten: it times each half of the kernel (bench/gpu_codec_halves.py).
    """
    if bits not in (4, 8):
        raise ValueError(f"Triton kernels quantize to 8 or 4 bits, not {bits}")
    if only not in (None, "keys", "values"):
        raise ValueError(f"only= takes 'keys', 'values' or None, not {only!r}")
    if len(keys) != len(values):
        raise ValueError(f"{len(keys)} key layers but {len(values)} value layers")
    layers = len(keys)
    heads, tokens, head_dim = keys[0].shape
    device = keys[0].device
    pack = bits == 4
    count = heads * tokens * head_dim
    codes = torch.empty((2, layers, count // 2) if pack else (2, layers, heads, tokens, head_dim),
                        dtype=torch.uint8, device=device)
    groups = -(-tokens // group_size)
    key_side = (layers, heads, groups, head_dim)
    value_side = (layers, heads, tokens, head_dim // group_size)
    key_scales, key_zeros = (torch.empty(key_side, dtype=torch.float16, device=device)
                             for _ in range(2))
    value_scales, value_zeros = (torch.empty(value_side, dtype=torch.float16, device=device)
                                 for _ in range(2))
    block_keys, block_values, warps, key_blocks, value_blocks, grid = _launch_shape(
        "encode", bits, tokens, layers, heads, group_size)
    if only == "keys":  # the key tiles come first: a shorter grid stops before the values
        grid = (layers * heads * key_blocks,)
    elif only == "values":  # no key tiles: every program's tile is a value tile
        key_blocks, grid = 0, (layers * heads * value_blocks,)
    _encode_kv[grid](
        _table(list(keys) + list(values)), codes[0], key_scales, key_zeros, codes[1],
        value_scales, value_zeros, flag, layers, heads, tokens, groups, key_blocks, value_blocks,
        scale_factor, D=head_dim, GS=group_size, QMAX=(1 << bits) - 1, PACK=pack,
        BTK=block_keys, BTV=block_values, num_warps=warps)
    return (codes[0], key_scales, key_zeros), (codes[1], value_scales, value_zeros)


def dequantize_kv(key_parts, value_parts, shape: tuple[int, int, int], bits: int,
                  group_size: int) -> torch.Tensor:
    """bf16 ``[2, layers, heads, tokens, head_dim]`` (keys, then values) from one launch.

    ``key_parts`` and ``value_parts`` are ``(codes, scales, zeros)``, each a sequence of
    per-layer tensors in ``quant``'s layout, on the device.
    """
    heads, tokens, head_dim = shape
    layers = len(key_parts[0])
    device = key_parts[0][0].device
    out = torch.empty((2, layers, heads, tokens, head_dim), dtype=torch.bfloat16, device=device)
    table = _table([t for parts in (*key_parts, *value_parts) for t in parts])
    block_keys, block_values, warps, key_blocks, value_blocks, grid = _launch_shape(
        "decode", bits, tokens, layers, heads, group_size)
    _decode_kv[grid](
        table, out[0], out[1], layers, heads, tokens, -(-tokens // group_size), key_blocks,
        value_blocks, D=head_dim, GS=group_size, PACK=bits == 4, BTK=block_keys,
        BTV=block_values, num_warps=warps)
    return out
