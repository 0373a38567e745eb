import pytest
import torch

from ray_scout.core.llm import bottleneck
from ray_scout.core.llm.models import load_model

PROMPTS = [bottleneck.CALIBRATION_PROMPTS[0], bottleneck.CALIBRATION_PROMPTS[3]]


@pytest.fixture(scope="module")
def planted():
    """The tiny model with a planted bottleneck at layer 2: sharp attention there (q, k
    x20) makes key errors move the attention weights, and a loud output projection (x10)
    carries them to the logits; layer 0, the most sensitive one of the random model, is
    quietened (x0.1) so that the plant, not the random draw, decides the ranking."""
    lm = load_model("random:tiny")
    with torch.no_grad():
        attention = lm.model.model.layers[2].self_attn
        attention.q_proj.weight.mul_(20.0)
        attention.k_proj.weight.mul_(20.0)
        attention.o_proj.weight.mul_(10.0)
        lm.model.model.layers[0].self_attn.o_proj.weight.mul_(0.1)
    return lm


def test_planted_value_outlier_layer_ranks_first(planted):
    report = bottleneck.diagnose_bottleneck_layers(planted, PROMPTS, top_k=1)
    assert len(report.scores) == planted.facts.num_layers == len(report.ranking)
    assert sorted(report.ranking) == list(range(planted.facts.num_layers))
    assert [report.scores[i] for i in report.ranking] == sorted(report.scores, reverse=True)
    assert report.top(1) == (2,)
    assert report.scores[2] > 2 * max(s for i, s in enumerate(report.scores) if i != 2)


def test_protected_layers_are_cached_per_model_and_prompts(planted, tmp_path, monkeypatch):
    assert bottleneck.protected_layers_for(planted, PROMPTS, root=tmp_path) == (2,)
    path = bottleneck.report_path(planted.model_id, tmp_path)
    assert path.name == "random_tiny.json" and path.exists()

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed although a matching report was cached")

    monkeypatch.setattr(bottleneck, "diagnose_bottleneck_layers", refuse)
    assert 2 in bottleneck.protected_layers_for(planted, PROMPTS, top_k=2, root=tmp_path)
    with pytest.raises(AssertionError, match="recomputed"):
        bottleneck.protected_layers_for(planted, PROMPTS[:1], root=tmp_path)


def test_unreadable_cache_says_to_delete_it(tmp_path):
    path = bottleneck.report_path("m", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="delete it"):
        bottleneck.load_report("m", tmp_path)


def test_top_k_beyond_layers_is_refused(planted):
    with pytest.raises(ValueError, match="top_k=9"):
        bottleneck.diagnose_bottleneck_layers(planted, PROMPTS, top_k=9)


def test_too_short_prompt_is_refused(planted):
    with pytest.raises(ValueError, match="too short"):
        bottleneck.diagnose_bottleneck_layers(planted, ["hi"])


def test_the_embedded_models_shipped_report_is_found():
    # Without it every mixed_int4 run re-measures the diagnosis (minutes on the CPU).
    from ray_scout.core.llm import bottleneck

    path = bottleneck.shipped_report_path("smollm2-135m-instruct")
    report = bottleneck.load_report("smollm2-135m-instruct", path=path)
    assert report is not None and report.top(1) == (18,)
    assert report.prompts_digest == bottleneck.prompts_digest(list(bottleneck.CALIBRATION_PROMPTS))
