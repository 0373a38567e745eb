"""Results to text and pictures: the summary table and the plots of one run directory.

What lives here: per (policy, allocator) the request count, deadline-hit rate with a Wilson
95% interval, mean quality with a bootstrap 95% interval and where quality came from,
latency percentiles, payload sizes and the mix of modes (``summary.md``); PNGs of hit rate
and quality per combination, the mean stage breakdown (which adds up to the mean latency),
every request's mode and outcome over time against the capacity, and each agent's grant
with its requests. What it knows: the tables' columns (runner and
simulator share them). What it leaves to others: producing the tables.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from ray_scout.core.evaluation.metrics import bootstrap_ci

STAGES = ("agent_queue_s", "edge_s", "tx_s", "rtt_s", "cloud_queue_s", "cloud_s", "overhead_s")
STAGE_NAMES = {"agent_queue_s": "agent queue", "edge_s": "edge compute", "tx_s": "wire",
               "rtt_s": "round trip", "cloud_queue_s": "cloud queue",
               "cloud_s": "cloud compute", "overhead_s": "testbed overhead",
               "other_s": "other"}
RATES_AGENTS = 12  # agents drawn in rates.png
# Rows of the per-request timeline, cheapest payload at the bottom.
MODE_ORDER = ("local", "scout", "int4", "mixed_int4", "int8", "bf16")
LOCAL_NOTE = ("`local`: nothing was sent; the edge answers alone. A timing source without an "
              "edge-only time (Paper B's, `paper_b`) cannot answer it, so there `local` is "
              "a miss: the policy's fallback when no mode fitted the time left.")


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


def format_bytes(size_bytes: float) -> str:
    """``190 B``, ``48.2 kB``, ``3.07 MB``: a unit in which scout's few hundred bytes show."""
    if not math.isfinite(size_bytes):
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.3g} {unit}"
    return f"{size_bytes:.0f} B"


def quality_source(spec) -> str:
    """Where the ``quality`` column's numbers came from, in words (one line)."""
    if spec.fidelity == "full":
        return ("F1 of each answer against the task's gold answer (absolute, not relative to "
                "BF16), 0 on a miss")
    from ray_scout.experiments.spec import quality_profile

    sources: dict[str, list[str]] = {}
    for g in spec.agents:
        profile = quality_profile(spec, g)
        what = (f"Paper B, published (`{g.quality}`)" if g.quality.startswith("paper_b:")
                else f"measured, `{g.quality}` ({profile.edge_model} -> {profile.cloud_model})")
        scale = ("relative F1, BF16 = 1.0" if profile.metric == "relative_f1"
                 else "absolute F1")
        sources.setdefault(f"{what} ({scale}; {profile.source})", []).append(f"{g.name}*")
    parts = [f"agents {', '.join(groups)}: {text}" for text, groups in sources.items()]
    return ("the quality profile's value for the mode sent (not measured in this run) when "
            "the deadline was met, else 0; " + "; ".join(parts))


def summary(requests: pd.DataFrame) -> pd.DataFrame:
    """One row per (policy, allocator); a combination with no answer keeps its row."""
    rows = []
    for (policy, allocator), g in requests.groupby(["policy", "allocator"], sort=False):
        n = len(g)
        hits = int(g["deadline_met"].fillna(False).astype(bool).sum())
        lo, hi = wilson_ci(hits, n)
        q, qlo, qhi = mean_ci(g["quality"])
        answered = g["latency_s"].dropna()
        modes = g["mode"].value_counts(normalize=True)
        rows.append(dict(
            policy=policy, allocator=allocator, n=n, hits=hits,
            hit_rate=hits / n if n else math.nan,
            hit_ci_low=lo, hit_ci_high=hi, quality=q, quality_ci_low=qlo, quality_ci_high=qhi,
            answered=int(len(answered)),
            latency_p50_s=answered.median(), latency_p95_s=answered.quantile(0.95),
            payload_bytes_p50=g["payload_bytes"].median(),
            errors=int((g.get("outcome", pd.Series(dtype=str)) == "error").sum()),
            modes=", ".join(f"{m} {p:.0%}" for m, p in modes.items())))
    return pd.DataFrame(rows)


def _latency(r) -> str:
    if r.answered == 0:
        return "no answer"
    return f"{r.latency_p50_s:.3f} / {r.latency_p95_s:.3f}"


