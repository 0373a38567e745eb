import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_scout.core.evaluation.metrics import (
    bootstrap_ci, contains_answer, exact_match, f1, normalize_answer, paired_test,
)

# ------------------------------------------------------------------ normalization and scores
# Expected values follow the official SQuAD v2.0 evaluation script's definitions, worked by
# hand: lower case, strip punctuation, then articles, then collapse whitespace.


@pytest.mark.parametrize("text, normalized", [
    ("The Cat sat, on the mat!", "cat sat on mat"),
    ("An  apple a\tday", "apple day"),
    ("the-end", "theend"),  # punctuation goes first, so the article survives as part of a word
    ("Theatre and anthem", "theatre and anthem"),  # articles only as whole words
    ("  Denver   Broncos. ", "denver broncos"),
    ("A", ""),
    ("", ""),
])
def test_normalize_answer_matches_the_official_rules(text, normalized):
    assert normalize_answer(text) == normalized


@pytest.mark.parametrize("prediction, answers, em, f1_score", [
    ("Denver Broncos", ["Denver Broncos", "The Denver Broncos"], 1.0, 1.0),
    ("the Denver Broncos.", ["Denver Broncos"], 1.0, 1.0),
    ("Broncos", ["Denver Broncos"], 0.0, 2 / 3),
    ("Denver Broncos won", ["Denver Broncos"], 0.0, 0.8),
    ("Carolina Panthers", ["Denver Broncos", "Panthers"], 0.0, 2 / 3),  # best gold counts
    ("the the cat cat", ["cat"], 0.0, 2 / 3),  # repeated tokens count once per gold token
    ("Santa Clara", ["Levi's Stadium"], 0.0, 0.0),
])
def test_exact_match_and_f1_on_answerable_questions(prediction, answers, em, f1_score):
    assert exact_match(prediction, answers) == em
    assert f1(prediction, answers) == pytest.approx(f1_score)


@pytest.mark.parametrize("prediction, score", [
    ("", 1.0), ("the", 1.0), ("  .", 1.0),  # normalizes to nothing: the script's "no answer"
    ("Denver", 0.0),
])
def test_unanswerable_question_scores_one_only_for_an_empty_prediction(prediction, score):
    assert exact_match(prediction, []) == score
    assert f1(prediction, []) == score


def test_golds_that_normalize_to_nothing_make_the_question_unanswerable():
    assert f1("", ["", "a"]) == 1.0
    assert f1("Denver", ["", "a"]) == 0.0


def test_empty_prediction_on_an_answerable_question_scores_zero():
    assert f1("", ["Denver"]) == 0.0
    assert exact_match("", ["Denver"]) == 0.0


def test_answers_given_as_a_bare_string_are_rejected():
    with pytest.raises(TypeError, match="wrap a single answer"):
        f1("Denver", "Denver")
    with pytest.raises(TypeError, match="prediction must be a string"):
        exact_match(None, ["Denver"])


@pytest.mark.parametrize("prediction, answers, score", [
    ("Kofi Castell was born in the city of Lisbon.", ["Lisbon"], 1.0),
    ("Lisbonia", ["Lisbon"], 0.0),  # whole tokens only
    ("The code is New York City", ["new york"], 1.0),
    ("", [], 1.0),
    ("Lisbon", [], 0.0),
])
def test_contains_answer_credits_a_verbose_reply_holding_the_gold(prediction, answers, score):
    assert contains_answer(prediction, answers) == score


@given(st.text(max_size=30), st.lists(st.text(max_size=30), max_size=4))
def test_exact_match_implies_contains_answer(prediction, answers):
    if exact_match(prediction, answers):
        assert contains_answer(prediction, answers) == 1.0


@given(st.text())
def test_normalization_is_idempotent(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once


@given(st.text(alphabet=st.characters(max_codepoint=127)), st.lists(st.text(max_size=20),
                                                                     max_size=4))
def test_scores_ignore_case_punctuation_and_articles(prediction, answers):
    decorated = "The " + prediction.upper() + " !"
    assert f1(decorated, answers) == f1(prediction, answers)
    assert exact_match(decorated, answers) == exact_match(prediction, answers)


@given(st.text(max_size=30), st.lists(st.text(max_size=30), max_size=4))
def test_scores_lie_in_unit_interval_and_exact_match_implies_full_f1(prediction, answers):
    em, score = exact_match(prediction, answers), f1(prediction, answers)
    assert em in (0.0, 1.0)
    assert 0.0 <= score <= 1.0
    if em == 1.0:
        assert score == 1.0


@given(st.text(max_size=30), st.text(max_size=30))
def test_f1_is_symmetric_for_one_gold(a, b):
    assert f1(a, [b]) == pytest.approx(f1(b, [a]))


@given(st.text(max_size=30))
def test_a_prediction_equal_to_the_gold_scores_full_marks(text):
    assert exact_match(text, [text]) == 1.0
    assert f1(text, [text]) == 1.0


# ------------------------------------------------------------------ bootstrap intervals


def test_bootstrap_ci_is_deterministic_by_seed():
    values = np.random.default_rng(1).random(50)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_bootstrap_ci_width_matches_the_normal_approximation_for_a_coin():
    values = np.random.default_rng(2).integers(0, 2, 400)
    mean, low, high = bootstrap_ci(values)
    expected = 2 * 1.96 * math.sqrt(mean * (1 - mean) / values.size)
    assert high - low == pytest.approx(expected, rel=0.15)


def test_bootstrap_ci_of_constant_scores_has_no_width():
    assert tuple(bootstrap_ci([0.5] * 7)) == (0.5, 0.5, 0.5)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=40), st.integers(0, 2**16))
