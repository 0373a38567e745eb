"""Paper B's protocol table beside ours: per strategy, the range over the grid's points.

Reads a results directory of ``experiments/paper_b_protocol.yaml`` (``requests.parquet``)
and writes ``paper_b_table.md`` there: per strategy the lowest and highest deadline-hit rate
and mean relative quality over the 12 points (3 pairs x 4 deadlines), quality both as our
summaries count it (0 on a miss) and over answered requests only, beside the ranges Paper B
reports (its strategy table, as the research repository's explainer quotes it; the paper's
own deadlines and its quality's treatment of misses are not in our seeds).

    python3 bench/paper_b_protocol_table.py experiments/results/paper_b_protocol

With ``--beside SIM`` (a run of the same plan at another fidelity, say the profiled subset
``experiments/paper_b_protocol_profiled.yaml`` and its ``--fidelity simulated`` twin), it
writes instead, per point and strategy, both runs' hits (Wilson 95%) and quality
(bootstrap 95%) from their ``points.csv``, with Paper B's published ranges:

    python3 bench/paper_b_protocol_table.py experiments/results/paper_b_protocol_profiled \
        --beside experiments/results/paper_b_protocol_profiled_sim
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from ray_scout import provenance

# Paper B, adaptive-policy table (Markov bandwidth, 3 pairs x 4 deadlines, n=50 each):
# strategy -> (quality range, deadline-hit range), as published (percent).
PAPER_B = {
    "static:int8": ("99%", "59-88%"),
    "static:int4": ("96%", "88-100%"),
    "adaptive": ("103-107%", "75-100%"),
    "static:scout": ("81-110%", "100%"),
    "static:bf16": ("not reported", "not reported"),
}


def table(requests: pd.DataFrame) -> str:
    hits = requests["deadline_met"].fillna(False).astype(bool)
    per_point = requests.assign(hit=hits, answered_q=requests["quality"].where(hits)).groupby(
        ["policy", "point"]).agg(hits=("hit", "mean"), q=("quality", "mean"),
                                 q_answered=("answered_q", "mean"), n=("hit", "size"))
    lines = ["| strategy | hits, ours (min-max over 12 points) | hits, Paper B | quality, "
             "ours, 0 on a miss | quality, ours, answered only | quality, Paper B | "
             "requests per point |", "|---|---|---|---|---|---|---|"]
    for policy, (paper_q, paper_hits) in PAPER_B.items():
        g = per_point.loc[policy]
        lines.append(
            f"| {policy} | {g['hits'].min():.0%}-{g['hits'].max():.0%} | {paper_hits} | "
            f"{g['q'].min():.0%}-{g['q'].max():.0%} | {g['q_answered'].min():.1%}-"
            f"{g['q_answered'].max():.1%} | {paper_q} | {int(g['n'].median())} |")
    return "\n".join(lines)


def _ci(row, key: str, percent: bool) -> str:
    value = row["hit_rate" if key == "hit" else key]
    low, high = row[f"{key}_ci_low"], row[f"{key}_ci_high"]
    if percent:
        return f"{value:.0%} ({low:.0%}-{high:.0%})"
    return f"{value:.3f} ({low:.3f}-{high:.3f})"


def beside(out: Path, other: Path) -> str:
    """Per point and strategy: this run and ``other`` (same plan, another fidelity)."""
    mine, theirs = (pd.read_csv(d / "points.csv") for d in (out, other))
    fidelity = [json.loads((d / "meta.json").read_text())["fidelity"] for d in (out, other)]
    keys = [c for c in mine.columns if c not in ("point", "policy", "allocator", "n")
            and not c.startswith(("hit_", "quality"))]
    both = mine.merge(theirs, on=["point", *keys, "policy", "allocator"],
                      suffixes=("", "_other"))
    lines = [f"| {' | '.join(keys)} | strategy | n ({fidelity[0]} / {fidelity[1]}) | hits, "
             f"{fidelity[0]} | hits, {fidelity[1]} | hits, Paper B | quality (0 on a miss), "
             f"{fidelity[0]} | quality (0 on a miss), {fidelity[1]} | quality, Paper B |",
             "|" + "---|" * (len(keys) + 8)]
    for _, row in both.sort_values(["point", "policy"]).iterrows():
        other_row = {k.removesuffix("_other"): v for k, v in row.items() if k.endswith("_other")}
        paper_q, paper_hits = PAPER_B.get(row["policy"], ("not reported", "not reported"))
        lines.append(
            f"| {' | '.join(str(row[k]) for k in keys)} | {row['policy']} | {row['n']} / "
            f"{row['n_other']} | {_ci(row, 'hit', True)} | {_ci(other_row, 'hit', True)} | "
            f"{paper_hits} | {_ci(row, 'quality', False)} | {_ci(other_row, 'quality', False)} "
            f"| {paper_q} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?",
                        default=Path("experiments/results/paper_b_protocol"),
                        help="a results directory of the study (or of --beside's twin)")
    parser.add_argument("--beside", type=Path, help="the same plan's run at another "
                        "fidelity: both side by side per point instead of the range table")
    args = parser.parse_args()
    command = f"python3 bench/paper_b_protocol_table.py {args.out}" + (
        f" --beside {args.beside}" if args.beside else "")
    text = (beside(args.out, args.beside) if args.beside
            else table(pd.read_parquet(args.out / "requests.parquet")))
    # The machine that made the table from the results, not the one that ran the study.
    where = provenance.record()
    (args.out / "paper_b_table.md").write_text(
        "# Paper B's protocol table beside ours\n\n"
        f"`{command}`\n\nTable made on {where['machine']}; commit {where['commit']}; "
        f"{where['date']}.\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
