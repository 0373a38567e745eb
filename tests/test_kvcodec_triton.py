"""The Triton codec path agrees with the torch path; without Triton the torch path serves.

The agreement tests run on a CUDA device with Triton, or on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1`` with Triton installed); elsewhere (CI) they skip.
"""

from __future__ import annotations

import os

import pytest
import torch

from ray_scout.core.llm.kv import KVSnapshot
from ray_scout.core.llm.kvcodec import base, codec_for, relative_error
from ray_scout.core.modes import Mode


def _device() -> str | None:
    if base.triton_kernels is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


needs_triton = pytest.mark.skipif(
    _device() is None, reason="needs Triton with CUDA, or TRITON_INTERPRET=1 on the CPU")


def outlier_snapshot(layers: int, heads: int, tokens: int, head_dim: int, device, seed: int):
    generator = torch.Generator().manual_seed(seed)

    def draw(keys: bool) -> torch.Tensor:
        x = torch.randn(heads, tokens, head_dim, generator=generator)
        if keys:  # a few large fixed channels, as real keys have
            x[:, :, ::max(1, head_dim // 4)] *= 20
        return x.to(torch.bfloat16).to(device)

    return KVSnapshot(tuple(draw(True) for _ in range(layers)),
                      tuple(draw(False) for _ in range(layers)), torch.arange(tokens))


@pytest.fixture
def torch_only(monkeypatch):
    monkeypatch.setattr(base, "triton_kernels", None)


@pytest.mark.parametrize("mode", [Mode.INT8, Mode.INT4, Mode.MIXED_INT4])
def test_torch_fallback_round_trips_within_quantization_error(torch_only, mode):
    snapshot = outlier_snapshot(3, 2, 45, 16, "cpu", seed=0)
    codec = codec_for(mode, group_size=8, protected_layers=(1,) if mode == Mode.MIXED_INT4 else ())
    decoded = codec.decode(codec.encode(snapshot), dtype=torch.bfloat16)
    limit = 0.01 if mode == Mode.INT8 else 0.15
    assert relative_error(snapshot, decoded) < limit


@needs_triton
@pytest.mark.parametrize("tokens", [64, 70])  # whole groups, and a ragged last group
@pytest.mark.parametrize("mode", [Mode.INT8, Mode.INT4, Mode.MIXED_INT4])
def test_triton_path_matches_torch_path(monkeypatch, mode, tokens):
    device = _device()
    snapshot = outlier_snapshot(3, 2, tokens, 16, device, seed=tokens)
    codec = codec_for(mode, group_size=8, protected_layers=(1,) if mode == Mode.MIXED_INT4 else ())
    fast = codec.encode(snapshot)
    fast_decoded = codec.decode(fast, dtype=torch.bfloat16, device=device)
    with monkeypatch.context() as patch:
        patch.setattr(base, "triton_kernels", None)
        slow = codec.encode(snapshot)
        slow_decoded = codec.decode(slow, dtype=torch.bfloat16, device=device)
    for a, b in zip(fast.keys + fast.values, slow.keys + slow.values):
        assert a.bits == b.bits and a.data.shape == b.data.shape
        if a.scales is None:
            assert torch.equal(a.data, b.data)
            continue
        assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
        # fma contraction may move a value sitting exactly on a rounding boundary by one code.
        if a.bits == 8:
            diff = (a.data.int() - b.data.int()).abs()
        else:
            diff = torch.cat([((a.data & 15).int() - (b.data & 15).int()).abs(),
                              ((a.data >> 4).int() - (b.data >> 4).int()).abs()])
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
    assert relative_error(slow_decoded, fast_decoded) < 0.02


@needs_triton
def test_triton_encode_rejects_non_finite_kv():
    snapshot = outlier_snapshot(2, 2, 64, 16, _device(), seed=3)
    snapshot.values[1][0, 5, 3] = float("inf")
    with pytest.raises(ValueError, match="BF16 mode"):
        codec_for(Mode.INT4, group_size=8).encode(snapshot)


@needs_triton
def test_triton_decode_writes_every_element():
    device = _device()
    snapshot = outlier_snapshot(2, 2, 70, 16, device, seed=4)
    codec = codec_for(Mode.INT8, group_size=8)
    decoded = codec.decode(codec.encode(snapshot), dtype=torch.bfloat16, device=device)
    for original, got in zip(snapshot.keys + snapshot.values, decoded.keys + decoded.values):
        assert bool(torch.isfinite(got).all())
        assert float((got.float() - original.float()).abs().max()) < 1.0


def _same_encoding(fast, slow) -> bool:
    return all(a.bits == b.bits and all(torch.equal(x, y) for x, y in zip(a.parts(), b.parts()))
               for a, b in zip(fast.keys + fast.values, slow.keys + slow.values))


@needs_triton
def test_reused_blocks_get_the_right_address_table(monkeypatch):
    # Address tables are memoized by the addresses they hold: a snapshot allocated where a
    # freed one lived, and one elsewhere, must both encode exactly as the torch path does.
    device = _device()
    codec = codec_for(Mode.INT8, group_size=8)
    for seed in (5, 6, 7):
        snapshot = outlier_snapshot(3, 2, 64, 16, device, seed=seed)
        fast = codec.encode(snapshot)
        decoded = codec.decode(fast, dtype=torch.bfloat16, device=device)
        with monkeypatch.context() as patch:
            patch.setattr(base, "triton_kernels", None)
            slow = codec.encode(snapshot)
        assert torch.equal(fast.keys[0].scales, slow.keys[0].scales)
        assert torch.equal(fast.values[2].scales, slow.values[2].scales)
        assert relative_error(snapshot, decoded) < 0.01
        del snapshot, fast, decoded


@needs_triton
def test_group_wider_than_head_dim_sends_keys_and_values_through_torch(monkeypatch):
    # Value groups run along channels: 32-wide groups cannot split 16 channels, so the one
    # launch for keys and values is not taken and both go through ``quant``, exactly.
    device = _device()
    snapshot = outlier_snapshot(2, 2, 64, 16, device, seed=8)
    codec = codec_for(Mode.INT4, group_size=32)
    calls = []
    monkeypatch.setattr(base.triton_kernels, "quantize_kv",
                        lambda *args: calls.append(args) or None)
    fast = codec.encode(snapshot)
    with monkeypatch.context() as patch:
        patch.setattr(base, "triton_kernels", None)
        slow = codec.encode(snapshot)
    assert not calls and _same_encoding(fast, slow)



@needs_triton
def test_tensor_off_a_16_byte_boundary_sends_the_snapshot_through_torch(monkeypatch):
    # The encoder promises Triton 16-byte aligned layer addresses (vector loads); a view
    # that starts one element into its storage breaks that promise and must not reach it.
    device = _device()
    snapshot = outlier_snapshot(2, 2, 64, 16, device, seed=9)
    storage = torch.empty(snapshot.values[1].numel() + 1, dtype=torch.bfloat16, device=device)
    shifted = storage[1:].view(snapshot.values[1].shape)
    shifted.copy_(snapshot.values[1])
    snapshot = KVSnapshot(snapshot.keys, (snapshot.values[0], shifted), snapshot.positions)
    calls = []
    monkeypatch.setattr(base.triton_kernels, "quantize_kv",
                        lambda *args: calls.append(args) or None)
    codec = codec_for(Mode.INT4, group_size=8)
    fast = codec.encode(snapshot)
    with monkeypatch.context() as patch:
        patch.setattr(base, "triton_kernels", None)
        slow = codec.encode(snapshot)
    assert not calls and _same_encoding(fast, slow)