def test_bootstrap_ci_contains_the_mean(values, seed):
    mean, low, high = bootstrap_ci(values, n_resamples=300, seed=seed)
    assert mean == pytest.approx(float(np.mean(values)), abs=1e-6)
    slack = 1e-9 * max(1.0, max(abs(v) for v in values))
    assert low - slack <= mean <= high + slack


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=4, max_size=30).filter(lambda v: np.ptp(v) > 0.01))
def test_bootstrap_ci_shrinks_as_the_sample_grows(values):
    _, low, high = bootstrap_ci(values, n_resamples=500)
    _, big_low, big_high = bootstrap_ci(values * 16, n_resamples=500)
    # Sixteen times the data: a quarter of the width in theory; a third leaves room for noise.
    assert big_high - big_low < (high - low) / 3


def test_higher_confidence_gives_a_wider_interval():
    values = np.random.default_rng(3).random(60)
    narrow, wide = bootstrap_ci(values, confidence=0.8), bootstrap_ci(values, confidence=0.99)
    assert wide.low < narrow.low and narrow.high < wide.high


@pytest.mark.parametrize("values, message", [
    ([], "empty"), ([1.0, float("nan")], "NaN"), ([[1.0, 2.0]], "flat sequence"),
])
def test_bootstrap_ci_rejects_unusable_scores(values, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(values)


def test_bootstrap_ci_rejects_a_confidence_outside_the_unit_interval():
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=95)


# ------------------------------------------------------------------ paired comparison


def test_identical_methods_differ_by_nothing_with_p_one():
    scores = np.random.default_rng(4).random(30)
    result = paired_test(scores, scores)
    assert (result.mean_diff, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert result.n == 30 and result.method == "permutation"


def test_exact_sign_flip_p_value_for_few_pairs():
    # Five equal positive differences: only all-plus and all-minus of 2**5 patterns are as
    # extreme, so p = 2/32.
    result = paired_test([1.0] * 5, [0.0] * 5)
    assert result.p_value == pytest.approx(2 / 32)


def test_sampled_sign_flip_p_value_is_never_zero():
    result = paired_test([1.0] * 50, [0.0] * 50, n_resamples=2000)
    assert result.p_value == pytest.approx(1 / 2001)


def test_a_clear_improvement_is_significant_and_its_interval_excludes_zero():
    rng = np.random.default_rng(5)
    b = (rng.random(100) < 0.4).astype(float)
    a = np.maximum(b, (rng.random(100) < 0.5).astype(float))
    result = paired_test(a, b)
    assert result.mean_diff > 0 and result.low > 0
    assert result.p_value < 0.001


def test_wilcoxon_p_value_comes_from_scipy_signed_rank():
    # Ten positive differences with distinct ranks: exact two-sided p = 2 / 2**10.
    result = paired_test(np.arange(1.0, 11.0), np.zeros(10), method="wilcoxon")
    assert result.method == "wilcoxon"
    assert result.p_value == pytest.approx(2 / 1024)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=40),
       st.sampled_from(["permutation", "wilcoxon"]))
def test_swapping_methods_negates_the_difference_and_keeps_the_p_value(pairs, method):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    forward = paired_test(a, b, method=method, n_resamples=300)
    backward = paired_test(b, a, method=method, n_resamples=300)
    assert backward.mean_diff == pytest.approx(-forward.mean_diff, abs=1e-12)
    assert backward.low == pytest.approx(-forward.high, abs=1e-9)
    assert backward.p_value == pytest.approx(forward.p_value)
    assert 0.0 < forward.p_value <= 1.0
    assert forward.low - 1e-9 <= forward.mean_diff <= forward.high + 1e-9


def test_paired_test_needs_the_same_samples_on_both_sides():
    with pytest.raises(ValueError, match="same samples in the same order: got 3 and 2"):
        paired_test([1.0, 0.0, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="permutation"):
        paired_test([1.0], [0.0], method="t-test")
