"""Metrics: answer scores and the statistics that compare methods.

What lives here: SQuAD-official answer normalization with exact match and token F1 (the v2.0
evaluation script's semantics, unanswerable questions included), percentile-bootstrap
confidence intervals of a mean, a paired test between two methods scored on the same
samples, the exact McNemar test of paired hits, and the pairs a difference needs to show.
What it knows: strings and arrays of per-sample scores. What it leaves to others: where
predictions come from (the harness and the actors) and which samples they answer
(``tasks``).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import re
import string
from typing import NamedTuple, Sequence

import numpy as np

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)

PAIRED_METHODS = ("permutation", "wilcoxon")


def normalize_answer(text: str) -> str:
    """Lower case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace.

    The order matters and is the official script's: punctuation goes before articles, so
    "the-end" becomes "theend" (kept), not "end".
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def _gold_answers(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        raise TypeError(
            f"answers must be a sequence of strings, got the string {answers!r}; "
            "wrap a single answer in a list"
        )
    for answer in answers:
        if not isinstance(answer, str):
            raise TypeError(f"every gold answer must be a string, got {answer!r}")
    # As the v2.0 script: golds that normalize to nothing do not count, and a question with
    # no gold left is unanswerable, whose only correct prediction is the empty answer.
    gold = [answer for answer in answers if normalize_answer(answer)]
    return gold or [""]


def _check_prediction(prediction: str) -> None:
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string, got {type(prediction).__name__}; "
                        "use '' for 'no answer'")


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer, else 0.0.

    ``answers`` empty means unanswerable (SQuAD v2): 1.0 iff the prediction normalizes to
    the empty string.
    """
    _check_prediction(prediction)
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(gold) for gold in _gold_answers(answers)))


def _f1_one(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    if not prediction_tokens or not gold_tokens:
        return float(prediction_tokens == gold_tokens)
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-level F1 between prediction and gold, the maximum over gold answers.

    ``answers`` empty means unanswerable: 1.0 iff the prediction normalizes to nothing.
    """
    _check_prediction(prediction)
    predicted = _tokens(prediction)
    return max(_f1_one(predicted, _tokens(gold)) for gold in _gold_answers(answers))


