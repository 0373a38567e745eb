"""The codec contract: a layout, the encoded form, and the layer-wise codec every mode uses.

What lives here: ``KVLayout`` (everything a decoder must know besides the bytes: mode,
shapes, group size, protected layers), ``EncodedTensor``/``EncodedKV`` (the packed tensors,
still torch tensors on the encoder's device) and ``KVCodec``, which encodes each layer at
the bit width its subclass assigns (16 = raw bf16; 8 or 4 = KIVI-style group quantization:
keys per channel, values per token). What it leaves to others: which bit width each layer
gets (the codec classes), how the encoded form becomes bytes (``ray_scout.core.llm.wire``).
"""

from __future__ import annotations

import dataclasses

import torch

from ray_scout.core.llm.kv import KVSnapshot
from ray_scout.core.llm.kvcodec import quant
from ray_scout.core.modes import Mode

try:  # GPU fast path; without Triton every tensor goes through ``quant``
    from ray_scout.core.llm.kvcodec import triton_kernels
except ImportError:
    triton_kernels = None

RAW_BITS = 16
RAW_DTYPE = torch.bfloat16
POSITION_DTYPE = torch.int32  # positions travel as 4-byte integers
KEY_GROUP_DIM = 1  # keys [heads, tokens, head_dim]: groups along tokens, per channel
VALUE_GROUP_DIM = 2  # values: groups along channels, per token


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """What a decoder needs besides the bytes."""

    mode: Mode
    num_layers: int
    num_kv_heads: int
    num_tokens: int
    head_dim: int
    group_size: int
    protected_layers: tuple[int, ...] = ()

    @property
    def tensor_shape(self) -> tuple[int, int, int]:
        return (self.num_kv_heads, self.num_tokens, self.head_dim)

    def layer_bits(self) -> tuple[int, ...]:
        return codec_class(self.mode).bits_per_layer(self.num_layers, self.protected_layers)


def tensor_sizes_bytes(layout: KVLayout, bits: int, dim: int) -> tuple[int, int, int]:
    """(data, scales, zeros) bytes of one layer's keys (dim 1) or values (dim 2)."""
    heads, tokens, head_dim = layout.tensor_shape
    count = heads * tokens * head_dim
    if bits == RAW_BITS:
        return 2 * count, 0, 0
    grouped = (tokens, head_dim)[dim - 1]
    groups = count // grouped * quant.num_groups(grouped, layout.group_size) if count else 0
    return -(-count * bits // 8), 2 * groups, 2 * groups


def encoded_size_bytes(layout: KVLayout) -> int:
    """Closed form of ``EncodedKV.size_bytes``: data + fp16 scales/zeros + int32 positions."""
    total = POSITION_DTYPE.itemsize * layout.num_tokens
    for bits in layout.layer_bits():
        for dim in (KEY_GROUP_DIM, VALUE_GROUP_DIM):
            total += sum(tensor_sizes_bytes(layout, bits, dim))
    return total


@dataclasses.dataclass(frozen=True)
class EncodedTensor:
    """One layer's keys or values: raw bf16 data, or packed uint8 codes + fp16 scales/zeros.

    Codes are in the ``[heads, tokens, head_dim]`` element order, flattened when 4-bit (two
    per byte, low nibble first). Scales and zeros have that shape with the grouped axis
    (tokens for keys, channels for values) shrunk to its number of groups.
    """

    bits: int
    data: torch.Tensor
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None

    def parts(self) -> tuple[torch.Tensor, ...]:
        return (self.data,) if self.bits == RAW_BITS else (self.data, self.scales, self.zeros)

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts())


@dataclasses.dataclass(frozen=True)
class EncodedKV:
    """A snapshot after encoding: layout, int32 positions, per-layer encoded keys/values."""

    layout: KVLayout
    positions: torch.Tensor
    keys: tuple[EncodedTensor, ...]
    values: tuple[EncodedTensor, ...]

    @property
    def mode(self) -> Mode:
        return self.layout.mode

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def size_bytes(self) -> int:
        """Bytes of everything that travels except the wire header."""
        return (self.positions.numel() * self.positions.element_size()
                + sum(t.size_bytes for t in self.keys + self.values))


