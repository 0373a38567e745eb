"""The codec contract: a layout, the encoded form, and the layer-wise codec every mode uses.

What lives here: ``KVLayout`` (everything a decoder must know besides the bytes: mode,
shapes, group size, protected layers), ``EncodedTensor``/``EncodedKV`` (the packed tensors,
still torch tensors on the encoder's device) and ``KVCodec``, which encodes each layer at
the bit width its subclass assigns (16 = raw bf16; 8 or 4 = KIVI-style group quantization:
keys per channel, values per token). What it leaves to others: which bit width each layer
gets (the codec classes), how the encoded form is framed (``ray_scout.core.llm.wire``).

The encoded form is one byte buffer in the wire's order (``part_spans``), whatever the
device: the GPU encoder writes every layer's parts into it in one launch and the wire sends
it with one copy; the decoder moves it to the GPU with one copy and reads every part from
it in one launch. Per-layer tensors (``EncodedKV.keys``) are views made only when asked for.
"""

from __future__ import annotations

import dataclasses
import functools

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
    return POSITION_DTYPE.itemsize * layout.num_tokens + data_size_bytes(layout)


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


def part_spans(layout: KVLayout) -> tuple[tuple[tuple[int, int], ...], ...]:
    """(start, length) in bytes of every part in the encoded buffer, per layer: key data,
    key scales, key zeros, value data, value scales, value zeros (a raw layer has only its
    key data and value data). The wire's order: layer by layer, keys before values."""
    return _spans(layout)


@functools.lru_cache(maxsize=256)
def _spans(layout: KVLayout) -> tuple[tuple[tuple[int, int], ...], ...]:
    spans, at = [], 0
    for bits in layout.layer_bits():
        layer = []
        for dim in (KEY_GROUP_DIM, VALUE_GROUP_DIM):
            for length in tensor_sizes_bytes(layout, bits, dim)[:1 if bits == RAW_BITS else 3]:
                layer.append((at, length))
                at += length
        spans.append(tuple(layer))
    return tuple(spans)


def data_size_bytes(layout: KVLayout) -> int:
    """Bytes of the encoded buffer (every layer's parts, without positions)."""
    spans = part_spans(layout)
    return spans[-1][-1][0] + spans[-1][-1][1] if spans else 0


