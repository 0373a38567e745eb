"""Triton kernels for the KIVI group quantization of whole snapshots, one launch per call.

What lives here: fused encode (min/max, fp16 scale and zero, codes, 4-bit packing) and
decode (unpacking, code * scale + zero, bf16 output) of the keys AND values of many layers
in one launch each (the encoder also copies a mixed snapshot's bf16 layers in that launch),
keys grouped along tokens and values along channels, in exactly the layout of ``quant`` (codes ``[heads, tokens, head_dim]``, 4-bit codes flat with the low
nibble first, scales and zeros with the grouped axis shrunk). The encoded parts of every
layer live in one byte buffer, in the wire's order, found through a table of byte offsets
(``base.part_spans``); a snapshot's layers are found through a table of their addresses, so
neither side stacks or copies. ``Encoder`` and ``Decoder`` hold one layout's launch, made
once per layout (``base.Plan``), and launch the compiled kernel directly after the first
call. Also here: the launch shape of each kernel, chosen per device and shape at first use
(``launch_shape``), and the pinned flags through which the encoder
reports non-finite input without the caller waiting for the GPU (``FlagRing``). What it
knows: the arithmetic of ``quant.quantize``/``quant.dequantize``, step for step (fp32
min/max, the same scale slack, ``fma`` where torch's ``addcmul`` contracts to one), so the
codes and scales agree with the torch path. What it leaves to others: when to use it
(``base``, which falls back to ``quant`` where ``supports`` says no) and what to do about a
non-finite snapshot.

Why: the torch path makes about ten passes over float32 temporaries and one host sync per
tensor; at 7B shapes it reaches a small fraction of the GPU's copy bandwidth
(docs/PERFORMANCE.md). Keys and values share one launch (a grid over both halves of the
table) because at 7B a call is only about 0.1 ms of GPU work and each launch's ramp and
tail cost a few percent of it; for the same reason a call does no host work it can avoid
(no sync, no per-layer tensors, nothing per call that a layout fixes): whole-call wall time
is host time before the launch plus the kernel (issue 15). Importing this module needs Triton; ``base`` treats
ImportError as "use torch".
"""

from __future__ import annotations