def encode_tensor(x: torch.Tensor, bits: int, group_size: int, dim: int) -> EncodedTensor:
    if bits == RAW_BITS:
        return EncodedTensor(bits, x.to(RAW_DTYPE).contiguous())
    codes, scales, zeros = quant.quantize(x, bits, group_size, dim)
    if bits == 4:
        codes = quant.pack_int4(codes)
    elif bits != 8:
        raise ValueError(f"unsupported bit width {bits}; codecs use 16, 8 or 4")
    return EncodedTensor(bits, codes, scales, zeros)


def decode_tensor(encoded: EncodedTensor, shape: tuple[int, int, int], group_size: int,
                  dim: int, dtype: torch.dtype, device) -> torch.Tensor:
    data = encoded.data.to(device)
    if encoded.bits == RAW_BITS:
        return data.to(dtype)
    codes = quant.unpack_int4(data, shape) if encoded.bits == 4 else data.reshape(shape)
    return quant.dequantize(codes, encoded.scales.to(device), encoded.zeros.to(device),
                            group_size, dim, dtype)


def _fast_width(keys, values, bits, group_size: int) -> int | None:
    """The quantized bit width when every quantized layer's keys and values can take the
    Triton path together (one width, one device, one shape); None when torch must do it."""
    widths = set(bits) - {RAW_BITS}
    if triton_kernels is None or len(widths) != 1 or widths - {4, 8}:
        return None
    quantized = [i for i, width in enumerate(bits) if width != RAW_BITS]
    tensors = [keys[i] for i in quantized] + [values[i] for i in quantized]
    return widths.pop() if triton_kernels.supports(tensors, group_size) else None


def _merge(bits, fast, raw) -> tuple:
    """Per layer: the next item of ``fast`` where the layer is quantized, else ``raw(i)``."""
    fast = iter(fast)
    return tuple(raw(i) if width == RAW_BITS else next(fast) for i, width in enumerate(bits))


def encode_kv(keys, values, bits, group_size: int
              ) -> tuple[tuple[EncodedTensor, ...], tuple[EncodedTensor, ...]]:
    """Every layer's keys (groups along tokens) and values (groups along channels) at its
    bit width.

    On a GPU with Triton, the keys and values of every quantized layer are quantized in one
    kernel launch and one finiteness check (the torch path syncs once per tensor);
    elsewhere through ``quant``.
    """
    width = _fast_width(keys, values, bits, group_size)
    if width is None:
        return (tuple(encode_tensor(t, b, group_size, KEY_GROUP_DIM) for t, b in zip(keys, bits)),
                tuple(encode_tensor(t, b, group_size, VALUE_GROUP_DIM)
                      for t, b in zip(values, bits)))
    quantized = [i for i, b in enumerate(bits) if b == width]
    device = keys[0].device
    # The flag lives in pinned host memory, which the kernel writes through: no fill kernel
    # before the launch and no copy after it, only the wait for the launch to finish.
    flag = torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")
    halves = triton_kernels.quantize_kv([keys[i] for i in quantized],
                                        [values[i] for i in quantized], width, group_size,
                                        quant.SCALE_SLACK / ((1 << width) - 1), flag)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    if flag.item():
        raise ValueError(quant.NOT_FINITE)

    def layers(half, tensors) -> tuple[EncodedTensor, ...]:
        codes, scales, zeros = half
        encoded = (EncodedTensor(width, *parts)
                   for parts in zip(codes.unbind(), scales.unbind(), zeros.unbind()))
        # Raw layers are copied as bf16 whatever the grouping axis.
        return _merge(bits, encoded, lambda i: encode_tensor(tensors[i], RAW_BITS, group_size,
                                                             KEY_GROUP_DIM))

    return layers(halves[0], keys), layers(halves[1], values)


