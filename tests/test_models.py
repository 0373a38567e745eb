import json

import pytest
import torch

from ray_scout.core.llm import models


@pytest.mark.parametrize(
    "preset, layers, kv_heads, head_dim, bf16_bytes_per_token",
    [
        # 2 (K,V) x layers x kv_heads x head_dim x 2 bytes
        ("qwen2.5-3b", 36, 2, 128, 36_864),
        ("qwen2.5-7b", 28, 4, 128, 57_344),
        ("qwen2.5-14b", 48, 8, 128, 196_608),
        ("smollm2-135m", 30, 3, 64, 23_040),
    ],
)
def test_preset_kv_facts_match_published_shapes(preset, layers, kv_heads, head_dim,
                                                bf16_bytes_per_token):
    facts = models.facts_for("random:" + preset)
    assert (facts.num_layers, facts.num_kv_heads, facts.head_dim) == (layers, kv_heads, head_dim)
    assert facts.bf16_bytes_per_token() == bf16_bytes_per_token


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(models.ModelSourceError, match="qwen2.5-7b"):
        models.facts_for("random:qwen9")


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(models.ModelSourceError, match="does not exist"):
        models.load_model(str(tmp_path / "nope"))


def test_random_model_is_finite_and_deterministic(tiny_model):
    ids = torch.arange(1, 40).unsqueeze(0)
    logits = tiny_model.model(ids).logits
    assert torch.isfinite(logits).all()
    again = models.load_model("random:tiny").model(ids).logits
    assert torch.equal(logits, again)


@pytest.mark.model
def test_embedded_checkpoint_is_cached_safetensors_and_matches_facts(embedded_model):
    path = models.embedded_checkpoint()
    assert any(path.glob("*.safetensors"))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert embedded_model.facts == models.facts_for("embedded")


@pytest.mark.model
def test_embedded_model_answers_an_extractive_question(embedded_model):
    tok = embedded_model.tokenizer
    messages = [{"role": "user", "content":
                 "Context: The Eiffel Tower was completed in 1889 in Paris.\n"
                 "Question: In which year was the Eiffel Tower completed?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    out = embedded_model.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "1889" in tok.decode(out[0, ids.shape[1]:])


def test_kv_snapshot_roundtrip_continues_decoding_exactly(tiny_model):
    from ray_scout.core.llm.kv import KVSnapshot

    ids = torch.arange(1, 20).unsqueeze(0)
    snapshot = KVSnapshot.from_cache(tiny_model.model(ids, use_cache=True).cache)
    assert snapshot.num_tokens == 19 and snapshot.next_position == 19
    snapshot.check_matches(tiny_model.facts)
    nxt = torch.tensor([[5]])
    full = tiny_model.model(torch.cat([ids, nxt], 1)).logits[0, -1]
    step = tiny_model.model(nxt, cache=snapshot.to_cache(),
                            position_ids=torch.tensor([[19]])).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_kv_snapshot_rejects_bad_shapes_and_indices(tiny_model):
    from ray_scout.core.llm.kv import KVShapeError, KVSnapshot

    k = torch.zeros(2, 5, 16)
    with pytest.raises(KVShapeError, match="positions"):
        KVSnapshot((k,), (k,), torch.arange(4))
    with pytest.raises(KVShapeError, match="increasing"):
        KVSnapshot((k,), (k,), torch.tensor([0, 2, 1, 3, 4]))
    snap = KVSnapshot((k,), (k,), torch.arange(5))
    with pytest.raises(IndexError):
        snap.select(torch.tensor([7]))
    with pytest.raises(KVShapeError, match="needs"):
        snap.check_matches(tiny_model.facts)


def test_embedded_sources_name_their_models():
    assert models.embedded_model("embedded").name == models.EMBEDDED_NAME
    assert models.embedded_model("embedded:gemma3-270m").name == models.GEMMA_NAME
    assert models.embedded_model("random:tiny") is None
    with pytest.raises(models.ModelSourceError, match="embedded:gemma3-270m"):
        models.load_model("embedded:gemma9")
    # KV facts of an embedded model come from its preset: no conversion needed.
    facts = models.facts_for("embedded:gemma3-270m")
    assert (facts.model_id, facts.num_layers, facts.num_kv_heads, facts.head_dim) == \
        ("gemma3-270m", 18, 1, 256)


def test_gguf_sources_are_recognized_and_bad_ones_rejected(tmp_path):
    assert models.is_gguf_source(str(tmp_path / "model.gguf"))
    assert not models.is_gguf_source(str(tmp_path))  # empty folder: not a GGUF source
    with pytest.raises(models.ModelSourceError, match="does not exist"):
        models.load_model(str(tmp_path / "model.gguf"))
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    assert models.is_gguf_source(str(tmp_path))
    with pytest.raises(models.ModelSourceError, match="2 .gguf files.*name one"):
        models.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert not models.is_gguf_source(str(tmp_path))  # a checkpoint directory wins
