"""The fused prefill (what ``generation.prefill`` runs on CUDA) computes what the model's
own forward computes: keys, values, queries and logits, for Llama and Qwen2 (q/k/v biases)."""

from __future__ import annotations

import pytest
import torch

from ray_scout.core.llm import fused_prefill
from ray_scout.core.llm.generation import GenerationError, prefill, uses_fused_prefill
from ray_scout.core.llm.models import KVFacts, LoadedModel, load_model
from ray_scout.core.llm.prompt import build_prompt

CONTEXT = "The museum opened in 1887. Its first director was Clara Mendes, a botanist from Lisbon."
QUESTION = "Who was the first director of the museum?"


def tiny_qwen2(tokenizer, *, device="cpu", dtype=torch.float32, **overrides) -> LoadedModel:
    """A 3-layer Qwen2 with random, non-zero q/k/v biases (the Llama preset has none)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                         max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, **overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    return LoadedModel("tiny-qwen2", model, tokenizer, KVFacts.from_config(config, "tiny-qwen2"))


@pytest.fixture(scope="module")
def llama():
    return load_model("random:tiny")  # its own instance: fusing re-points its parameters


@pytest.fixture(scope="module")
def qwen2(llama):
    return tiny_qwen2(llama.tokenizer)


@pytest.fixture(scope="module")
def layout(llama):
    return build_prompt(llama.tokenizer, CONTEXT, QUESTION)


def assert_same_prefill(fused, plain, **tolerance):
    torch.testing.assert_close(fused.logits, plain.logits, **tolerance)
    for got, want in zip(fused.snapshot.keys + fused.snapshot.values,
                         plain.snapshot.keys + plain.snapshot.values):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, **tolerance)
    assert sorted(fused.queries) == sorted(plain.queries)
    for layer, query in plain.queries.items():
        torch.testing.assert_close(fused.queries[layer], query, **tolerance)
    assert torch.equal(fused.snapshot.positions, plain.snapshot.positions)
    assert fused.scaling == plain.scaling


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_fused_prefill_equals_the_model_forward(request, name, layout):
    lm = request.getfixturevalue(name)
    plain = prefill(lm, layout, capture="all", fused=False)
    fused = prefill(lm, layout, capture="all", fused=True)
    assert_same_prefill(fused, plain)


def test_last_layer_query_is_captured_for_every_row(llama, layout):
    # The last layer runs its MLP on the last row only; its queries still cover the prompt.
    fused = prefill(llama, layout, capture="last", fused=True)
    assert list(fused.queries) == [fused.last_layer]
    assert fused.queries[fused.last_layer].shape[1] == layout.num_tokens


def test_fusing_projections_adds_no_memory_and_keeps_the_model_forward(llama, layout):
    ids = layout.input_ids.unsqueeze(0)
    with torch.inference_mode():
        before = llama.model(ids).logits
    weights = fused_prefill.layer_weights(llama.model)
    attn = llama.model.model.layers[1].self_attn
    assert attn.q_proj.weight.data_ptr() == weights[1].qkv.data_ptr()
    k_offset = attn.q_proj.weight.numel() * attn.q_proj.weight.element_size()
    assert attn.k_proj.weight.data_ptr() == weights[1].qkv.data_ptr() + k_offset
    assert fused_prefill.layer_weights(llama.model) is weights  # fused once per model
    with torch.inference_mode():
        after = llama.model(ids).logits
    torch.testing.assert_close(after, before)


def test_cpu_keeps_the_model_forward_by_default(llama, qwen2):
    assert not uses_fused_prefill(llama) and not uses_fused_prefill(qwen2)
    assert fused_prefill.supports(llama.model) and fused_prefill.supports(qwen2.model)


def test_sliding_window_attention_is_refused(llama, layout):
    lm = tiny_qwen2(llama.tokenizer, use_sliding_window=True, sliding_window=8,
                    max_window_layers=0)
    assert not fused_prefill.supports(lm.model)
    with pytest.raises(GenerationError, match="fused=False"):
        prefill(lm, layout, fused=True)


def test_fused_forward_rejects_batched_ids(llama):
    with pytest.raises(ValueError, match="1-D"):
        fused_prefill.forward(llama.model, torch.zeros(1, 5, dtype=torch.long), [],
                              compiled=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled path runs on CUDA")
def test_compiled_fused_prefill_agrees_with_the_model_forward_on_cuda(llama, layout):
    lm = tiny_qwen2(llama.tokenizer, device="cuda", dtype=torch.bfloat16)
    assert uses_fused_prefill(lm)
    plain = prefill(lm, layout, capture="last", fused=False)
    fused = prefill(lm, layout, capture="last")
    # bf16: fused kernels round at other points than the module-by-module forward.
    assert_same_prefill(fused, plain, rtol=0.05, atol=0.05)