def contains_answer(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if some normalized gold answer occurs as a run of whole tokens in the normalized
    prediction (RULER's string-match score), else 0.0.

    It credits a verbose but correct reply ("Kofi was born in Lisbon.") that EM and F1
    punish; unanswerable questions score as in ``exact_match``.
    """
    _check_prediction(prediction)
    golds = _gold_answers(answers)
    if golds == [""]:
        return exact_match(prediction, answers)
    predicted = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(gold)} " in predicted for gold in golds))


class Interval(NamedTuple):
    """A point estimate with the bounds of its confidence interval."""

    mean: float
    low: float
    high: float


def _as_scores(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of per-sample scores, "
                         f"got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: a confidence interval needs at least one score")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite scores; drop or fix those samples first")
    return array


def _check_resampling(confidence: float, n_resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")


# Resample in blocks so that memory stays near this many float64 values whatever n is.
_BLOCK_VALUES = 4_000_000


def _bootstrap(array: np.ndarray, confidence: float, n_resamples: int, seed: int) -> Interval:
    mean = float(array.mean())
    if np.all(array == array[0]):
        return Interval(mean, mean, mean)  # no spread: every resample has the same mean
    rng = np.random.default_rng(seed)
    n = array.size
    per_block = max(1, _BLOCK_VALUES // n)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, per_block):
        stop = min(n_resamples, start + per_block)
        means[start:stop] = array[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(mean, float(low), float(high))


def bootstrap_ci(
    values: Sequence[float],
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """The mean of ``values`` with a percentile-bootstrap confidence interval.

    Returns ``(mean, low, high)``; deterministic for a given seed.
    """
    _check_resampling(confidence, n_resamples)
    return _bootstrap(_as_scores(values, "values"), confidence, n_resamples, seed)


@dataclasses.dataclass(frozen=True)
class PairedResult:
    """Method A minus method B on the same samples.

    ``mean_diff`` is the mean of the per-sample differences a - b, ``low``/``high`` its
    paired-bootstrap confidence interval, ``p_value`` the two-sided p-value of ``method``
    for "no difference", ``n`` the number of pairs.
    """

    mean_diff: float
    low: float
    high: float
    p_value: float
    method: str
    n: int


# Up to 2**_EXACT_MAX_PAIRS sign patterns are enumerated; more pairs are sampled.
_EXACT_MAX_PAIRS = 16


def _sign_flip_p_value(diffs: np.ndarray, n_resamples: int, seed: int) -> float:
    observed = abs(diffs.mean())
    # Sums of flipped floats differ from the observed sum in the last bits; a pattern
    # that is as extreme up to rounding must count as as extreme.
    tolerance = 1e-9 * max(1.0, float(np.abs(diffs).max()))
    if diffs.size <= _EXACT_MAX_PAIRS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=diffs.size)))
        extreme = np.abs(signs @ diffs / diffs.size) >= observed - tolerance
        return float(extreme.mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(n_resamples, diffs.size))
    extreme = np.abs(signs @ diffs / diffs.size) >= observed - tolerance
    # The +1 counts the observed labelling itself, so the p-value is never 0 (Phipson and
    # Smyth 2010): a Monte Carlo estimate that stays valid.
    return float((extreme.sum() + 1) / (n_resamples + 1))


def _wilcoxon_p_value(diffs: np.ndarray) -> float:
    from scipy import stats

    if not np.any(diffs):
        return 1.0  # scipy refuses all-zero differences; no difference is no evidence
    return float(stats.wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_test(
    a: Sequence[float],
    b: Sequence[float],
    *,
    method: str = "permutation",
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> PairedResult:
    """Compare two methods scored on the same samples, in the same order.

    ``method="permutation"`` (default): the paired sign-flip permutation test on the mean
    difference, two-sided; exact over all sign patterns for up to 16 pairs, otherwise
    ``n_resamples`` random patterns. It makes no assumption about the shape of the
    differences, which for F1 and EM are mostly zeros and ties. ``method="wilcoxon"``: the
    Wilcoxon signed-rank test of scipy (zero differences dropped). The interval is the
    bootstrap interval of the mean difference, resampling pairs.
    """
    if method not in PAIRED_METHODS:
        raise ValueError(f"unknown paired-test method {method!r}; use one of {PAIRED_METHODS}")
    _check_resampling(confidence, n_resamples)
    first, second = _as_scores(a, "a"), _as_scores(b, "b")
    if first.shape != second.shape:
        raise ValueError(
            f"paired_test needs both methods scored on the same samples in the same order: "
            f"got {first.size} and {second.size} scores"
        )
    diffs = first - second
    interval = _bootstrap(diffs, confidence, n_resamples, seed)
    if method == "permutation":
        p_value = _sign_flip_p_value(diffs, n_resamples, seed)
    else:
        p_value = _wilcoxon_p_value(diffs)
    return PairedResult(interval.mean, interval.low, interval.high, p_value, method, diffs.size)


@dataclasses.dataclass(frozen=True)
class McNemarResult:
    """Two methods' hits on the same samples: the discordant pairs and the exact p-value.

    ``a_only``: pairs A hit and B missed; ``b_only``: the reverse; ``n``: all pairs.
    """

    a_only: int
    b_only: int
    p_value: float
    n: int


def _as_hits(values: Sequence[bool], name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must be a flat sequence of hits (True/False or 1/0)")
    return array.astype(bool)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> McNemarResult:
    """Exact McNemar test of "A and B hit equally often" on paired hits, two-sided.

    Only discordant pairs carry evidence; under the null each is A's with probability 1/2,
    so the p-value is twice the smaller binomial tail (capped at 1), summed in log space so
    that tens of thousands of pairs neither overflow nor underflow.
    """
    first, second = _as_hits(a, "a"), _as_hits(b, "b")
    if first.shape != second.shape:
        raise ValueError(f"mcnemar_exact needs hits of the same samples in the same order: "
                         f"got {first.size} and {second.size}")
    a_only, b_only = int((first & ~second).sum()), int((~first & second).sum())
    m, k = a_only + b_only, min(a_only, b_only)
    if m == 0:
        return McNemarResult(0, 0, 1.0, first.size)
    i = np.arange(1, k + 1)
    log_comb = np.concatenate(([0.0], np.cumsum(np.log(m - i + 1) - np.log(i))))
    log_terms = log_comb - m * np.log(2.0)
    top = log_terms.max()
    tail = float(np.exp(top) * np.exp(log_terms - top).sum())
    return McNemarResult(a_only, b_only, min(1.0, 2.0 * tail), first.size)


def _z(alpha: float, power: float) -> tuple[float, float]:
    from statistics import NormalDist

    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must lie in (0, 1), got {alpha} and {power}")
    return NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)


def mcnemar_pairs_needed(a_only_rate: float, b_only_rate: float, *, alpha: float = 0.05,
                         power: float = 0.8) -> float:
    """Pairs for McNemar's test to find a difference this size with ``power`` (Connor 1987).

    ``a_only_rate``/``b_only_rate``: the fractions of pairs where only A, only B hit. Returns
    inf when they are equal: no difference was seen, so no number of pairs separates them.
    """
    z_a, z_b = _z(alpha, power)
    discordant, delta = a_only_rate + b_only_rate, abs(a_only_rate - b_only_rate)
    if delta == 0:
        return math.inf
    return (z_a * math.sqrt(discordant) + z_b * math.sqrt(discordant - delta ** 2)) ** 2 \
        / delta ** 2


def paired_pairs_needed(diffs: Sequence[float], *, alpha: float = 0.05,
                        power: float = 0.8) -> float:
    """Pairs for a paired test of the mean difference to find the observed one with
    ``power`` (normal approximation: ((z_a + z_b) sd / mean)^2); inf for a zero mean."""
    array = _as_scores(diffs, "diffs")
    z_a, z_b = _z(alpha, power)
    mean = float(array.mean())
    if mean == 0:
        return math.inf
    return ((z_a + z_b) * float(array.std(ddof=1) if array.size > 1 else 0.0) / mean) ** 2