import operator
import os
import threading
import weakref

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Launch shapes tried at first use on each device, per kernel and bit width: (key tokens per
# program, value tokens per program, warps), one program per tile. The first of each list is
# what the H100 sweep picked (bench/results/gpu_codec.json); the others were within 10% of it
# on the H100 at 7B or 14B for one half of the kernel (gpu_codec_halves_explore.json), so one
# of them may suit a card with other memory (the H200's picks differed: issue 15).
CANDIDATES = {
    "encode": {8: ((64, 32, 4), (64, 64, 4), (32, 16, 2), (32, 64, 4), (64, 16, 2)),
               4: ((32, 32, 2), (32, 32, 4), (32, 64, 4), (32, 16, 2), (64, 64, 4))},
    "decode": {8: ((32, 32, 2), (32, 16, 2), (32, 32, 4), (64, 32, 4), (64, 64, 4)),
               4: ((32, 32, 4), (32, 32, 2), (32, 16, 2), (64, 32, 4), (64, 64, 4))},
}
# Launch shapes forced by (stage, bits), for benchmarks that time one shape; empty: tune.
LAUNCH: dict[tuple[str, int], tuple[int, int, int]] = {}
# Timed launches per candidate at first use (after one that compiles it).
TUNE_REPEATS = 10
# Alignment of every input layer's start (``supports`` checks it; the kernel relies on it),
# and of the encoded buffer's parts where the layout allows it (``base.Plan``).
ALIGN_BYTES = 16
# Address tables kept on the device, by the addresses they hold (see ``address_table``).
TABLE_CACHE_SIZE = 64
# Encodes whose finiteness flag may be unread at once (``FlagRing``).
FLAG_SLOTS = 256


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


_DTYPE = operator.attrgetter("dtype")


def supports(tensors, group_size: int) -> bool:
    """Whether these ``[heads, tokens, head_dim]`` tensors (the layers of one snapshot,
    which ``KVSnapshot`` guarantees to share a shape) can be encoded together here: the
    first's shape fits the kernels, and each is contiguous bf16 of as many elements on one
    device that ``device_ok`` accepts, starting on a 16-byte boundary (the encoder
    promises Triton that alignment). Those are what keeps every access in bounds.

    Runs before every GPU encode, over 56 to 96 tensors: each check is a ``map`` over a C
    getter, not a Python expression per tensor (24 to 15 us per 7B call on the dev box;
    issue 15: host time is the wall time)."""
    if not tensors:
        return False
    first = tensors[0]
    count, where = first.numel(), first.get_device()
    return (device_ok(first.device) and shape_ok(first.shape, group_size)
            and all(map(torch.Tensor.is_contiguous, tensors))
            and set(map(_DTYPE, tensors)) == {torch.bfloat16}
            and all(map(count.__eq__, map(torch.Tensor.numel, tensors)))
            and all(map(where.__eq__, map(torch.Tensor.get_device, tensors)))
            and not any(map(ALIGN_BYTES.__rmod__, map(torch.Tensor.data_ptr, tensors))))


_tables: dict[tuple, torch.Tensor] = {}


def address_table(device: torch.device, tensors) -> torch.Tensor:
    """int64 addresses of ``tensors``, on ``device``.

    Memoized by the addresses themselves: a table's content is a function of its key, so a
    hit is never stale, and a repeated layout (the caching allocator hands the same blocks
    to the next request of the same size) costs no host-to-device copy and no host work.
    A miss copies through pinned memory without waiting (a pageable copy would wait for
    the stream, i.e. for every launch queued before it).
    """
    key = (device, *map(torch.Tensor.data_ptr, tensors))
    table = _tables.get(key)
    if table is None:
        if len(_tables) >= TABLE_CACHE_SIZE:
            _tables.pop(next(iter(_tables)), None)
        host = torch.tensor(key[1:], dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
        table = _tables[key] = host.to(device, non_blocking=True)
    return table


class PendingCheck:
    """Whether one encode launch met a non-finite scale or zero: known once the launch has
    completed; ``failed`` waits for that (a no-op when it already has)."""

    def __init__(self, ring: FlagRing, slot: int):
        self._ring, self._slot, self._failed = ring, slot, None

    def _settle(self) -> None:  # the ring's lock is held
        if self._failed is None:
            self._failed = self._ring._read(self._slot)

    def failed(self) -> bool:
        with self._ring.lock:
            self._settle()
        return self._failed


class FlagRing:
    """Int32 flags the encode kernel writes through, one per call in flight; in pinned host
    memory on a GPU, so no fill kernel runs before a launch, no copy after it, and the
    caller learns the outcome when it looks (``PendingCheck``), not by waiting in the call.

    A slot is reused ``FLAG_SLOTS`` calls later: if its check was not read by then, it is
    read first (waiting for that launch, which has long completed in practice), so no
    outcome is lost and no late write lands in a reused slot.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.lock = threading.Lock()
        cuda = device.type == "cuda"
        self.values = torch.zeros(FLAG_SLOTS, dtype=torch.int32, pin_memory=cuda)
        self._host = self.values.numpy()  # element access without torch's dispatch
        self._events = [torch.cuda.Event() if cuda else None for _ in range(FLAG_SLOTS)]
        self._used = [False] * FLAG_SLOTS
        self._owners: list = [None] * FLAG_SLOTS
        self._next = 0

    def _read(self, slot: int) -> bool:
        if self._events[slot] is not None:
            self._events[slot].synchronize()
        return bool(self._host[slot])

    def acquire(self) -> tuple[PendingCheck, int]:
        """The check of a zeroed flag for the next launch and its slot (the kernel writes
        ``values[slot]``; ``launched`` takes it)."""
        with self.lock:
            slot = self._next
            self._next = (slot + 1) % FLAG_SLOTS
            owner = self._owners[slot]() if self._owners[slot] is not None else None
            if owner is not None:
                owner._settle()
            elif self._used[slot] and self._events[slot] is not None:
                self._events[slot].synchronize()
            self._host[slot] = 0
            check = PendingCheck(self, slot)
            self._owners[slot] = weakref.ref(check)
            self._used[slot] = True
        return check, slot

    def launched(self, slot: int) -> None:
        """Mark where the launch that writes ``slot`` ends on the current stream."""
        if self._events[slot] is not None:
            self._events[slot].record(torch.cuda.current_stream(self.device))


_rings: dict[torch.device, FlagRing] = {}


def flag_ring(device: torch.device) -> FlagRing:
    ring = _rings.get(device)
    if ring is None:
        ring = _rings[device] = FlagRing(device)
    return ring


@triton.jit
def _flag_non_finite(flag_ptr, step, zero, valid):
    # A program that met a NaN/inf scale or zero writes 1 (every writer writes the same
    # value, so no atomic is needed: the flag lives in pinned host memory, where PCIe
    # atomics are not a given). The caller reads one flag for the whole call.
    finite = (tl.abs(step) < float("inf")) & (tl.abs(zero) < float("inf"))
    bad = tl.max(tl.where(valid & (finite == 0), 1, 0))
    if bad > 0:
        tl.store(flag_ptr, 1)


# Whether products must be rounded apart from the add after them: on a GPU, LLVM contracts
# ``0.5 - zero * inverse`` into one fma, which rounds once where torch (two kernels) rounds
# twice, and the bias then differs in its last bit for a value sitting exactly on a half
# step: 1 to 1,266 codes in 1e8 to 2e8 differed from torch's, every one an exact tie
# (bench/results/issue15/gpu_codec_h100_run1.json). The interpreter rounds each numpy
# product anyway and has no libdevice.
_ROUND_PRODUCTS = tl.constexpr(not INTERPRET)


@triton.jit
def _bias(zero, inverse):
    """0.5 - zero * inverse with the product rounded to fp32 first, as torch computes it."""
    if _ROUND_PRODUCTS:
        return 0.5 - libdevice.mul_rn(zero, inverse)
    else:
        return 0.5 - zero * inverse


@triton.jit
def _scale_zero(lo, hi, scale_factor):
    """fp16 scale and zero of groups with range [lo, hi], the fp32 step, and the inverse and
    bias that turn x into code + 0.5 in one fma (``quant.quantize``'s arithmetic)."""
    scale = ((hi - lo) * scale_factor).to(tl.float16)
    zero = lo.to(tl.float16)
    step = scale.to(tl.float32)
    inverse = tl.where(step > 0, tl.math.div_rn(1.0, step), 0.0)
    return scale, zero, step, inverse, _bias(zero.to(tl.float32), inverse)


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


# Min and max that keep a NaN (``tl.min``/``tl.max`` skip it, as fminf does): a NaN in a
# group must give a NaN scale, which the finiteness flag reports, as torch's ``aminmax``
# does; skipped, the NaN would be encoded silently as code 0.
@triton.jit
def _group_range(x3, rows3):
    """Min and max over axis 1 (the tokens of a group) of ``[groups, GS, C]``, ignoring
    rows past the prompt."""
    return (tl.reduce(tl.where(rows3, x3, float("inf")), 1, _min_nan),
            tl.reduce(tl.where(rows3, x3, float("-inf")), 1, _max_nan))


@triton.jit
def _part(base, offsets, index, L, layer, dtype: tl.constexpr, ALIGN: tl.constexpr):
    """Pointer to part ``index`` (0..5: key codes, scales, zeros, value codes, scales,
    zeros) of quantized layer ``layer`` in the encoded buffer at ``base``."""
    return tl.multiple_of((base + tl.load(offsets + index * L + layer)).to(tl.pointer_type(dtype)),
                          ALIGN)


@triton.jit
def _encode_key_tile(src, codes_ptr, scales_ptr, zeros_ptr, flag_ptr, head, tb, T, G,
                     scale_factor, D: tl.constexpr, GS: tl.constexpr, QMAX: tl.constexpr,
                     PACK: tl.constexpr, BT: tl.constexpr):
    # BT tokens (BT // GS token groups) of one head of one layer, all D channels; the
    # output pointers are that layer's.
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
    soffs = (head * G + g)[:, None] * D + tl.arange(0, D)[None, :]
    tl.store(scales_ptr + soffs, scale, mask=valid)
    tl.store(zeros_ptr + soffs, zero, mask=valid)
    _flag_non_finite(flag_ptr, step, zero.to(tl.float32), valid)
    codes = tl.minimum(tl.maximum(tl.math.fma(x, inverse[:, None, :], bias[:, None, :]), 0.0),
                       QMAX).to(tl.uint8)
    # Which shape to store from was chosen by timing (round 2 sweep at 14B, docs/PERFORMANCE.md):
    # int8 codes stored as the [groups, GS, D] tile they were computed in ran 3x faster than
    # after a reshape to [BT, D]; 4-bit packing after that reshape was the fast variant.
    if PACK:
        even, odd = tl.split(tl.reshape(codes, (BT, D // 2, 2)))
        poffs = (head * T + t)[:, None].to(tl.int64) * (D // 2) + tl.arange(0, D // 2)[None, :]
        tl.store(codes_ptr + poffs, even | (odd << 4), mask=(t < T)[:, None])
    else:
        offs3 = (head * T + t3).to(tl.int64) * D + tl.arange(0, D)[None, None, :]
        tl.store(codes_ptr + offs3, codes, mask=t3 < T)


@triton.jit
def _encode_value_tile(src, src32, codes_ptr, scales_ptr, zeros_ptr, flag_ptr, head, tb,
                       T, scale_factor, D: tl.constexpr, GS: tl.constexpr,
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
        lo = _min_nan(tl.reduce(xe, 2, _min_nan), tl.reduce(xo, 2, _min_nan))
        hi = _max_nan(tl.reduce(xe, 2, _max_nan), tl.reduce(xo, 2, _max_nan))
    else:
        offs = (head * T + t)[:, None].to(tl.int64) * D + tl.arange(0, D)[None, :]
        x = tl.reshape(tl.load(src + offs, mask=rows[:, None], other=0.0).to(tl.float32),
                       (BT, NG, GS))
        lo = tl.reduce(x, 2, _min_nan)
        hi = tl.reduce(x, 2, _max_nan)
    scale = ((hi - lo) * scale_factor).to(tl.float16)
    zero = lo.to(tl.float16)
    soffs = (head * T + t)[:, None] * NG + tl.arange(0, NG)[None, :]
    tl.store(scales_ptr + soffs, scale, mask=rows[:, None])
    tl.store(zeros_ptr + soffs, zero, mask=rows[:, None])
    step = scale.to(tl.float32)
    _flag_non_finite(flag_ptr, step, zero.to(tl.float32), rows[:, None])
    inverse = tl.where(step > 0, tl.math.div_rn(1.0, step), 0.0)
    bias = _bias(zero.to(tl.float32), inverse)[:, :, None]
    inverse = inverse[:, :, None]
    if PACK:
        ce = tl.minimum(tl.maximum(tl.math.fma(xe, inverse, bias), 0.0), QMAX).to(tl.uint8)
        co = tl.minimum(tl.maximum(tl.math.fma(xo, inverse, bias), 0.0), QMAX).to(tl.uint8)
        tl.store(codes_ptr + woffs, tl.reshape(ce | (co << 4), (BT, D // 2)), mask=rows[:, None])
    else:
        codes = tl.minimum(tl.maximum(tl.math.fma(x, inverse, bias), 0.0), QMAX).to(tl.uint8)
        tl.store(codes_ptr + offs, tl.reshape(codes, (BT, D)), mask=rows[:, None])


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
def _copy_raw_tile(src, dst, block, N, B: tl.constexpr):
    """Bytes [block * B, block * B + B) of the N at ``src`` to ``dst``."""
    offs = block.to(tl.int64) * B + tl.arange(0, B)
    inside = offs < N
    tl.store(dst + offs, tl.load(src + offs, mask=inside), mask=inside)


# Layer and head counts are not specialized on (a compile for each divisibility by 16 would
# buy nothing: they only pick a tile's layer and head), nor the flag's slot (it changes
# every call). The token count is: knowing it a multiple of 16 lets Triton drop per-row
# mask work (120 of 1,950 PTX instructions of the 8-bit encoder, offline compile for sm_90).
SIZES = ["L", "H"]


@triton.jit(do_not_specialize=SIZES + ["R", "slot"])
def _encode_kv(inputs, base, offsets, flags, slot, L, H, T, G, key_blocks, value_blocks, R,
               raw_blocks, raw_bytes, scale_factor, D: tl.constexpr, GS: tl.constexpr,
               QMAX: tl.constexpr, PACK: tl.constexpr, BTK: tl.constexpr, BTV: tl.constexpr,
               ALIGN: tl.constexpr, BRAW: tl.constexpr):
    # One program per tile. ``inputs``: the L quantized layers' key addresses, their value
    # addresses, then the R raw (bf16) layers' key and value addresses; ``offsets``: [6, L]
    # byte offsets of each quantized layer's parts from ``base``, then the raw layers' key
    # and value data offsets. Raw layers are copied by the last tiles, ``BRAW`` bytes each,
    # so a mixed snapshot is still one launch (with torch's copies after the launch, 7B
    # mixed_int4 encode was 0.78 of its floor: issue 15).
    tile = tl.program_id(0)
    key_tiles = L * H * key_blocks
    quantized_tiles = key_tiles + L * H * value_blocks
    if tile >= quantized_tiles:
        rest = tile - quantized_tiles
        raw = rest // raw_blocks
        src = tl.load(inputs + 2 * L + raw).to(tl.pointer_type(tl.uint8))
        _copy_raw_tile(tl.multiple_of(src, 16),
                       tl.multiple_of(base + tl.load(offsets + 6 * L + raw), ALIGN),
                       rest % raw_blocks, raw_bytes, BRAW)
    else:
        _encode_quantized_tile(inputs, base, offsets, flags + slot, tile, key_tiles, L, H, T,
                               G, key_blocks, value_blocks, scale_factor, D, GS, QMAX, PACK,
                               BTK, BTV, ALIGN)


@triton.jit
def _encode_quantized_tile(inputs, base, offsets, flag_ptr, tile, key_tiles, L, H, T, G,
                           key_blocks, value_blocks, scale_factor, D: tl.constexpr,
                           GS: tl.constexpr, QMAX: tl.constexpr, PACK: tl.constexpr,
                           BTK: tl.constexpr, BTV: tl.constexpr, ALIGN: tl.constexpr):
    is_key, layer, head, block = _tile(tile, key_tiles, key_blocks, value_blocks, H)
    if is_key:
        src = tl.load(inputs + layer).to(tl.pointer_type(tl.bfloat16))
        _encode_key_tile(src, _part(base, offsets, 0, L, layer, tl.uint8, ALIGN),
                         _part(base, offsets, 1, L, layer, tl.float16, ALIGN),
                         _part(base, offsets, 2, L, layer, tl.float16, ALIGN), flag_ptr,
                         head, block, T, G, scale_factor, D, GS, QMAX, PACK, BTK)
    else:
        # An address read from the table has no known alignment, so Triton would load the
        # value tile one scalar at a time (16 cache lines per 4-byte warp load); the
        # promise of 16 bytes (``supports`` checks it) makes each load a 16-byte vector:
        # the 4-bit value half went from 0.79 to 0.99 of its copy floor at 7B
        # (docs/PERFORMANCE.md). The key tile keeps scalar loads: with the promise Triton
        # spreads a group's tokens over threads and warps, and the key half's best time
        # was 10% slower than without it (2 to 5x at most launch shapes).
        address = tl.load(inputs + L + layer)
        _encode_value_tile(tl.multiple_of(address.to(tl.pointer_type(tl.bfloat16)), 16),
                           tl.multiple_of(address.to(tl.pointer_type(tl.int32)), 16),
                           _part(base, offsets, 3, L, layer, tl.uint8, ALIGN),
                           _part(base, offsets, 4, L, layer, tl.float16, ALIGN),
                           _part(base, offsets, 5, L, layer, tl.float16, ALIGN), flag_ptr,
                           head, block, T, scale_factor, D, GS, QMAX, PACK, BTV)


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


@triton.jit(do_not_specialize=SIZES)
def _decode_kv(base, offsets, kout, L, H, T, G, key_blocks, value_blocks, D: tl.constexpr,
               GS: tl.constexpr, PACK: tl.constexpr, BTK: tl.constexpr, BTV: tl.constexpr):
    # Tiles as ``_encode_kv``'s; parts found as there. Their loads stay scalar (no alignment
    # promise): decode met its goal without one (docs/PERFORMANCE.md) and was not retimed.
    # ``kout``: [2, L, H, T, D], keys then values (one argument: no view made per call).
    is_key, layer, head, block = _tile(tl.program_id(0), L * H * key_blocks, key_blocks,
                                       value_blocks, H)
    vout = kout + L.to(tl.int64) * H * T * D
    if is_key:
        _decode_key_tile(_part(base, offsets, 0, L, layer, tl.uint8, 1),
                         _part(base, offsets, 1, L, layer, tl.float16, 1),
                         _part(base, offsets, 2, L, layer, tl.float16, 1), kout, layer, head,
                         block, H, T, G, D, GS, PACK, BTK)
    else:
        _decode_value_tile(_part(base, offsets, 3, L, layer, tl.uint8, 1),
                           _part(base, offsets, 4, L, layer, tl.float16, 1),
                           _part(base, offsets, 5, L, layer, tl.float16, 1), vout, layer, head,
                           block, H, T, D, GS, PACK, BTV)


def _blocks(tokens: int, block: int) -> int:
    return -(-tokens // block)


def _jit_launch(kernel, grid: int, args: tuple, constants: dict, warps: int):
    """``kernel[(grid,)](*args, **constants, num_warps=warps)`` through Triton's JIT, and a
    function ``run(stream, *args)`` that launches the same compiled kernel again on the
    same grid with arguments of the same specialization (None under the interpreter).

    Triton's JIT binds the arguments, builds its specialization key and checks globals on
    every call: tens of microseconds of host time, against about 0.1 ms of GPU work per
    call at 7B shapes (issue 15). ``Encoder`` and ``Decoder`` keep ``run`` per launch
    shape and per alignment of the one tensor argument whose alignment can change (the
    encoded buffer); every other argument that Triton specializes on (integers being 1, a
    multiple of 16 or past 32 bits, the tables' and flags' alignment) is fixed per layout.
    """
    compiled = kernel[(grid,)](*args, **constants, num_warps=warps)
    if INTERPRET:
        return None
    launch = compiled[(grid, 1, 1)]
    tail = tuple(constants.values())  # the compiled launcher takes the constexprs too
    return lambda stream, *call_args: launch(*call_args, *tail, stream=stream)


_names: dict[torch.device, str] = {}
_tuned: dict[tuple, tuple[int, int, int]] = {}


def _device_name(device: torch.device) -> str:
    name = _names.get(device)
    if name is None:
        name = _names[device] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                                 else "Triton interpreter")
    return name


def tuned() -> dict[tuple, tuple[int, int, int]]:
    """The launch shapes chosen so far: (device name, stage, bits, layers, heads, token
    bucket, head_dim, group size) -> (key tokens, value tokens, warps)."""
    return dict(_tuned)


def _fastest(candidates, device: torch.device, launch) -> tuple[int, int, int]:
    """The candidate whose ``TUNE_REPEATS`` back-to-back launches take the least GPU time."""
    if device.type != "cuda":  # the interpreter: its timings say nothing about a GPU
        return candidates[0]
    stream = torch.cuda.current_stream(device)
    times = {}
    for shape in candidates:
        launch(shape)  # compiles it (once per process; Triton caches it on disk too)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(TUNE_REPEATS):
            launch(shape)
        end.record(stream)
        end.synchronize()
        times[shape] = start.elapsed_time(end)
    return min(times, key=times.get)


def launch_shape(stage: str, bits: int, device: torch.device, dims: tuple,
                 launch) -> tuple[int, int, int]:
    """(key tokens, value tokens, warps) for ``stage`` ("encode" or "decode") at ``bits``
    with ``dims`` = (layers, heads, tokens, head_dim, group size) on ``device``.

    ``LAUNCH``'s shape where one is forced; else, the first time a device of this name meets
    these dimensions (tokens rounded up to a power of two), every shape in ``CANDIDATES`` is
    launched through ``launch(shape)`` (the caller's own launch, so the outputs are written
    as the call would write them) and the fastest is kept for the rest of the process.
    Launch shapes picked on one card were 5 to 25% off on another (issue 15), hence per
    device; a tune costs one compile per candidate plus about a millisecond of GPU time.
    """
    forced = LAUNCH.get((stage, bits))
    if forced is not None:
        return forced
    layers, heads, tokens, head_dim, group_size = dims
    key = (_device_name(device), stage, bits, layers, heads, 1 << (max(tokens, 2) - 1).bit_length(),
           head_dim, group_size)
    shape = _tuned.get(key)
    if shape is None:
        shape = _tuned[key] = _fastest(CANDIDATES[stage][bits], device, launch)
    return shape


def _tile_counts(shape, tokens: int, group_size: int) -> tuple[int, int, int, int]:
    """(key tokens per program, value tokens per program, key blocks, value blocks)."""
    block_keys, block_values, _ = shape
    block_keys = max(block_keys, group_size)
    return block_keys, block_values, _blocks(tokens, block_keys), _blocks(tokens, block_values)


# Bytes of a raw (bf16) layer's keys or values that one program of the encoder copies.
RAW_TILE_BYTES = 16384


class Encoder:
    """The encode launch of one layout on one device: the codes, scales and zeros of
    ``layers`` quantized layers and a copy of ``raw_layers`` bf16 layers, written into a
    uint8 buffer by one launch that the call does not wait for.

    ``offsets`` (int64 on the device): [6, layers] byte offsets in the buffer of each
    quantized layer's key codes, key scales, key zeros, value codes, value scales and value
    zeros, each in ``quant``'s layout (codes ``[heads, tokens, head_dim]`` uint8, or flat
    packed when 4-bit; fp16 scales and zeros with the grouped axis shrunk), then the raw
    layers' key data and value data offsets; ``aligned_parts``: all of them start on
    16-byte boundaries. ``scale_factor`` is the slack over ``qmax`` that ``quant`` uses.
    Made once per layout (``base``): what a call needs besides the tensors is computed
    here, and after the first call a launch goes straight to the compiled kernel.
    """

    def __init__(self, device: torch.device, layers: int, raw_layers: int,
                 shape: tuple[int, int, int], bits: int, group_size: int, scale_factor: float,
                 offsets: torch.Tensor, aligned_parts: bool):
        if bits not in (4, 8):
            raise ValueError(f"Triton kernels quantize to 8 or 4 bits, not {bits}")
        self.device, self.layers, self.raw_layers, self.shape = device, layers, raw_layers, shape
        self.bits, self.group_size, self.scale_factor = bits, group_size, scale_factor
        self.offsets, self.aligned_parts = offsets, aligned_parts
        heads, tokens, head_dim = shape
        self.raw_bytes = 2 * heads * tokens * head_dim
        self._runs: dict[tuple, tuple] = {}

    def launch_at(self, shape, only: str | None, data_aligned: bool, table: torch.Tensor,
                  data: torch.Tensor, flags: torch.Tensor, slot: int) -> None:
        """One launch at launch shape ``shape`` (``__call__`` and benchmarks);
        ``data_aligned``: ``data`` starts on a 16-byte boundary."""
        found = self._runs.get((shape, only, data_aligned))
        if found is not None:
            run, fixed = found
            run(torch._C._cuda_getCurrentRawStream(self.device.index), table, data,
                self.offsets, flags, slot, *fixed)
            return
        heads, tokens, head_dim = self.shape
        block_keys, block_values, key_blocks, value_blocks = _tile_counts(shape, tokens,
                                                                          self.group_size)
        raw_blocks = max(1, _blocks(self.raw_bytes, RAW_TILE_BYTES))
        quantized = self.layers * heads
        grid = quantized * (key_blocks + value_blocks) + 2 * self.raw_layers * raw_blocks
        if only == "keys":  # the key tiles come first: a shorter grid stops before the rest
            grid = quantized * key_blocks
        elif only == "values":  # no key tiles: the first tiles are the value tiles
            key_blocks, grid = 0, quantized * value_blocks
        fixed = (self.layers, heads, tokens, _blocks(tokens, self.group_size), key_blocks,
                 value_blocks, self.raw_layers, raw_blocks, self.raw_bytes, self.scale_factor)
        run = _jit_launch(_encode_kv, grid, (table, data, self.offsets, flags, slot, *fixed),
                          {"D": head_dim, "GS": self.group_size, "QMAX": (1 << self.bits) - 1,
                           "PACK": self.bits == 4, "BTK": block_keys, "BTV": block_values,
                           "ALIGN": ALIGN_BYTES if self.aligned_parts and data_aligned else 1,
                           "BRAW": RAW_TILE_BYTES}, shape[2])
        if run is not None:
            self._runs[(shape, only, data_aligned)] = (run, fixed)

    def __call__(self, tensors, data: torch.Tensor, only: str | None = None) -> PendingCheck:
        """Encode ``tensors`` (the quantized layers' keys, their values, then the raw
        layers' keys and values; ``supports`` must accept them) into ``data``; returns the
        check of the launch's finiteness flag. ``only`` ("keys" or "values") launches that
        half's quantized tiles alone and leaves everything else unwritten: it times each
        half of the kernel (bench/gpu_codec_halves.py)."""
        if only not in (None, "keys", "values"):
            raise ValueError(f"only= takes 'keys', 'values' or None, not {only!r}")
        table = address_table(self.device, tensors)
        ring = flag_ring(self.device)
        check, slot = ring.acquire()
        data_aligned = data.data_ptr() % ALIGN_BYTES == 0  # Triton specializes on it

        def launch(shape):
            self.launch_at(shape, only, data_aligned, table, data, ring.values, slot)

        launch(launch_shape("encode", self.bits, self.device,
                            (self.layers, *self.shape, self.group_size), launch))
        ring.launched(slot)
        return check


class Decoder:
    """The decode launch of one layout on one device: bf16 ``[2, layers, heads, tokens,
    head_dim]`` (keys, then values) of the quantized layers from an encoded buffer and
    ``offsets`` as ``Encoder``'s, in one launch that the call does not wait for."""

    def __init__(self, device: torch.device, layers: int, shape: tuple[int, int, int],
                 bits: int, group_size: int, offsets: torch.Tensor):
        self.device, self.layers, self.shape = device, layers, shape
        self.bits, self.group_size, self.offsets = bits, group_size, offsets
        self._runs: dict[tuple, tuple] = {}

    def launch_at(self, shape, aligned: bool, data: torch.Tensor, out: torch.Tensor) -> None:
        """One launch at launch shape ``shape`` (``__call__`` and benchmarks)."""
        found = self._runs.get((shape, aligned))
        if found is not None:
            run, fixed = found
            run(torch._C._cuda_getCurrentRawStream(self.device.index), data, self.offsets,
                out, *fixed)
            return
        heads, tokens, head_dim = self.shape
        block_keys, block_values, key_blocks, value_blocks = _tile_counts(shape, tokens,
                                                                          self.group_size)
        fixed = (self.layers, heads, tokens, _blocks(tokens, self.group_size), key_blocks,
                 value_blocks)
        run = _jit_launch(_decode_kv, self.layers * heads * (key_blocks + value_blocks),
                          (data, self.offsets, out, *fixed),
                          {"D": head_dim, "GS": self.group_size, "PACK": self.bits == 4,
                           "BTK": block_keys, "BTV": block_values}, shape[2])
        if run is not None:
            self._runs[(shape, aligned)] = (run, fixed)

    def __call__(self, data: torch.Tensor) -> torch.Tensor:
        out = torch.empty((2, self.layers, *self.shape), dtype=torch.bfloat16,
                          device=self.device)
        aligned = data.data_ptr() % ALIGN_BYTES == 0  # Triton specializes on it

        def launch(shape):
            self.launch_at(shape, aligned, data, out)

        launch(launch_shape("decode", self.bits, self.device,
                            (self.layers, *self.shape, self.group_size), launch))
        return out
