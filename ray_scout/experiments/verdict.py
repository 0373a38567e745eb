"""Verdicts: at each point, does a policy beat, tie or lose to the best static arm and the
spec's named baseline, on the same requests?

What lives here: pairing two arms' requests (same point, replication and request: the plan
gives every arm of a point the same workload), the paired differences in deadline hits
(paired-bootstrap CI, exact McNemar p) and in quality (paired-bootstrap CI, sign-flip p;
quality counts 0 on a miss), the verdict they add up to, the requests per arm a tie would
need to separate, and the summary's opening lines, which name every point where a policy
loses and the recorded reasons behind its misses. What it knows: the tidy requests table.
What it leaves to others: running (``sweep``), pictures (``curves``), statistics
(``core.evaluation.metrics``).

Verdict of arm A against arm B at one point: ``win`` when A is better in hits (McNemar
p < 0.05) or in quality (the CI of the difference above 0) and worse in neither; ``lose``
the mirror; ``trade-off`` when better in one and worse in the other; ``tie`` otherwise.
"""

from __future__ import annotations

import math
import re

import pandas as pd

from ray_scout.core.evaluation.metrics import (
    bootstrap_ci,
    mcnemar_exact,
    mcnemar_pairs_needed,
    paired_pairs_needed,
    paired_test,
)

ALPHA = 0.05
PAIR_KEYS = ("replication", "agent", "request_id")
VERDICTS = ("win", "tie", "lose", "trade-off")


def _is_static(policy: str) -> bool:
    return policy.startswith("static:")


