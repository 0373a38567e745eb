import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_scout.core.llm.kv import KVSnapshot
from ray_scout.core.llm.kvcodec import codec_for, encoded_size_bytes, relative_error
from ray_scout.core.llm.kvcodec.quant import dequantize, pack_int4, quantize, unpack_int4
from ray_scout.core.modes import Mode

ALL = [(Mode.BF16, ()), (Mode.INT8, ()), (Mode.INT4, ()), (Mode.MIXED_INT4, (1,))]


def snapshot(layers=4, heads=2, tokens=70, head_dim=16, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn(heads, tokens, head_dim, generator=gen) * scale  # noqa: E731
    return KVSnapshot(tuple(draw() for _ in range(layers)), tuple(draw() for _ in range(layers)),
                      torch.arange(tokens) * 3 + 5)


@pytest.mark.parametrize("mode, protected", ALL)
def test_encoded_size_equals_closed_form_and_positions_travel(mode, protected):
    snap = snapshot()
    codec = codec_for(mode, protected_layers=protected)
    encoded = codec.encode(snap)
    assert encoded.size_bytes == encoded_size_bytes(encoded.layout)
    decoded = codec.decode(encoded)
    assert torch.equal(decoded.positions, snap.positions)
    assert decoded.keys[0].shape == snap.keys[0].shape and decoded.dtype == torch.float32


@pytest.mark.parametrize("mode, bound", [(Mode.BF16, 0.005), (Mode.INT8, 0.01), (Mode.INT4, 0.10)])
def test_gaussian_roundtrip_error_within_mode_bound(mode, bound):
    snap = snapshot()
    assert relative_error(snap, codec_for(mode).decode(codec_for(mode).encode(snap))) < bound


def test_int4_is_coarser_than_int8():
    snap = snapshot()
    errors = [relative_error(snap, codec_for(m).decode(codec_for(m).encode(snap)))
              for m in (Mode.INT8, Mode.INT4)]
    assert errors[0] * 5 < errors[1]


def test_per_channel_keys_survive_outlier_channels():
    # Real keys have a few channels tens of times larger than the rest (KIVI's motivation);
    # per-channel key scales keep the ordinary channels as exact as without outliers.
    snap = snapshot(tokens=64)
    outlier = tuple(k.clone() for k in snap.keys)
    for k in outlier:
        k[:, :, 3] *= 60.0
        k[:, :, 11] += 40.0
    spiked = KVSnapshot(outlier, snap.values, snap.positions)
    codec = codec_for(Mode.INT4)
    decoded = codec.decode(codec.encode(spiked))
    normal = [c for c in range(16) if c not in (3, 11)]
    err = (decoded.keys[0][:, :, normal] - spiked.keys[0][:, :, normal]).norm()
    base = codec.decode(codec.encode(snap))
    base_err = (base.keys[0][:, :, normal] - snap.keys[0][:, :, normal]).norm()
    assert err <= base_err * 1.0001
    # A per-token key grouping would spread the outlier range over every channel:
    codes, scales, zeros = quantize(spiked.keys[0], 4, 16, dim=2)
    per_token = dequantize(codes, scales, zeros, 16, 2, torch.float32)
    assert (per_token[:, :, normal] - spiked.keys[0][:, :, normal]).norm() > 5 * err


def test_per_token_values_survive_outlier_tokens():
    snap = snapshot(tokens=64)
    values = tuple(v.clone() for v in snap.values)
    for v in values:
        v[:, 0, :] *= 80.0  # an attention-sink-like token
    spiked = KVSnapshot(snap.keys, values, snap.positions)
    codec = codec_for(Mode.INT4)
    decoded = codec.decode(codec.encode(spiked))
    rest = slice(1, None)
    err = (decoded.values[2][:, rest] - spiked.values[2][:, rest]).norm() / spiked.values[2][:, rest].norm()
    assert err < 0.10


@settings(max_examples=60, deadline=None)
@given(heads=st.integers(1, 3), tokens=st.integers(1, 45), head_dim=st.integers(1, 20),
       group=st.integers(1, 40), bits=st.sampled_from([4, 8]), dim=st.sampled_from([1, 2]),
       seed=st.integers(0, 1000))
def test_quantization_error_is_at_most_half_a_step(heads, tokens, head_dim, group, bits, dim, seed):
    x = torch.randn(heads, tokens, head_dim, generator=torch.Generator().manual_seed(seed)) * 3
    codes, scales, zeros = quantize(x, bits, group, dim)
    assert codes.shape == x.shape and codes.dtype == torch.uint8 and int(codes.max()) < 2**bits
    back = dequantize(codes, scales, zeros, group, dim, torch.float32)
    step = scales.float().repeat_interleave(group, dim=dim).narrow(dim, 0, x.shape[dim])
    # half a step from rounding, plus fp16 rounding of the zero-point (2**-11 relative)
    slack = x.abs().max() * 2.0**-10 + 1e-6
    assert bool(((back - x).abs() <= step / 2 + slack).all())


@given(st.lists(st.integers(0, 15), min_size=0, max_size=99))
def test_int4_packing_roundtrips_two_codes_per_byte(values):
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.numel() == (len(values) + 1) // 2
    assert torch.equal(unpack_int4(packed, (len(values),)), codes)


def test_constant_tensor_roundtrips_exactly_in_int4():
    const = KVSnapshot((torch.full((2, 33, 16), 0.5),), (torch.full((2, 33, 16), -2.0),),
                       torch.arange(33))
    codec = codec_for(Mode.INT4)
    assert relative_error(const, codec.decode(codec.encode(const))) == 0.0


@pytest.mark.parametrize("tokens, group", [(1, 32), (31, 32), (33, 32), (70, 7), (64, 64)])
def test_token_counts_not_divisible_by_group_use_a_short_last_group(tokens, group):
    snap = snapshot(tokens=tokens)
    codec = codec_for(Mode.INT8, group_size=group)
    encoded = codec.encode(snap)
    assert encoded.keys[0].scales.shape == (2, -(-tokens // group), 16)
    assert encoded.size_bytes == encoded_size_bytes(encoded.layout)
    assert relative_error(snap, codec.decode(encoded)) < 0.01


def test_mixed_int4_keeps_protected_layers_in_bf16():
    snap = snapshot()
    codec = codec_for(Mode.MIXED_INT4, protected_layers=(0, 2))
    decoded = codec.decode(codec.encode(snap))
    for layer in (0, 2):
        assert torch.equal(decoded.keys[layer], snap.keys[layer].to(torch.bfloat16).float())
    assert not torch.equal(decoded.keys[1], snap.keys[1].to(torch.bfloat16).float())


def test_mixed_int4_without_protected_layers_says_where_to_get_them():
    with pytest.raises(ValueError, match="protected_layers_for"):
        codec_for(Mode.MIXED_INT4).encode(snapshot())


def test_protected_layer_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        codec_for(Mode.MIXED_INT4, protected_layers=(4,)).encode(snapshot())


@pytest.mark.parametrize("mode", [Mode.INT8, Mode.INT4, Mode.BF16])
def test_uniform_modes_reject_protected_layers(mode):
    with pytest.raises(ValueError, match="mixed_int4"):
        codec_for(mode, protected_layers=(1,)).encode(snapshot())


@pytest.mark.parametrize("mode", [Mode.SCOUT, Mode.LOCAL])
def test_modes_without_kv_have_no_codec(mode):
    with pytest.raises(ValueError, match="carries no KV codec"):
        codec_for(mode)


def test_non_finite_kv_is_refused_with_advice():
    snap = snapshot()
    bad = list(snap.keys)
    bad[1] = bad[1].clone()
    bad[1][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="BF16 mode"):
        codec_for(Mode.INT8).encode(KVSnapshot(tuple(bad), snap.values, snap.positions))


def test_decode_honours_dtype_and_refuses_another_modes_payload():
    snap = snapshot()
    encoded = codec_for(Mode.INT8).encode(snap)
    assert codec_for(Mode.INT8).decode(encoded, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="codec_for"):
        codec_for(Mode.INT4).decode(encoded)


def test_pruned_snapshot_encodes_only_kept_tokens():
    snap = snapshot(tokens=100).select(torch.arange(0, 100, 4))
    encoded = codec_for(Mode.INT4).encode(snap)
    assert encoded.num_tokens == 25
    assert torch.equal(codec_for(Mode.INT4).decode(encoded).positions, snap.positions)


# --- real KV of the embedded model -------------------------------------------------------

TEXT = ("The Amazon rainforest covers much of the Amazon basin of South America. The basin "
        "encompasses seven million square kilometres, of which five and a half million are "
        "covered by the rainforest. The region includes territory belonging to nine nations. "
        "Question: How many nations have territory in the Amazon region? Answer:")


@pytest.fixture(scope="module")
def real_kv(embedded_model):
    ids = embedded_model.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = embedded_model.model(ids, use_cache=True)
    return KVSnapshot.from_cache(out.cache), ids


@pytest.mark.model
@pytest.mark.parametrize("mode, bound", [(Mode.INT8, 0.01), (Mode.INT4, 0.10)])
def test_real_kv_roundtrip_error_below_bound(real_kv, mode, bound):
    snap, _ = real_kv
    error = relative_error(snap, codec_for(mode).decode(codec_for(mode).encode(snap)))
    assert error < bound, f"{mode.value} relative error {error:.4f}"


def greedy(model, snap: KVSnapshot, first_token: torch.Tensor, steps: int) -> list[int]:
    cache = snap.to_cache()
    position, token, out = snap.next_position, first_token.view(1, 1), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(token, cache=cache,
                           position_ids=torch.tensor([[position]])).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(token))
            position += 1
    return out


@pytest.mark.model
@pytest.mark.parametrize("prompt", [
    TEXT,
    "List the first five prime numbers: 2, 3,",
])
def test_int8_decoded_cache_continues_with_the_same_greedy_answer(embedded_model, prompt):
    ids = embedded_model.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = embedded_model.model(ids[:, :-1], use_cache=True)
    snap = KVSnapshot.from_cache(out.cache)
    codec = codec_for(Mode.INT8)
    decoded = codec.decode(codec.encode(snap))
    reference = greedy(embedded_model.model, snap, ids[0, -1], 12)
    with torch.no_grad():  # the cache path itself agrees with a plain full forward
        assert reference[0] == int(embedded_model.model(ids).logits[0, -1].argmax())
    assert greedy(embedded_model.model, decoded, ids[0, -1], 12) == reference


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode, protected", ALL)
def test_gpu_encoding_matches_cpu(mode, protected):
    snap = snapshot(tokens=333)
    gpu = KVSnapshot(tuple(k.cuda() for k in snap.keys), tuple(v.cuda() for v in snap.values),
                     snap.positions.cuda())
    codec = codec_for(mode, protected_layers=protected)
    on_cpu, on_gpu = codec.encode(snap), codec.encode(gpu)
    assert on_gpu.keys[0].data.is_cuda
    for a, b in zip(on_cpu.keys + on_cpu.values, on_gpu.keys + on_gpu.values):
        for x, y in zip(a.parts()[1:], b.parts()[1:]):
            assert torch.equal(x, y.cpu())  # identical fp16 scales and zeros
    decoded = codec.decode(on_gpu, device="cuda")
    assert decoded.keys[0].is_cuda
    assert relative_error(codec.decode(on_cpu), decoded) < 1e-3
