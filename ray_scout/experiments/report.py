"""Results to text and pictures: the summary table and the plots of one run directory.

What lives here: per (policy, allocator) the request count, deadline-hit rate with a Wilson
95% interval, mean quality with a bootstrap 95% interval, latency percentiles and
the mix of modes (``summary.md``); PNGs of hit rate and quality per combination, the median
timeline breakdown, and granted rate vs time. What it knows: the tables' columns (runner and
simulator share them). What it leaves to others: producing the tables.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ray_scout.core.evaluation.metrics import bootstrap_ci

STAGES = ("agent_queue_s", "edge_s", "tx_s", "cloud_queue_s", "cloud_s", "overhead_s")


def wilson_ci(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound at 0% and 100%, unlike the normal one)."""
    if n == 0:
        return (math.nan, math.nan)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(values: pd.Series) -> tuple[float, float, float]:
    """Mean with a 95% percentile-bootstrap interval (``core.evaluation.metrics``); NaNs dropped."""
    v = values.dropna()
    if v.empty:
        return (math.nan, math.nan, math.nan)
    return tuple(bootstrap_ci(v.to_numpy()))


def summary(requests: pd.DataFrame) -> pd.DataFrame:
    """One row per (policy, allocator)."""
    rows = []
    for (policy, allocator), g in requests.groupby(["policy", "allocator"], sort=False):
        n = len(g)
        hits = int(g["deadline_met"].fillna(False).astype(bool).sum())
        lo, hi = wilson_ci(hits, n)
        q, qlo, qhi = mean_ci(g["quality"])
        modes = g["mode"].value_counts(normalize=True)
        rows.append(dict(
            policy=policy, allocator=allocator, n=n, hit_rate=hits / n if n else math.nan,
            hit_ci_low=lo, hit_ci_high=hi, quality=q, quality_ci_low=qlo, quality_ci_high=qhi,
            latency_p50_s=g["latency_s"].median(), latency_p95_s=g["latency_s"].quantile(0.95),
            payload_mb_p50=g["payload_bytes"].median() / 1e6,
            errors=int((g.get("outcome", pd.Series(dtype=str)) == "error").sum()),
            modes=", ".join(f"{m} {p:.0%}" for m, p in modes.items())))
    return pd.DataFrame(rows)


def _markdown(table: pd.DataFrame) -> str:
    head = ("| policy | allocator | n | deadline hits (95% CI) | quality (95% CI) | "
            "p50 / p95 latency (s) | payload p50 (MB) | errors | modes |")
    lines = [head, "|" + "---|" * 9]
    for r in table.itertuples():
        lines.append(
            f"| {r.policy} | {r.allocator} | {r.n} | {r.hit_rate:.1%} ({r.hit_ci_low:.1%}-"
            f"{r.hit_ci_high:.1%}) | {r.quality:.3f} ({r.quality_ci_low:.3f}-"
            f"{r.quality_ci_high:.3f}) | {r.latency_p50_s:.3f} / {r.latency_p95_s:.3f} | "
            f"{r.payload_mb_p50:.3f} | {r.errors} | {r.modes} |")
    return "\n".join(lines)


def breakdown(requests: pd.DataFrame) -> pd.DataFrame:
    """Median seconds per stage of answered requests, per (policy, allocator)."""
    cols = [c for c in STAGES if c in requests.columns]
    answered = requests[requests["latency_s"].notna()]
    return answered.groupby(["policy", "allocator"], sort=False)[cols].median()


def write_report(spec, out: Path, frames: dict[str, pd.DataFrame]) -> Path:
    """``summary.md`` and the PNG plots in ``out``; returns the summary's path."""
    requests = frames["requests"]
    table = summary(requests) if not requests.empty else pd.DataFrame()
    text = [f"# {spec.name} ({spec.fidelity})", "",
            f"{len(spec.agent_names)} agents, {spec.duration_s:g} s, seed {spec.seed}; "
            "quality counts 0 for a missed deadline.", ""]
    text.append(_markdown(table) if not table.empty else "No requests were recorded.")
    if not requests.empty:
        stages = breakdown(requests)
        if not stages.empty:
            text += ["", "Median seconds per stage (answered requests):", "",
                     _stage_markdown(stages)]
        _plots(out, requests, frames.get("epochs", pd.DataFrame()), table, stages)
    path = out / "summary.md"
    path.write_text("\n".join(text) + "\n")
    return path


