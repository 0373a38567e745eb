"""The second model family: Gemma 3 270M (base, its own tokenizer), GGUF path sources, and
scout across the two families' real tokenizers.

Marked ``model``: they load real models (scripts/setup.sh installs both; CI runs them).
"""

import json
import shutil

import pytest
import torch

from ray_scout.core.evaluation import tasks
from ray_scout.core.llm import generation, models, scout, selection
from ray_scout.core.llm.prompt import build_prompt

pytestmark = pytest.mark.model

CONTEXT = ("The museum opened in 1887. Its first director was Clara Mendes, a botanist from "
           "Lisbon. The east wing, added in 1912, holds 4,300 pressed plants; naïve visitors "
           "call it the “green room”.")
QUESTION = "Who was the first director of the museum?"


@pytest.fixture(scope="module")
def gemma():
    return models.load_model("embedded:gemma3-270m")


def test_gemma_checkpoint_is_cached_and_matches_its_preset(gemma):
    path = models.embedded_checkpoint(models.GEMMA_NAME)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert gemma.facts == models.facts_for("embedded:gemma3-270m")
    preset = models.preset_config("gemma3-270m")
    assert preset.layer_types == gemma.model.config.layer_types
    assert preset.sliding_window == gemma.model.config.sliding_window == 512
    assert gemma.facts.bf16_bytes_per_token() == 2 * 2 * 18 * 1 * 256


def test_base_model_gets_bos_and_a_completion_prompt_that_answers_the_span(gemma):
    layout = build_prompt(gemma.tokenizer, CONTEXT, QUESTION)
    assert int(layout.input_ids[0]) == gemma.tokenizer.bos_token_id
    assert gemma.tokenizer.decode(layout.input_ids).endswith("Answer:")
    answer = generation.answer_full(gemma, layout, max_new_tokens=12)
    assert answer.text.strip(" .") == "Clara Mendes"


def test_every_layer_keeps_the_whole_prompt_past_the_sliding_window(gemma):
    # 5 of Gemma's 6 layers attend within 512 tokens; the snapshot still holds every
    # position of every layer (selection needs them all), and answering from it equals
    # the model's own forward over the whole prompt.
    sample = tasks.generate("single_needle", 1, context_tokens=500, seed=3,
                            count_tokens=gemma.tokenizer)[0]
    layout = build_prompt(gemma.tokenizer, sample.context, sample.question)
    assert layout.num_tokens > 512
    pre = generation.prefill(gemma, layout)
    assert {k.shape[1] for k in pre.snapshot.keys} == {layout.num_tokens}
    reference = gemma.model(layout.input_ids.unsqueeze(0)).logits[0, -1]
    torch.testing.assert_close(pre.logits, reference, rtol=1e-4, atol=1e-3)
    full = generation.greedy_answer(gemma, pre.snapshot, pre.logits, max_new_tokens=8)
    pruned = generation.answer_pruned(gemma, pre, torch.arange(layout.num_context),
                                      max_new_tokens=8)
    assert full.token_ids == pruned.token_ids
    assert sample.answers[0] in full.text


def test_a_pruned_cache_past_the_sliding_window_still_answers(gemma):
    # Kept tokens keep their positions: Gemma's sliding layers must count the window in
    # positions, not cache entries, or the answer at 1K tokens comes out empty.
    sample = tasks.generate("multi_needle", 1, context_tokens=1024, seed=0,
                            count_tokens=gemma.tokenizer)[0]
    pre = generation.prefill(gemma, build_prompt(gemma.tokenizer, sample.context,
                                                 sample.question))
    kept = selection.select_positions(selection.q2c(pre), 0.75)
    answer = generation.answer_pruned(gemma, pre, kept, max_new_tokens=8)
    assert answer.text.isdigit() and len(answer.text) == len(sample.answers[0])