def _markdown(table: pd.DataFrame, quality_label: str, quality_from: str = "") -> str:
    head = (f"| policy | allocator | n | deadline hits (95% Wilson CI) | {quality_label} "
            "(95% bootstrap CI) | quality from | p50 / p95 latency of answered (s) | "
            "payload p50 | errors | modes |")
    lines = [head, "|" + "---|" * 10]
    for r in table.itertuples():
        lines.append(
            f"| {r.policy} | {r.allocator} | {r.n} | {r.hits}/{r.n} = {r.hit_rate:.1%} "
            f"({r.hit_ci_low:.1%}-{r.hit_ci_high:.1%}) | {r.quality:.3f} "
            f"({r.quality_ci_low:.3f}-{r.quality_ci_high:.3f}) | {quality_from} | {_latency(r)} | "
            f"{format_bytes(r.payload_bytes_p50)} | {r.errors} | {r.modes} |")
    return "\n".join(lines)


def breakdown(requests: pd.DataFrame) -> pd.DataFrame:
    """Mean seconds per stage of answered requests, per (policy, allocator), with the mean
    latency: means add up (each request's stages sum to its latency; where the table has no
    residual column, ``other_s`` is that residual). A combination without an answered
    request keeps its row, empty."""
    cols = [c for c in STAGES if c in requests.columns]
    frame = requests.assign(_answered=requests["latency_s"].notna())
    if "overhead_s" not in cols:
        frame["other_s"] = frame["latency_s"] - frame[cols].fillna(0).sum(axis=1)
        cols.append("other_s")
    keys = ["policy", "allocator"]
    answered = frame[frame["_answered"]]
    means = answered.groupby(keys, sort=False)[cols + ["latency_s"]].mean()
    counts = answered.groupby(keys, sort=False).size().rename("answered")
    index = frame.groupby(keys, sort=False).size().index
    return means.join(counts).reindex(index).fillna({"answered": 0})


def _stage_markdown(stages: pd.DataFrame) -> str:
    cols = [c for c in stages.columns if c not in ("latency_s", "answered")]
    lines = ["| policy | allocator | answered | " + " | ".join(STAGE_NAMES[c] for c in cols)
             + " | = latency |", "|" + "---|" * (len(cols) + 4)]
    for (policy, allocator), r in stages.iterrows():
        if r["answered"] == 0:
            values = ["-"] * (len(cols) + 1)
        else:
            values = [f"{r[c]:.4f}" for c in cols + ["latency_s"]]
        lines.append(f"| {policy} | {allocator} | {int(r['answered'])} | "
                     + " | ".join(values) + " |")
    return "\n".join(lines)


def write_report(spec, out: Path, frames: dict[str, pd.DataFrame]) -> Path:
    """``summary.md`` and the PNG plots in ``out``; returns the summary's path."""
    requests = frames["requests"]
    table = summary(requests) if not requests.empty else pd.DataFrame()
    label = "mean F1" if spec.fidelity == "full" else "mean quality (profile's, BF16 = 1.0)"
    text = [f"# {spec.name} ({spec.fidelity} fidelity)", ""]
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("complete") is False:  # an interrupted run: say so before any figure
        text += [f"**Incomplete run**: {meta.get('interrupted', 'interrupted')}. The tables hold "
                 "the requests that finished; `scout run --resume <this folder>` continues it.",
                 ""]
    ran = (f" Ran on {meta['machine']}, {meta['date']}, commit {meta['commit']}, "
           f"{meta['wall_s']:.0f} s wall." if "machine" in meta else "")
    text += [f"{len(spec.agent_names)} agents, {spec.duration_s:g} s, seed {spec.seed}.{ran}", "",
            f"Quality: {quality_source(spec)}.", "",
            "Payload: exact wire bytes of the mode sent (median over the combination's "
            "requests, 0 for `local`). " + LOCAL_NOTE, ""]
    short = ("F1 vs gold answer" if spec.fidelity == "full" else
             "profile " + ", ".join(dict.fromkeys(f"`{g.quality}`" for g in spec.agents)))
    text.append(_markdown(table, label, short) if not table.empty
                else "No requests were recorded.")
    stages = pd.DataFrame()
    if not requests.empty:
        stages = breakdown(requests)
        text += ["", "Mean seconds per stage of answered requests (they add up to the mean "
                 "latency; misses have no answer to time):", "", _stage_markdown(stages)]
        _plots(spec, out, requests, frames.get("epochs", pd.DataFrame()), table, stages,
               label)
    text += ["", "Plots: `hits_quality.png` (the table's first columns), `stages.png` (the "
             "stage table), `timeline.png` (every request's mode and outcome over time against "
             "the capacity), `rates.png` (each agent's grant, with its requests)."]
    path = out / "summary.md"
    path.write_text("\n".join(text) + "\n")
    return path


