"""The Triton codec path agrees with the torch path; without Triton the torch path serves.

The agreement tests run on a CUDA device with Triton, or on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1`` with Triton installed); elsewhere (CI) they skip.
"""

from __future__ import annotations

import os

import pytest
import torch

from ray_scout.core.llm import wire
from ray_scout.core.llm.kv import KVSnapshot
from ray_scout.core.llm.kvcodec import base, codec_for, relative_error
from ray_scout.core.llm.models import KVFacts
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


@pytest.fixture(autouse=True)
def one_launch_shape(monkeypatch):
    # Each launch shape is a compile; the tests check the arithmetic with one per kernel
    # (the first candidate) and the choice among candidates in a test of its own.
    if base.triton_kernels is not None:
        monkeypatch.setattr(base.triton_kernels, "LAUNCH", {
            (stage, bits): shapes[0]
            for stage, per_bits in base.triton_kernels.CANDIDATES.items()
            for bits, shapes in per_bits.items()})


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
# Whole groups; a ragged last group; and parts not on 16-byte boundaries in the encoded
# buffer (45 tokens x 1 head: 180-byte value scales), which the kernels must not promise.
@pytest.mark.parametrize("heads, tokens", [(2, 64), (2, 70), (1, 45)])
@pytest.mark.parametrize("mode", [Mode.INT8, Mode.INT4, Mode.MIXED_INT4])
def test_triton_path_matches_torch_path(monkeypatch, mode, heads, tokens):
    device = _device()
    snapshot = outlier_snapshot(3, heads, tokens, 16, device, seed=tokens)
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
@pytest.mark.parametrize("bits_mode", [Mode.INT8, Mode.INT4])
@pytest.mark.parametrize("where", ["keys", "values"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_triton_encode_reports_non_finite_kv_to_whoever_reads_it(bits_mode, where, bad):
    # The encode call does not wait for its kernel; the wire and decode check its flag.
    snapshot = outlier_snapshot(2, 2, 64, 16, _device(), seed=3)
    getattr(snapshot, where)[1][0, 5, 3] = bad
    codec = codec_for(bits_mode, group_size=8)
    encoded = codec.encode(snapshot)
    with pytest.raises(ValueError, match="BF16 mode"):
        wire.encode_kv(encoded, "model")
    with pytest.raises(ValueError, match="BF16 mode"):
        codec.decode(encoded, dtype=torch.bfloat16, device=_device())


@needs_triton
def test_flag_slot_reused_later_keeps_its_outcome(monkeypatch):
    # With two slots, the third encode reuses the first one's flag: the first encode's
    # outcome (not finite) must survive, and the later encodes must not inherit it.
    monkeypatch.setattr(base.triton_kernels, "FLAG_SLOTS", 2)
    monkeypatch.setattr(base.triton_kernels, "_rings", {})
    codec = codec_for(Mode.INT8, group_size=8)
    bad = outlier_snapshot(2, 2, 64, 16, _device(), seed=10)
    bad.keys[0][1, 7, 2] = float("nan")
    first = codec.encode(bad)
    later = [codec.encode(outlier_snapshot(2, 2, 64, 16, _device(), seed=11 + i))
             for i in range(3)]
    with pytest.raises(ValueError, match="BF16 mode"):
        first.check_finite()
    for encoded in later:
        encoded.check_finite()


@needs_triton
def test_launch_shape_is_a_candidate_chosen_once_per_device_and_shape(monkeypatch):
    kernels = base.triton_kernels
    monkeypatch.setattr(kernels, "_tuned", {})
    monkeypatch.setattr(kernels, "LAUNCH", {})
    codec = codec_for(Mode.INT4, group_size=8)
    for seed in (12, 13):
        codec.decode(codec.encode(outlier_snapshot(2, 2, 64, 16, _device(), seed=seed)),
                     dtype=torch.bfloat16, device=_device())
    chosen = kernels.tuned()
    assert sorted(key[1] for key in chosen) == ["decode", "encode"]
    for (name, stage, bits, *_), shape in chosen.items():
        assert shape in kernels.CANDIDATES[stage][bits] and bits == 4


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
    monkeypatch.setattr(base.triton_kernels.Encoder, "__call__",
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
    monkeypatch.setattr(base.triton_kernels.Encoder, "__call__",
                        lambda *args: calls.append(args) or None)
    codec = codec_for(Mode.INT4, group_size=8)
    fast = codec.encode(snapshot)
    with monkeypatch.context() as patch:
        patch.setattr(base, "triton_kernels", None)
        slow = codec.encode(snapshot)
    assert not calls and _same_encoding(fast, slow)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
@pytest.mark.parametrize("mode", [Mode.INT4, Mode.MIXED_INT4])
def test_pinned_payload_decodes_exactly_as_a_pageable_one(mode):
    # The cloud parses payloads into pinned memory so that the upload is one DMA; the
    # decoded KV must not depend on where the parse put the bytes.
    snapshot = outlier_snapshot(3, 2, 64, 16, "cuda", seed=14)
    codec = codec_for(mode, group_size=8, protected_layers=(1,) if mode == Mode.MIXED_INT4 else ())
    data = wire.encode_kv(codec.encode(snapshot), "model", tail_ids=(3,))
    facts = KVFacts("model", 3, 2, 16, 4)
    pinned = wire.decode_kv(data, facts=facts, pin_memory=True).encoded
    pageable = wire.decode_kv(data, facts=facts).encoded
    assert pinned.data.is_pinned() and not pageable.data.is_pinned()
    a = codec.decode(pinned, dtype=torch.bfloat16, device="cuda")
    b = codec.decode(pageable, dtype=torch.bfloat16, device="cuda")
    assert all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))


@needs_triton
def test_layout_plan_made_once_and_torch_path_still_taken_when_asked(monkeypatch):
    # The plan (offsets, launches) is per layout; patching Triton away must still route
    # the next call of a planned layout through torch, and a layout first planned with
    # Triton patched away must take the kernels once it is back.
    device = _device()
    late = outlier_snapshot(2, 2, 96, 16, device, seed=17)
    late_codec = codec_for(Mode.INT8, group_size=8)
    with monkeypatch.context() as patch:
        patch.setattr(base, "triton_kernels", None)
        late_codec.encode(late)
    assert late_codec.encode(late).pending is not None  # the kernels' pending check
    codec = codec_for(Mode.INT8, group_size=8)
    first = outlier_snapshot(2, 2, 64, 16, device, seed=15)
    codec.encode(first)
    plan = base.plan_for(codec.layout_for(first), first.keys[0].device)
    second = outlier_snapshot(2, 2, 64, 16, device, seed=16)
    fast = codec.encode(second)
    assert base.plan_for(codec.layout_for(second), second.keys[0].device) is plan
    calls = []
    monkeypatch.setattr(base.triton_kernels.Encoder, "__call__",
                        lambda *args: calls.append(args) or None)
    with monkeypatch.context() as patch:
        patch.setattr(base, "triton_kernels", None)
        slow = codec.encode(second)
    assert not calls and torch.equal(fast.keys[0].scales, slow.keys[0].scales)