def decode_kv(keys, values, shape: tuple[int, int, int], group_size: int, dtype: torch.dtype,
              device) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Inverse of ``encode_kv`` into ``dtype`` on ``device``: bf16 on a GPU with Triton in
    one launch for keys and values (after moving the parts there), else through ``quant``."""
    bits = [e.bits for e in keys]
    widths = set(bits) - {RAW_BITS}
    if (triton_kernels is None or dtype != torch.bfloat16 or len(widths) != 1
            or widths - {4, 8} or [e.bits for e in values] != bits
            or not triton_kernels.device_ok(torch.device(device))
            or not triton_kernels.shape_ok(shape, group_size)):
        return (tuple(decode_tensor(e, shape, group_size, KEY_GROUP_DIM, dtype, device)
                      for e in keys),
                tuple(decode_tensor(e, shape, group_size, VALUE_GROUP_DIM, dtype, device)
                      for e in values))

    def parts(encoded) -> tuple:
        """(codes, scales, zeros) of the quantized layers, each a tuple over layers."""
        return tuple(zip(*([p.to(device).contiguous() for p in e.parts()]
                           for e in encoded if e.bits != RAW_BITS)))

    def layers(half, encoded) -> tuple[torch.Tensor, ...]:
        # Raw layers carry bf16 data; decoding them is a move, whatever the grouping axis.
        return _merge(bits, half.unbind(), lambda i: decode_tensor(
            encoded[i], shape, group_size, KEY_GROUP_DIM, dtype, device))

    out = triton_kernels.dequantize_kv(parts(keys), parts(values), shape, widths.pop(),
                                       group_size)
    return layers(out[0], keys), layers(out[1], values)


class KVCodec:
    """Encode each layer at the width ``bits_per_layer`` gives; subclasses pick the widths."""

    mode: Mode

    def __init__(self, *, group_size: int = 32, protected_layers: tuple[int, ...] = ()):
        if group_size < 1:
            raise ValueError(f"group_size must be positive, got {group_size}")
        self.group_size = group_size
        self.protected_layers = tuple(sorted(set(int(p) for p in protected_layers)))
        if len(self.protected_layers) != len(protected_layers):
            raise ValueError(f"protected_layers {protected_layers} has duplicates")

    @classmethod
    def bits_per_layer(cls, num_layers: int, protected_layers: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError(f"{cls.__name__} must say how many bits each layer gets")

    def layout_for(self, snapshot: KVSnapshot) -> KVLayout:
        return KVLayout(self.mode, snapshot.num_layers, snapshot.num_kv_heads,
                        snapshot.num_tokens, snapshot.head_dim, self.group_size,
                        self.protected_layers)

    def encode(self, snapshot: KVSnapshot) -> EncodedKV:
        layout = self.layout_for(snapshot)
        bits = layout.layer_bits()
        keys, values = encode_kv(snapshot.keys, snapshot.values, bits, self.group_size)
        positions = snapshot.positions.to(device="cpu", dtype=POSITION_DTYPE)
        return EncodedKV(layout, positions, keys, values)

    def decode(self, encoded: EncodedKV, *, dtype: torch.dtype = torch.float32,
               device="cpu") -> KVSnapshot:
        layout = encoded.layout
        if layout.mode != self.mode:
            raise ValueError(f"{type(self).__name__} decodes {self.mode.value}, "
                             f"got {layout.mode.value}; use codec_for(encoded.mode)")
        shape = layout.tensor_shape
        keys, values = decode_kv(encoded.keys, encoded.values, shape, layout.group_size, dtype,
                                 device)
        # Positions stay on the CPU, as in every snapshot a prefill makes: they are
        # metadata, and on the GPU their validation and ``next_position`` would each sync.
        return KVSnapshot(keys, values, encoded.positions.to(dtype=torch.long))


_REGISTRY: dict[Mode, type[KVCodec]] = {}


def register(cls: type[KVCodec]) -> type[KVCodec]:
    """Class decorator: make ``cls`` the codec of ``cls.mode``."""
    if cls.mode in _REGISTRY:
        raise ValueError(f"mode {cls.mode.value} already has codec {_REGISTRY[cls.mode].__name__}")
    _REGISTRY[cls.mode] = cls
    return cls


def codec_class(mode: Mode) -> type[KVCodec]:
    try:
        return _REGISTRY[Mode(mode)]
    except KeyError:
        known = ", ".join(m.value for m in _REGISTRY)
        raise ValueError(f"mode {Mode(mode).value} carries no KV codec; KV modes: {known}") from None