def _stage_markdown(stages: pd.DataFrame) -> str:
    cols = list(stages.columns)
    lines = ["| policy | allocator | " + " | ".join(c.removesuffix("_s") for c in cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for (policy, allocator), r in stages.iterrows():
        lines.append(f"| {policy} | {allocator} | "
                     + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def _plots(out: Path, requests: pd.DataFrame, epochs: pd.DataFrame, table: pd.DataFrame,
           stages: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{p}\n{a}" for p, a in zip(table["policy"], table["allocator"])]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(labels)) * 2, 4))
    for ax, col, lo, hi, title in ((axes[0], "hit_rate", "hit_ci_low", "hit_ci_high",
                                    "deadline-hit rate"),
                                   (axes[1], "quality", "quality_ci_low", "quality_ci_high",
                                    "mean quality (0 on a miss)")):
        err = [(table[col] - table[lo]).clip(lower=0).fillna(0),
               (table[hi] - table[col]).clip(lower=0).fillna(0)]
        ax.bar(range(len(table)), table[col], yerr=err, capsize=3)
        ax.set_xticks(range(len(table)), labels, fontsize=7)
        ax.set_title(title)
        ax.set_ylim(0, max(1.05, float(table[col].max() or 0) * 1.1))
    fig.tight_layout()
    fig.savefig(out / "hits_quality.png", dpi=120)
    plt.close(fig)

    if not stages.empty:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(stages)), 4))
        bottom = None
        for col in stages.columns:
            values = stages[col].fillna(0).clip(lower=0)
            ax.bar(range(len(stages)), values, bottom=bottom, label=col.removesuffix("_s"))
            bottom = values if bottom is None else bottom + values
        ax.set_xticks(range(len(stages)), [f"{p}\n{a}" for p, a in stages.index], fontsize=7)
        ax.set_ylabel("median seconds")
        ax.set_title("timeline breakdown (answered requests)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "timeline.png", dpi=120)
        plt.close(fig)

    if not epochs.empty and "rate_bps" in epochs:
        groups = list(epochs.groupby(["policy", "allocator"], sort=False))
        fig, axes = plt.subplots(len(groups), 1, figsize=(8, 2.2 * len(groups)), squeeze=False)
        for ax, ((policy, allocator), g) in zip(axes[:, 0], groups):
            for agent, a in g.groupby("agent"):
                ax.step(a["t_s"], a["rate_bps"] / 1e6, where="post", label=agent)
            cap = g.drop_duplicates("t_s")
            ax.step(cap["t_s"], cap["capacity_bps"] / 1e6, where="post", color="k",
                    linestyle="--", label="capacity")
            ax.set_title(f"granted rate: {policy} / {allocator}", fontsize=8)
            ax.set_ylabel("Mbit/s")
        axes[0, 0].legend(fontsize=6, ncol=4)
        axes[-1, 0].set_xlabel("s")
        fig.tight_layout()
        fig.savefig(out / "rates.png", dpi=120)
        plt.close(fig)


# --- CLI: re-render a results directory -------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("results", type=Path, help="a directory `scout run` wrote")


def run(args) -> int:
    """``scout report``: rewrite summary.md and the plots from a run's tables."""
    import json
    import sys

    from ray_scout.experiments.spec import SpecError, load_spec

    out = args.results
    if (out / "plan.json").exists():  # a sweep's directory: its own report
        from ray_scout.experiments.sweep import rewrite_report

        try:
            print(rewrite_report(out))
        except (OSError, KeyError, ValueError, SpecError) as exc:
            print(f"scout report: {out} is not a complete sweep directory ({exc}); rerun "
                  "its `scout run` to finish it", file=sys.stderr)
            return 2
        return 0
    try:
        meta = json.loads((out / "meta.json").read_text())
        spec = load_spec(out / "spec.yaml", meta["fidelity"])
        frames = {t: pd.read_csv(out / f"{t}.csv") if (out / f"{t}.csv").stat().st_size > 1
                  else pd.DataFrame() for t in ("requests", "epochs")}
    except (OSError, KeyError, ValueError, SpecError) as exc:
        print(f"scout report: {out} is not a complete results directory ({exc}); "
              "run `scout run <spec>` first", file=sys.stderr)
        return 2
    print(write_report(spec, out, frames))
    return 0