def _plots(spec, out: Path, requests: pd.DataFrame, epochs: pd.DataFrame,
           table: pd.DataFrame, stages: pd.DataFrame, quality_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for old in ("timeline.png", "rates.png"):  # a rerun must not leave a stale plot
        (out / old).unlink(missing_ok=True)
    where = f"{spec.name}, {spec.fidelity} fidelity"
    _hits_quality(plt, out, table, where, quality_label)
    _stages(plt, out, stages, where, requests)
    _timeline(plt, spec, out, requests, where)
    if not epochs.empty and "rate_bps" in epochs:
        _rates(plt, spec, out, requests, epochs, where)


def _combo_labels(index) -> list[str]:
    return [f"{p}\n{a}" for p, a in index]


def _hits_quality(plt, out, table, where, quality_label) -> None:
    labels = _combo_labels(zip(table["policy"], table["allocator"]))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(labels)) * 2, 4.6))
    for ax, col, lo, hi, title, ylabel in (
            (axes[0], "hit_rate", "hit_ci_low", "hit_ci_high", "deadline hits",
             "fraction of requests answered in time"),
            (axes[1], "quality", "quality_ci_low", "quality_ci_high",
             f"{quality_label}, 0 on a miss", quality_label)):
        err = [(table[col] - table[lo]).clip(lower=0).fillna(0),
               (table[hi] - table[col]).clip(lower=0).fillna(0)]
        ax.bar(range(len(table)), table[col], yerr=err, capsize=3)
        ax.set_xticks(range(len(table)), labels, fontsize=7)
        ax.set_xlabel("policy / allocator")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(0, max(1.05, float(table[col].max() or 0) * 1.1))
    fig.suptitle(f"{where}: error bars are 95% intervals (hits: Wilson; quality: bootstrap "
                 "over requests)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "hits_quality.png", dpi=120)
    plt.close(fig)


def _stages(plt, out, stages, where, requests) -> None:
    cols = [c for c in stages.columns if c not in ("latency_s", "answered")]
    fig, ax = plt.subplots(figsize=(max(7.5, 1.3 * len(stages)), 4.8))
    bottom = pd.Series(0.0, index=stages.index)
    for col in cols:
        values = stages[col].fillna(0)
        ax.bar(range(len(stages)), values, bottom=bottom, label=STAGE_NAMES[col])
        bottom = bottom + values
    for i, ((_, _), r) in enumerate(stages.iterrows()):
        text = "no answer" if r["answered"] == 0 else f"{r['latency_s']:.2f} s\nn={int(r['answered'])}"
        ax.text(i, (0 if r["answered"] == 0 else r["latency_s"]), text, ha="center",
                va="bottom", fontsize=7)
    for deadline in sorted(requests["deadline_s"].dropna().unique()):
        ax.axhline(deadline, color="r", linestyle=":", linewidth=1)
        ax.text(len(stages) - 0.5, deadline, f"deadline {deadline:g} s", color="r",
                fontsize=7, ha="right", va="bottom")
    ax.set_xticks(range(len(stages)), _combo_labels(stages.index), fontsize=7)
    ax.set_xlabel("policy / allocator")
    ax.set_ylabel("mean seconds per answered request")
    ax.set_title(f"{where}:\nwhere an answered request's time goes (the stages add up to "
                 "the mean latency)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "stages.png", dpi=120)
    plt.close(fig)


def _until(steps: pd.DataFrame, end_s: float) -> pd.DataFrame:
    """A step series (rows only where the value changed) held until ``end_s``, so a rate
    set once at 0 s still draws as a line."""
    if steps.empty or steps["t_s"].iloc[-1] >= end_s:
        return steps
    last = steps.iloc[[-1]].assign(t_s=end_s)
    return pd.concat([steps, last], ignore_index=True)


def _capacity(spec) -> pd.DataFrame:
    """The bottleneck capacity the run followed: the spec's trace (the allocator's clock
    reads the same), so results without an ``epochs`` table still draw it."""
    from ray_scout.experiments.spec import capacity_trace

    trace = capacity_trace(spec)
    steps = pd.DataFrame(trace.segments, columns=["t_s", "capacity_bps"])
    return _until(steps[steps["t_s"] <= spec.duration_s], spec.duration_s)


def _timeline(plt, spec, out, requests, where) -> None:
    combos = list(requests.groupby(["policy", "allocator"], sort=False))
    agents = sorted(requests["agent"].unique())
    colours = {a: plt.cm.tab10(i % 10) for i, a in enumerate(agents)}
    modes = [m for m in MODE_ORDER if m in set(requests["mode"])] or list(MODE_ORDER)
    row = {m: i for i, m in enumerate(modes)}
    offset = {a: (i - (len(agents) - 1) / 2) * 0.6 / max(len(agents), 1)
              for i, a in enumerate(agents)}
    fig, axes = plt.subplots(len(combos), 1, figsize=(10, 1.0 + 0.45 * len(modes) * len(combos)
                                                      + 0.6 * len(combos)),
                             squeeze=False, sharex=True)
    cap = _capacity(spec)
    for ax, ((policy, allocator), g) in zip(axes[:, 0], combos):
        if not cap.empty:
            twin = ax.twinx()
            twin.step(cap["t_s"], cap["capacity_bps"] / 1e6, where="post", color="0.6",
                      linewidth=1)
            twin.set_ylabel("capacity\n(Mbit/s, grey)", fontsize=7, color="0.4")
            twin.set_ylim(bottom=0)
            twin.tick_params(labelsize=7)
        for r in g.itertuples():
            y = row.get(r.mode, 0) + offset[r.agent]
            hit = bool(r.deadline_met) if pd.notna(r.deadline_met) else False
            end = r.t_arrival_s + (r.latency_s if pd.notna(r.latency_s) else r.deadline_s)
            ax.plot([r.t_arrival_s, end], [y, y], color=colours[r.agent], linewidth=2,
                    alpha=0.8)
            # A tick at the arrival: a queued request's bar overlaps its predecessor's.
            ax.plot(r.t_arrival_s, y, "|", color=colours[r.agent], markersize=7)
            if hit:
                ax.plot(end, y, "o", color=colours[r.agent], markersize=4)
            else:
                ax.plot(end, y, "x", color="red", markersize=7, markeredgewidth=2)
        ax.set_yticks(range(len(modes)), modes, fontsize=7)
        ax.set_ylim(-0.6, len(modes) - 0.4)
        ax.set_ylabel("mode sent")
        ax.set_title(f"{policy} / {allocator}: {int(g['deadline_met'].fillna(False).astype(bool).sum())}"
                     f"/{len(g)} in time", fontsize=8)
    handles = [plt.Line2D([], [], color=colours[a], linewidth=2, label=a) for a in agents]
    handles += [plt.Line2D([], [], color="k", marker="|", linestyle="", label="arrival"),
                plt.Line2D([], [], color="k", marker="o", linestyle="", label="answered in time"),
                plt.Line2D([], [], color="red", marker="x", linestyle="", markeredgewidth=2,
                           label="miss (at the answer, or at the deadline)")]
    axes[-1, 0].set_xlabel("time since the run started (s); a bar runs from a request's "
                           "arrival to its answer")
    fig.suptitle(f"{where}: every request (capacity in grey, right axis)", fontsize=9)
    top = 1 - 0.9 / fig.get_figheight()
    fig.legend(handles=handles, fontsize=7, ncol=min(len(handles), 7), loc="upper center",
               bbox_to_anchor=(0.5, top + 0.35 / fig.get_figheight()))
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(out / "timeline.png", dpi=120)
    plt.close(fig)


def _rates(plt, spec, out, requests, epochs, where) -> None:
    combos = list(epochs.groupby(["policy", "allocator"], sort=False))
    everyone = sorted(epochs["agent"].unique())
    # A panel per agent: a cell of hundreds would draw a picture no one can read (and take
    # minutes), so a cell's first agents stand for it and the title says how many there are.
    agents = everyone[:RATES_AGENTS]
    markers = {"bf16": "s", "int8": "D", "int4": "v", "mixed_int4": "^", "scout": "o",
               "local": "P"}
    width_in = max(10.0, 3.2 * len(combos))
    fig, axes = plt.subplots(len(agents), len(combos),
                             figsize=(width_in, 1.4 + 2.0 * len(agents)),
                             squeeze=False, sharex=True, sharey=True)
    for j, ((policy, allocator), g) in enumerate(combos):
        cap = _capacity(spec)
        for i, agent in enumerate(agents):
            ax = axes[i, j]
            a = _until(g[g["agent"] == agent].sort_values("t_s"), spec.duration_s)
            ax.step(cap["t_s"], cap["capacity_bps"] / 1e6, where="post", color="0.7",
                    linewidth=1)
            ax.step(a["t_s"], a["rate_bps"] / 1e6, where="post", color="C0", linewidth=1.5)
            r = requests[(requests["policy"] == policy) & (requests["allocator"] == allocator)
                         & (requests["agent"] == agent)]
            for mode, m in r.groupby("mode"):
                grant = _grant_at(a, m["t_arrival_s"])
                hit = m["deadline_met"].fillna(False).astype(bool)
                ax.scatter(m["t_arrival_s"][hit], grant[hit.to_numpy()] / 1e6,
                           marker=markers.get(mode, "o"), color="green", s=18, zorder=3)
                ax.scatter(m["t_arrival_s"][~hit], grant[~hit.to_numpy()] / 1e6,
                           marker=markers.get(mode, "o"), color="red", s=18, zorder=3)
            if i == 0:
                ax.set_title(f"{policy} / {allocator}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{agent}\nMbit/s", fontsize=8)
            if i == len(agents) - 1:
                ax.set_xlabel("time (s)", fontsize=8)
            ax.tick_params(labelsize=7)
    handles = [plt.Line2D([], [], color="0.7", label="bottleneck capacity"),
               plt.Line2D([], [], color="C0", linewidth=1.5, label="this agent's grant")]
    handles += [plt.Line2D([], [], marker=mk, color="k", linestyle="", label=mode)
                for mode, mk in markers.items() if mode in set(requests["mode"])]
    handles += [plt.Line2D([], [], marker="o", color="green", linestyle="", label="in time"),
                plt.Line2D([], [], marker="o", color="red", linestyle="", label="missed")]
    columns = len(handles) if width_in >= 16 else math.ceil(len(handles) / 2)
    height_in = fig.get_figheight()
    fig.legend(handles=handles, fontsize=7, ncol=columns, loc="upper center",
               bbox_to_anchor=(0.5, 1 - 0.45 / height_in))
    shown = "" if len(agents) == len(everyone) else f" (the first {len(agents)} of " \
        f"{len(everyone)} agents)"
    fig.suptitle(f"{where}: granted rate per agent (rows{shown}) and combination (columns);\n"
                 "each request at its arrival on its grant, marker = mode sent", fontsize=9)
    header_in = 0.45 + 0.15 * math.ceil(len(handles) / columns)
    fig.tight_layout(rect=(0, 0, 1, 1 - header_in / height_in))
    fig.savefig(out / "rates.png", dpi=120)
    plt.close(fig)


def _grant_at(agent_epochs: pd.DataFrame, times: pd.Series):
    """The grant in force at each time (the last epoch row at or before it)."""
    import numpy as np

    t = agent_epochs["t_s"].to_numpy()
    rate = agent_epochs["rate_bps"].to_numpy()
    if len(t) == 0:
        return np.full(len(times), np.nan)
    index = np.clip(np.searchsorted(t, times.to_numpy(), side="right") - 1, 0, len(t) - 1)
    return rate[index]


# --- CLI: re-render a results directory -------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("results", type=Path, help="a directory `scout run` wrote (its "
                        "spec.yaml and requests.csv; epochs.csv where there is one)")
    parser.add_argument("--out", type=Path, help="write summary.md and the plots here "
                        "instead of into the results directory")


def run(args) -> int:
    """``scout report``: rewrite summary.md and the plots from a run's tables."""
    import json
    import sys

    from ray_scout.experiments.spec import SpecError, load_spec

    results = args.results
    if (results / "plan.json").exists():  # a sweep's directory: its own report
        from ray_scout.experiments.sweep import rewrite_report

        try:
            print(rewrite_report(results))
        except (OSError, KeyError, ValueError, SpecError) as exc:
            print(f"scout report: {results} is not a complete sweep directory ({exc}); rerun "
                  "its `scout run` to finish it", file=sys.stderr)
            return 2
        return 0
    try:
        # meta.json says the fidelity that ran; a folder without one (reference results
        # committed with their tables only) has it in spec.yaml, which `scout run` writes.
        meta = results / "meta.json"
        fidelity = json.loads(meta.read_text())["fidelity"] if meta.exists() else None
        spec = load_spec(results / "spec.yaml", fidelity)
        frames = {t: pd.read_csv(results / f"{t}.csv") if (results / f"{t}.csv").exists()
                  else pd.DataFrame() for t in ("requests", "epochs")}
        if frames["requests"].empty:
            raise ValueError("no requests.csv with rows")
    except (OSError, KeyError, ValueError, SpecError) as exc:
        print(f"scout report: {results} is not a complete results directory ({exc}); "
              "run `scout run <spec>` first", file=sys.stderr)
        return 2
    out = args.out or results
    out.mkdir(parents=True, exist_ok=True)
    print(write_report(spec, out, frames))
    return 0
