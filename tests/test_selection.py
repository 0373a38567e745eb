"""Selection scorers: Q2C from Q·K equals the eager reference; baselines behave as specified."""

import random

import pytest
import torch

from ray_scout.core.llm.generation import prefill
from ray_scout.core.llm.prompt import build_prompt
from ray_scout.core.llm.selection import (
    CAPTURE, SCORERS, SelectionError, q2c, q2c_all_layers, q2c_eager_reference, score,
    select_positions,
)

CONTEXT = ("The museum opened in 1887. Its first director was Clara Mendes, a botanist from Lisbon. "
           "The building has three floors and a glass roof. Visitors can see fossils, maps and old tools.")
QUESTION = "Who was the first director of the museum?"


@pytest.fixture(scope="module")
def tiny_prefill(tiny_model):
    return prefill(tiny_model, build_prompt(tiny_model.tokenizer, CONTEXT, QUESTION), capture="all")


def test_select_positions_takes_rounded_top_k_sorted():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2])
    assert select_positions(scores, 0.4).tolist() == [1, 3]
    assert select_positions(scores, 0.5).tolist() == [1, 3]  # round(2.5) == 2
    assert select_positions(scores, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert select_positions(scores, 0.0).tolist() == []


def test_select_positions_breaks_ties_toward_earlier_positions():
    assert select_positions(torch.ones(6), 0.5).tolist() == [0, 1, 2]


@pytest.mark.parametrize("retention", [-0.1, 1.5])
def test_select_positions_rejects_bad_retention(retention):
    with pytest.raises(SelectionError):
        select_positions(torch.ones(4), retention)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_scorer_gives_one_finite_or_pinned_score_per_context_token(tiny_model, tiny_prefill, name):
    scores = score(name, tiny_prefill)
    assert scores.shape == (tiny_prefill.layout.num_context,)
    assert not torch.isnan(scores).any()
    assert name in CAPTURE


def test_the_torch_free_scorer_names_are_the_scorers():
    assert set(CAPTURE) == set(SCORERS)


def test_q2c_from_query_states_equals_eager_attention_on_tiny(tiny_model, tiny_prefill):
    layout = tiny_prefill.layout
    torch.testing.assert_close(q2c(tiny_prefill), q2c_eager_reference(tiny_model, layout), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(q2c_all_layers(tiny_prefill),
                               q2c_eager_reference(tiny_model, layout, all_layers=True), atol=1e-5, rtol=1e-4)
    assert tiny_model.model.config._attn_implementation == "sdpa"  # the reference restores SDPA


def test_q2c_mass_is_bounded_by_heads_times_question_tokens(tiny_model, tiny_prefill):
    total = float(q2c(tiny_prefill).sum())
    bound = tiny_model.facts.num_attention_heads * len(tiny_prefill.layout.question_span)
    assert 0 < total <= bound + 1e-4


def test_all_layer_q2c_needs_all_layer_queries(tiny_model):
    pre = prefill(tiny_model, build_prompt(tiny_model.tokenizer, CONTEXT, QUESTION), capture="last")
    with pytest.raises(SelectionError, match="capture='last'"):
        q2c_all_layers(pre)


def test_streaming_keeps_sinks_and_most_recent(tiny_prefill):
    n = tiny_prefill.layout.num_context
    kept = select_positions(score("streaming", tiny_prefill, sinks=2), 10 / n).tolist()
    assert kept == [0, 1] + list(range(n - 8, n))


def test_h2o_always_keeps_the_recent_window(tiny_prefill):
    n = tiny_prefill.layout.num_context
    kept = select_positions(score("h2o", tiny_prefill, recent=5), 0.25).tolist()
    assert set(range(n - 5, n)) <= set(kept)


def test_snapkv_pooling_smooths_votes(tiny_prefill):
    raw = score("snapkv", tiny_prefill, kernel=1)
    pooled = score("snapkv", tiny_prefill, kernel=5, pooling="max")
    assert (pooled >= raw - 1e-7).all()
    with pytest.raises(SelectionError):
        score("snapkv", tiny_prefill, kernel=4)


def test_random_is_seeded(tiny_prefill):
    assert torch.equal(score("random", tiny_prefill, seed=3), score("random", tiny_prefill, seed=3))
    assert not torch.equal(score("random", tiny_prefill, seed=3), score("random", tiny_prefill, seed=4))


def test_unknown_scorer_names_the_known_ones(tiny_prefill):
    with pytest.raises(SelectionError, match="q2c"):
        score("attention", tiny_prefill)


@pytest.mark.model
def test_q2c_from_query_states_equals_eager_attention_on_embedded(embedded_model):
    layout = build_prompt(embedded_model.tokenizer, CONTEXT, QUESTION)
    pre = prefill(embedded_model, layout, capture="last")
    mine, ref = q2c(pre), q2c_eager_reference(embedded_model, layout)
    torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)
    for retention in (0.25, 0.5, 0.75):
        assert torch.equal(select_positions(mine, retention), select_positions(ref, retention))


def needle_prompt(tokenizer, filler_sentences=48, seed=0):
    """A fact sentence in the middle of ~500 tokens of varied filler; returns layout and needle tokens."""
    rng = random.Random(seed)
    subjects = ["The river", "A farmer", "The old bridge", "Our neighbour", "The council", "A small boat"]
    verbs = ["crossed", "painted", "visited", "repaired", "described", "watched"]
    places = ["the green hills", "a quiet road", "the market square", "an empty field", "the harbour"]
    times = ["morning", "evening", "spring", "winter"]
    sentences = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(places)} in the {rng.choice(times)}."
                 for _ in range(filler_sentences)]
    needle = "The secret code for the vault is 4729 and it was set by Admiral Okafor."
    sentences.insert(filler_sentences // 2, needle)
    context = " ".join(sentences)
    layout = build_prompt(tokenizer, context, "What is the secret code for the vault?")
    start = context.index(needle)
    offsets = layout.context_offsets
    inside = (offsets[:, 0] >= start) & (offsets[:, 1] <= start + len(needle))
    return layout, torch.nonzero(inside).view(-1)


@pytest.mark.model
def test_q2c_keeps_the_needle_at_25_percent_and_random_does_not(embedded_model):
    layout, needle = needle_prompt(embedded_model.tokenizer)
    assert 450 <= layout.num_context <= 600
    pre = prefill(embedded_model, layout, capture="last")
    kept_q2c = torch.isin(needle, select_positions(score("q2c", pre), 0.25)).float().mean()
    kept_random = torch.isin(needle, select_positions(score("random", pre, seed=0), 0.25)).float().mean()
    assert kept_q2c >= 0.5
    assert kept_random < 0.35


def test_q2c_pooling_is_snapkv_smoothing_of_the_question_votes(tiny_prefill):
    from ray_scout.core.llm.selection import pool, votes

    layout = tiny_prefill.layout
    question = torch.arange(layout.question_span.start, layout.question_span.stop)
    assert torch.equal(score("q2c", tiny_prefill), votes(tiny_prefill, question))
    pooled = score("q2c", tiny_prefill, kernel=5)
    assert torch.allclose(pooled, pool(votes(tiny_prefill, question), 5))
    assert not torch.allclose(pooled, score("q2c", tiny_prefill))
    # SnapKV's window reaching back over the whole question and tail = those rows' votes.
    window = layout.num_tokens - layout.question_span.start
    tail = torch.arange(layout.question_span.start, layout.num_tokens)
    assert torch.allclose(score("snapkv", tiny_prefill, window=window, kernel=1),
                          votes(tiny_prefill, tail))
