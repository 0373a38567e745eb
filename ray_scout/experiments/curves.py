"""Curves: deadline hits and quality against each swept key, one line per arm, CI bands.

What lives here: the per-(point, arm) aggregate of the tidy requests table (hit rate with a
Wilson interval, mean quality with a bootstrap interval, over every replication's
requests), the swept values as numbers on an axis (rates in Mbit/s), and one PNG per swept
key: hits and quality side by side, a row of panels per combination of the other swept
keys, solid lines for this run and dashed for a ``reference`` run of the same plan at
another fidelity (the sim-to-real gap on one pair of axes). What it leaves to others:
producing the tables (``sweep``), judging them (``verdict``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ray_scout.experiments.report import mean_ci, wilson_ci
from ray_scout.net.errors import NetError
from ray_scout.net.profiles import parse_rate_bps

MAX_PANEL_ROWS = 8


def axis_value(value) -> tuple[float, str]:
    """A swept value as a number on an axis, with its unit: rates in Mbit/s."""
    if isinstance(value, bool):
        return float(value), ""
    if isinstance(value, (int, float)):
        return float(value), ""
    try:
        return parse_rate_bps(value) / 1e6, "Mbit/s"
    except (NetError, ValueError, TypeError):
        return math.nan, ""


def points(requests: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per (point, policy, allocator): n, hit rate and quality with 95% CIs."""
    rows = []
    for (point, policy, allocator), g in requests.groupby(["point", "policy", "allocator"],
                                                          sort=True):
        hits = int(g["deadline_met"].fillna(False).astype(bool).sum())
        lo, hi = wilson_ci(hits, len(g))
        q, qlo, qhi = mean_ci(g["quality"])
        rows.append(dict(point=point, **{k: g[k].iloc[0] for k in keys}, policy=policy,
                         allocator=allocator, n=len(g), hit_rate=hits / len(g), hit_ci_low=lo,
                         hit_ci_high=hi, quality=q, quality_ci_low=qlo, quality_ci_high=qhi))
    return pd.DataFrame(rows)


def _ticks(values: pd.Series) -> dict[str, float]:
    """Where each swept value sits on the axis: its number, or its rank if any is not one."""
    distinct = list(dict.fromkeys(values.astype(str)))
    numbers = {v: axis_value(values[values.astype(str) == v].iloc[0])[0] for v in distinct}
    if any(math.isnan(x) for x in numbers.values()):
        return {v: float(i) for i, v in enumerate(distinct)}
    return numbers


def _axis_column(table: pd.DataFrame, axis: tuple[str, ...]) -> pd.Series:
    """One axis' values: the key's own, or the zipped keys' joined by " / "."""
    if len(axis) == 1:
        return table[axis[0]]
    return table[list(axis)].astype(str).agg(" / ".join, axis=1)


def _order(value: str) -> tuple:
    """Facets in the order of their numbers ("2 / 2" before "16 / 16"), else by name."""
    first = value.split(" / ")[0]
    number = axis_value(float(first) if first.replace(".", "", 1).isdigit() else first)[0]
    return (0, number, value) if not math.isnan(number) else (1, 0.0, value)


def _short(key: str) -> str:
    """``agents.a.model / agents.a.quality`` -> ``model / quality``: panel titles that fit."""
    return " / ".join(part.split(".")[-1] for part in key.split(" / "))


def _label(row, policies: int, allocators: int) -> str:
    if allocators > 1 and policies > 1:
        return f"{row['policy']} / {row['allocator']}"
    return row["allocator"] if allocators > 1 else row["policy"]


def plot(table: pd.DataFrame, axes_keys: list[tuple[str, ...]], out: Path,
         reference: pd.DataFrame | None = None, labels: tuple[str, str] = ("", "")) -> list[Path]:
    """``curves_<key>.png`` per sweep axis (a grid key, or a zip under its first key) from
    ``points`` tables; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    runs = [(table, "-", "")]
    if reference is not None and not reference.empty:  # name the runs only when two
        runs = [(table, "-", labels[0]), (reference, "--", labels[1])]
    policies, allocators = table["policy"].nunique(), table["allocator"].nunique()
    palette = plt.get_cmap("tab10" if policies * allocators <= 10 else "tab20")
    names = {axis: " / ".join(axis) for axis in axes_keys}
    with_axes = [frame.assign(**{names[a]: _axis_column(frame, a) for a in axes_keys})
                 for frame, _, _ in runs]
    runs = [(frame, style, label) for frame, (_, style, label) in zip(with_axes, runs)]
    table = with_axes[0]
    for axis in axes_keys:
        key = names[axis]
        others = [names[a] for a in axes_keys if a != axis]
        facets = (sorted({tuple(r) for r in table[others].astype(str).itertuples(index=False)},
                         key=lambda f: [_order(v) for v in f])
                  if others else [()])[:MAX_PANEL_ROWS]
        fig, axes = plt.subplots(len(facets), 2, figsize=(11, 3.2 * len(facets)),
                                 squeeze=False)
        unit, ticks = "", _ticks(table[key])
        for row_axes, facet in zip(axes, facets):
            for frame, style, run_label in runs:
                sel = frame
                for k, v in zip(others, facet):
                    sel = sel[sel[k].astype(str) == str(v)]
                for i, (_, arm) in enumerate(sel.groupby(["policy", "allocator"], sort=True)):
                    arm = arm.assign(x=arm[key].astype(str).map(ticks)).sort_values("x")
                    unit = axis_value(arm[key].iloc[0])[1]
                    name = _label(arm.iloc[0], policies, allocators)
                    for ax, col in zip(row_axes, ("hit_rate", "quality")):
                        line, = ax.plot(arm["x"], arm[col], style, marker="o", markersize=3,
                                        color=palette(i % palette.N),
                                        label=f"{name} {run_label}".strip())
                        ax.fill_between(arm["x"], arm[f"{col.split('_')[0]}_ci_low"],
                                        arm[f"{col.split('_')[0]}_ci_high"],
                                        color=line.get_color(), alpha=0.15)
            title = ", ".join(f"{_short(k)}={v}" for k, v in zip(others, facet))
            for ax, what in zip(row_axes, ("deadline-hit rate", "mean quality (0 on a miss)")):
                ax.set_title(f"{what}{' | ' + title if title else ''}", fontsize=8)
                ax.set_xlabel(f"{key}{f' ({unit})' if unit else ''}")
                if unit == "Mbit/s":
                    ax.set_xscale("log")
                if any(math.isnan(axis_value(v)[0]) for v in table[key]):
                    ax.set_xticks(list(ticks.values()), list(ticks), fontsize=6, rotation=15)
        axes[0, 1].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"curves_{axis[0].replace('.', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