def paired(requests: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """A's and B's rows of the same requests side by side (``_a``/``_b`` suffixes)."""
    keys = [k for k in PAIR_KEYS if k in requests.columns]
    return requests[requests["policy"] == a].merge(requests[requests["policy"] == b],
                                                    on=keys, how="inner", suffixes=("_a", "_b"))


def best_static(requests: pd.DataFrame) -> str | None:
    """The static arm of highest mean quality (then hits) among ``requests`` (one point)."""
    statics = requests[requests["policy"].map(_is_static)]
    if statics.empty:
        return None
    score = statics.groupby("policy").agg(q=("quality", "mean"), h=("deadline_met", "mean"))
    return str(score.sort_values(["q", "h"], ascending=False).index[0])


def compare(pairs: pd.DataFrame, seed: int = 0) -> dict:
    """The paired statistics of A minus B over ``pairs`` (from ``paired``)."""
    hits_a = pairs["deadline_met_a"].fillna(False).astype(bool).to_numpy()
    hits_b = pairs["deadline_met_b"].fillna(False).astype(bool).to_numpy()
    known = pairs["quality_a"].notna() & pairs["quality_b"].notna()
    qa, qb = pairs.loc[known, "quality_a"].to_numpy(), pairs.loc[known, "quality_b"].to_numpy()
    # Hits: the bootstrap interval of the difference; their test is McNemar's, exact.
    hits = bootstrap_ci(hits_a.astype(float) - hits_b.astype(float), seed=seed)
    mc = mcnemar_exact(hits_a, hits_b)
    quality = paired_test(qa, qb, seed=seed) if known.any() else None
    better = {"hits": hits.mean > 0 and mc.p_value < ALPHA,
              "quality": quality is not None and quality.low > 0}
    worse = {"hits": hits.mean < 0 and mc.p_value < ALPHA,
             "quality": quality is not None and quality.high < 0}
    if any(better.values()):
        verdict = "trade-off" if any(worse.values()) else "win"
    else:
        verdict = "lose" if any(worse.values()) else "tie"
    n = len(pairs)
    need = min(mcnemar_pairs_needed(mc.a_only / n, mc.b_only / n),
               paired_pairs_needed(qa - qb) if len(qa) > 1 else math.inf)
    return dict(
        n_pairs=n, hit_rate_a=hits_a.mean(), hit_rate_b=hits_b.mean(),
        hits_diff=hits.mean, hits_ci_low=hits.low, hits_ci_high=hits.high,
        mcnemar_p=mc.p_value, a_only_hits=mc.a_only, b_only_hits=mc.b_only,
        quality_a=qa.mean() if len(qa) else math.nan, quality_b=qb.mean() if len(qb) else math.nan,
        quality_diff=quality.mean_diff if quality else math.nan,
        quality_ci_low=quality.low if quality else math.nan,
        quality_ci_high=quality.high if quality else math.nan,
        quality_p=quality.p_value if quality else math.nan,
        verdict=verdict, pairs_to_separate=need)


def verdicts(requests: pd.DataFrame, keys: list[str], baseline: str | None) -> pd.DataFrame:
    """One row per (point, allocator, policy, comparator): every non-static policy against
    the best static arm, and every policy but the baseline against ``baseline``."""
    rows = []
    for (point, allocator), g in requests.groupby(["point", "allocator"], sort=True):
        values = {k: g[k].iloc[0] for k in keys}
        best = best_static(g)
        for policy in g["policy"].unique():
            against = []
            if best is not None and not _is_static(policy):
                against.append(("best static", best))
            if baseline is not None and policy != baseline and baseline in set(g["policy"]):
                against.append(("baseline", baseline))
            for role, other in against:
                pairs = paired(g, policy, other)
                if pairs.empty:
                    continue
                rows.append(dict(point=point, **values, allocator=allocator, policy=policy,
                                 against=other, role=role, **compare(pairs)))
    return pd.DataFrame(rows)


def _where(row, keys: list[str], allocators: int) -> str:
    parts = [f"{k}={row[k]}" for k in keys]
    if allocators > 1:
        parts.append(f"allocator {row['allocator']}")
    return ", ".join(parts) or "the spec's conditions"


def _need(n: float) -> str:
    return "no difference seen" if not math.isfinite(n) else f"~{math.ceil(n):,} per arm"


def miss_reasons(requests: pd.DataFrame, limit: int = 4) -> list[str]:
    """The recorded reasons behind an arm's misses, grouped by mode and by the reason's
    words (numbers stripped), most frequent first, each with one verbatim example."""
    misses = requests[~requests["deadline_met"].fillna(False).astype(bool)]
    if misses.empty:
        return []
    reason = misses["reason"].fillna("").astype(str)
    stem = reason.map(lambda r: re.sub(r"[0-9.]+", "#", r))
    groups = misses.assign(stem=stem, reason=reason).groupby(["mode", "stem"], sort=False)
    counted = sorted(groups, key=lambda kv: -len(kv[1]))[:limit]
    return [f"{len(g)} x {mode}: \"{g['reason'].iloc[0]}\"" for (mode, _), g in counted]


def headline(table: pd.DataFrame, requests: pd.DataFrame, keys: list[str]) -> list[str]:
    """The summary's first lines: for each adapting policy and comparator, where it wins,
    ties and loses, with the numbers of every point (of every loss where there are many)
    and the recorded reasons behind its misses where it loses; static arms against the
    baseline follow as one line each."""
    if table.empty:
        return ["No verdicts: the spec has no static arm and no baseline to judge against."]
    allocators = table["allocator"].nunique()
    order = table.assign(_static=table["policy"].map(_is_static)).sort_values(
        "_static", kind="stable")
    lines = []
    for (policy, role), g in order.groupby(["policy", "role"], sort=False):
        counts = g["verdict"].value_counts()
        tally = ", ".join(f"{v} at {counts[v]}" for v in VERDICTS if v in counts)
        against = (f"the best static arm ({', '.join(sorted(set(g['against'])))})"
                   if role == "best static" else f"the baseline {g['against'].iloc[0]}")
        cells = "point x allocator pair(s)" if allocators > 1 else "point(s)"
        lines.append(f"- **{policy} vs {against}**, {len(g)} {cells}: {tally}. "
                     f"Median {int(g['n_pairs'].median())} paired requests per arm.")
        if _is_static(policy):
            continue
        for _, row in g.iterrows():  # not itertuples: swept keys have dots in their names
            r = row.to_dict()
            lost = r["verdict"] in ("lose", "trade-off")
            if not lost and len(g) > 12:
                continue
            numbers = (f"hits {r['hit_rate_a']:.1%} vs {r['hit_rate_b']:.1%} "
                       f"(diff {r['hits_diff']:+.1%}, CI {r['hits_ci_low']:+.1%} to "
                       f"{r['hits_ci_high']:+.1%}, McNemar p={r['mcnemar_p']:.3g}); quality "
                       f"{r['quality_a']:.3f} vs {r['quality_b']:.3f} (diff "
                       f"{r['quality_diff']:+.3f}, CI {r['quality_ci_low']:+.3f} to "
                       f"{r['quality_ci_high']:+.3f})")
            where = _where(r, keys, allocators)
            if lost:
                lines.append(f"  - {r['verdict'].upper()} against {r['against']} at {where}: "
                             f"{numbers}. Its misses there:")
                arm = requests[(requests["point"] == r["point"])
                               & (requests["allocator"] == r["allocator"])
                               & (requests["policy"] == policy)]
                lines += [f"    - {m}" for m in miss_reasons(arm)] or ["    - none"]
            else:
                extra = (f"; to separate: {_need(r['pairs_to_separate'])}"
                         if r["verdict"] == "tie" else "")
                lines.append(f"  - {r['verdict']} against {r['against']} at {where}: "
                             f"{numbers}{extra}")
        ties = g[g["verdict"] == "tie"]
        if len(g) > 12 and not ties.empty:
            seen = ties[ties["pairs_to_separate"].map(math.isfinite)]
            need = (f"; the other {len(seen)} would need a median "
                    f"{_need(seen['pairs_to_separate'].median())} to separate"
                    if len(seen) else "")
            lines.append(f"  - of {len(ties)} ties, {len(ties) - len(seen)} show no difference "
                         f"at all{need} (each in verdicts.csv)")
    return lines


def markdown(table: pd.DataFrame, keys: list[str]) -> str:
    """Every verdict row as a table (the summary's detail, after the headline)."""
    head = ["point", *keys, "allocator", "policy", "against", "n", "hits diff (95% CI)",
            "McNemar p", "quality diff (95% CI)", "verdict", "pairs to separate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(
            [str(r["point"])] + [str(r[k]) for k in keys]
            + [r["allocator"], r["policy"], r["against"], str(r["n_pairs"]),
               f"{r['hits_diff']:+.1%} ({r['hits_ci_low']:+.1%}, {r['hits_ci_high']:+.1%})",
               f"{r['mcnemar_p']:.3g}",
               (f"{r['quality_diff']:+.3f} ({r['quality_ci_low']:+.3f}, "
                f"{r['quality_ci_high']:+.3f})"), r["verdict"], _need(r["pairs_to_separate"])])
            + " |")
    return "\n".join(lines)