def _view(data: torch.Tensor, start: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    part = data[start:start + length]
    # A view as a wider dtype needs an aligned offset; odd INT4 code counts can shift it.
    return (part.clone() if start % dtype.itemsize else part).view(dtype)


def _grouped_shape(layout: KVLayout, dim: int) -> tuple[int, int, int]:
    shape = list(layout.tensor_shape)
    shape[dim] = quant.num_groups(shape[dim], layout.group_size)
    return tuple(shape)


@dataclasses.dataclass(frozen=True)
class EncodedKV:
    """A snapshot after encoding: layout, int32 positions, and ``data``, every layer's
    encoded parts in one uint8 buffer in the wire's order (``part_spans``), on the
    encoder's device or wherever the wire put it.

    ``pending`` is set when a GPU launch is still writing ``data``: its finiteness is known
    once that launch completes, and ``check_finite`` (which the wire and ``decode`` call)
    raises then; nothing waits for it before.
    """

    layout: KVLayout
    positions: torch.Tensor
    data: torch.Tensor
    pending: object | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.positions.dim() != 1 or self.positions.numel() != self.layout.num_tokens:
            raise ValueError(f"{self.positions.numel()} positions for "
                             f"{self.layout.num_tokens} tokens")
        want = data_size_bytes(self.layout)
        if self.data.dtype != torch.uint8 or self.data.dim() != 1 or self.data.numel() != want:
            raise ValueError(f"encoded data must be 1-D uint8 of {want} bytes for this layout, "
                             f"got {self.data.dtype} {tuple(self.data.shape)}")

    @property
    def mode(self) -> Mode:
        return self.layout.mode

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def size_bytes(self) -> int:
        """Bytes of everything that travels except the wire header."""
        return self.positions.numel() * self.positions.element_size() + self.data.numel()

    def check_finite(self) -> None:
        """Raise ``ValueError`` if the encoder met non-finite KV (waits for its launch)."""
        if self.pending is not None and self.pending.failed():
            raise ValueError(quant.NOT_FINITE)

    @functools.cached_property
    def _layers(self) -> tuple[tuple[EncodedTensor, ...], tuple[EncodedTensor, ...]]:
        layout, data = self.layout, self.data
        keys, values = [], []
        for bits, spans in zip(layout.layer_bits(), part_spans(layout)):
            if bits == RAW_BITS:
                for (start, length), out in zip(spans, (keys, values)):
                    raw = _view(data, start, length, RAW_DTYPE).view(layout.tensor_shape)
                    out.append(EncodedTensor(bits, raw))
                continue
            for dim, index, out in ((KEY_GROUP_DIM, 0, keys), (VALUE_GROUP_DIM, 3, values)):
                (start, length), scales, zeros = spans[index:index + 3]
                codes = data[start:start + length]
                if bits == 8:
                    codes = codes.view(layout.tensor_shape)
                grouped = _grouped_shape(layout, dim)
                out.append(EncodedTensor(bits, codes,
                                         _view(data, *scales, torch.float16).view(grouped),
                                         _view(data, *zeros, torch.float16).view(grouped)))
        return tuple(keys), tuple(values)

    @property
    def keys(self) -> tuple[EncodedTensor, ...]:
        """Per-layer views of the keys' parts (made at the first call)."""
        return self._layers[0]

    @property
    def values(self) -> tuple[EncodedTensor, ...]:
        return self._layers[1]


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


def _merge(bits, fast, raw) -> tuple:
    """Per layer: the next item of ``fast`` where the layer is quantized, else ``raw(i)``."""
    fast = iter(fast)
    return tuple(raw(i) if width == RAW_BITS else next(fast) for i, width in enumerate(bits))


class Plan:
    """What encoding or decoding one layout on one device needs besides the tensors, made
    once per (layout, device) by ``plan_for``: the layers' widths and spans, and on a GPU
    with Triton the offset table and the one-launch ``Encoder``/``Decoder``.

    Why: at 7B a call is about 0.1 ms of GPU work, so what the host does per call before
    the launch is the caller's wall time (issue 15); here it is done once per layout.
    """

    def __init__(self, layout: KVLayout, device: torch.device):
        self.bits = layout.layer_bits()
        self.spans = part_spans(layout)
        self.size_bytes = data_size_bytes(layout)
        self.quantized = tuple(i for i, width in enumerate(self.bits) if width != RAW_BITS)
        self.raw = tuple(i for i, width in enumerate(self.bits) if width == RAW_BITS)
        widths = {self.bits[i] for i in self.quantized}
        self.encoder = self.decoder = None
        if (triton_kernels is None or len(widths) != 1 or widths - {4, 8}
                or not triton_kernels.device_ok(device)
                or not triton_kernels.shape_ok(layout.tensor_shape, layout.group_size)):
            return
        width = widths.pop()
        # Byte offsets of every quantized layer's six parts ([6, layers], row-major), then
        # of the raw layers' key data and value data.
        starts = ([self.spans[i][part][0] for part in range(6) for i in self.quantized]
                  + [self.spans[i][half][0] for half in range(2) for i in self.raw])
        offsets = torch.tensor(starts, dtype=torch.int64).to(device)
        aligned = all(start % triton_kernels.ALIGN_BYTES == 0 for start in starts)
        shape = layout.tensor_shape
        self.encoder = triton_kernels.Encoder(
            device, len(self.quantized), len(self.raw), shape, width, layout.group_size,
            quant.SCALE_SLACK / ((1 << width) - 1), offsets, aligned)
        self.decoder = triton_kernels.Decoder(device, len(self.quantized), shape, width,
                                              layout.group_size, offsets)

    def inputs(self, keys, values) -> list:
        """The tensors in the order ``Encoder`` takes them."""
        quantized, raw = self.quantized, self.raw
        return ([keys[i] for i in quantized] + [values[i] for i in quantized]
                + [keys[i] for i in raw] + [values[i] for i in raw])


_plans: dict[tuple, Plan] = {}
PLANS_KEPT = 64  # layouts (one per prompt length and mode) whose plans stay on the device


def plan_for(layout: KVLayout, device: torch.device) -> Plan:
    """The plan of ``layout`` on ``device`` (made at the first call). Keyed by the kernels
    module too: a plan made while ``triton_kernels`` is None (the torch path forced, as
    benchmarks and tests do) has no launches and must not serve once it is back."""
    key = (layout, device, triton_kernels)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= PLANS_KEPT:
            _plans.pop(next(iter(_plans)), None)
        if device.type == "cuda" and device.index is None:  # launches need the index
            device = torch.device("cuda", torch.cuda.current_device())
        plan = _plans[key] = Plan(layout, device)
    return plan


def encode_kv(keys, values, layout: KVLayout) -> tuple[torch.Tensor, object | None]:
    """Every layer's keys (groups along tokens) and values (groups along channels) at its
    bit width, as the encoded buffer (``part_spans``) on the keys' device, and the pending
    finiteness check of a GPU launch (None when the check already passed).

    On a GPU with Triton, one kernel launch quantizes the keys and values of every
    quantized layer and copies the raw ones, straight into the buffer, and the call returns
    without waiting for it; elsewhere through ``quant``, which checks as it goes.
    """
    device = keys[0].device
    plan = plan_for(layout, device)
    data = torch.empty(plan.size_bytes, dtype=torch.uint8, device=device)
    if plan.encoder is not None:
        tensors = plan.inputs(keys, values)
        if triton_kernels.supports(tensors, layout.group_size):
            return data, plan.encoder(tensors, data)
    for i, layer_bits in enumerate(plan.bits):
        parts = (encode_tensor(keys[i], layer_bits, layout.group_size, KEY_GROUP_DIM).parts()
                 + encode_tensor(values[i], layer_bits, layout.group_size,
                                 VALUE_GROUP_DIM).parts())
        for part, (start, length) in zip(parts, plan.spans[i]):
            data[start:start + length].copy_(part.reshape(-1).view(torch.uint8))
    return data, None


def _device_data(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``data`` on ``device``: from pinned host memory (``wire.decode_kv(pin_memory=True)``)
    by one DMA that leaves the calling thread at once; from pageable host memory through a
    pinned staging buffer, so the DMA still runs at full speed (the calling thread pays the
    staging copy; the caching host allocator keeps the buffer until the DMA has completed)."""
    if data.device == device:
        return data
    if device.type != "cuda" or data.device.type != "cpu" or data.is_pinned():
        return data.to(device, non_blocking=data.is_pinned())
    staging = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
    staging.copy_(data)
    return staging.to(device, non_blocking=True)


def decode_kv(encoded: EncodedKV, dtype: torch.dtype, device
              ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Inverse of ``encode_kv`` into ``dtype`` on ``device``: bf16 on a GPU with Triton from
    one copy of the buffer and one launch for keys and values, else through ``quant``."""
    layout = encoded.layout
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    plan = plan_for(layout, device)
    shape = layout.tensor_shape
    if plan.decoder is None or dtype != torch.bfloat16:
        return (tuple(decode_tensor(e, shape, layout.group_size, KEY_GROUP_DIM, dtype, device)
                      for e in encoded.keys),
                tuple(decode_tensor(e, shape, layout.group_size, VALUE_GROUP_DIM, dtype, device)
                      for e in encoded.values))
    data = _device_data(encoded.data, device)
    out = plan.decoder(data)
    # After the launch, while the GPU works: per-layer views. Raw layers are views of the
    # buffer on the device: bf16 already, nothing to copy.
    spans = plan.spans

    def layers(half: int) -> tuple[torch.Tensor, ...]:
        return _merge(plan.bits, out[half].unbind(), lambda i: _view(
            data, *spans[i][half], RAW_DTYPE).view(shape))

    return layers(0), layers(1)


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
        """The encoded snapshot; on a GPU the call returns before the kernel has run (the
        wire and ``decode`` call ``EncodedKV.check_finite``, which waits for it)."""
        layout = self.layout_for(snapshot)
        data, pending = encode_kv(snapshot.keys, snapshot.values, layout)
        positions = snapshot.positions.to(device="cpu", dtype=POSITION_DTYPE)
        return EncodedKV(layout, positions, data, pending)

    def decode(self, encoded: EncodedKV, *, dtype: torch.dtype = torch.float32,
               device="cpu") -> KVSnapshot:
        layout = encoded.layout
        if layout.mode != self.mode:
            raise ValueError(f"{type(self).__name__} decodes {self.mode.value}, "
                             f"got {layout.mode.value}; use codec_for(encoded.mode)")
        encoded.check_finite()
        keys, values = decode_kv(encoded, dtype, device)
        # Positions stay on the CPU, as in every snapshot a prefill makes: they are
        # metadata, and on the GPU their validation and ``next_position`` would each sync.
        return KVSnapshot.of_one_shape(keys, values, encoded.positions.to(dtype=torch.long))


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