def test_q2c_from_query_states_matches_eager_attention_on_gemma(gemma):
    layout = build_prompt(gemma.tokenizer, CONTEXT, QUESTION)
    pre = generation.prefill(gemma, layout)
    ours = selection.q2c(pre)
    reference = selection.q2c_eager_reference(gemma, layout)
    torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-4)


def test_cross_family_mapping_covers_every_kept_character(embedded_model, gemma):
    edge = build_prompt(embedded_model.tokenizer, CONTEXT, QUESTION)
    cloud = build_prompt(gemma.tokenizer, CONTEXT, QUESTION)
    # The two tokenizers cut the text differently (digits, accents, quotes).
    assert edge.context_offsets.tolist() != cloud.context_offsets.tolist()
    for positions in (torch.arange(0, edge.num_context, 3), torch.arange(edge.num_context)):
        mapped = scout.mapping_coverage(edge.context_offsets, cloud.context_offsets, positions,
                                        len(CONTEXT))
        assert mapped.coverage == 1.0
        assert 0.0 < mapped.precision <= 1.0
    assert mapped.cloud_positions.tolist() == list(range(cloud.num_context))
    director = CONTEXT.index("Clara Mendes")
    kept = [i for i, (s, e) in enumerate(edge.context_offsets.tolist())
            if s < director + len("Clara Mendes") and e > director]
    mapped = scout.map_positions(edge.context_offsets, cloud.context_offsets, kept)
    assert "Clara Mendes" in gemma.tokenizer.decode(
        cloud.input_ids[cloud.context_span.start + mapped])


def test_scout_across_families_through_the_wire_equals_the_cloud_model_alone(embedded_model,
                                                                            gemma):
    # At 100% retention the edge's character spans must land on every cloud token, so the
    # cloud model answers exactly as it does alone: token for token, in both directions.
    from ray_scout.core.stages.full import CloudStage, EdgeOptions, EdgeStage
    from ray_scout.core.modes import Mode

    for edge_lm, cloud_lm in ((embedded_model, gemma), (gemma, embedded_model)):
        edge = EdgeStage(edge_lm, EdgeOptions(scout_retention=1.0, max_new_tokens=12),
                         cloud_model_id=cloud_lm.model_id)
        data = edge.encode(edge.analyze(CONTEXT, QUESTION), Mode.SCOUT,
                           cloud_has_document=False).data
        answer = CloudStage({cloud_lm.model_id: cloud_lm}, max_new_tokens=12).answer(data)
        alone = generation.answer_full(cloud_lm, build_prompt(cloud_lm.tokenizer, CONTEXT,
                                                              QUESTION), max_new_tokens=12)
        assert answer.model_id == cloud_lm.model_id
        assert answer.text == alone.text and "Clara Mendes" in answer.text


def test_gguf_file_source_converts_once_and_caches_by_content_hash(tmp_path, monkeypatch,
                                                                    embedded_model):
    monkeypatch.setenv("RAY_SCOUT_CACHE", str(tmp_path / "cache"))
    original = models._smollm2_gguf(tmp_path)
    folder = tmp_path / "weights"
    folder.mkdir()
    gguf = folder / "my-model.gguf"
    shutil.copyfile(original, gguf)
    lm = models.load_model(str(gguf))
    assert lm.model_id == str(gguf) and lm.facts.num_layers == embedded_model.facts.num_layers
    converted = list((tmp_path / "cache").glob("gguf-*"))
    assert len(converted) == 1
    ids = torch.arange(5, 25).unsqueeze(0)
    torch.testing.assert_close(lm.model(ids).logits, embedded_model.model(ids).logits)

    def no_conversion(*args, **kwargs):
        raise AssertionError("a cached GGUF was converted again")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    # The folder and a renamed copy hit the same cache entry: the key is the content.
    renamed = tmp_path / "renamed.gguf"
    gguf.rename(renamed)
    assert models.gguf_checkpoint(str(folder.parent / "renamed.gguf")) == converted[0]
    shutil.copyfile(renamed, gguf)
    assert models.facts_for(str(folder)) == models.KVFacts.from_config(
        lm.model.config, str(folder))
