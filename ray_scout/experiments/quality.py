"""``scout quality``: run a named (or YAML) quality grid, store tidy rows, write the summary.

What lives here: the named grids (``GRIDS``), reading a grid from YAML, the CSV store that
makes runs resumable (rows are appended as they are measured; a rerun skips what the file
already holds), the Parquet copy, and the Markdown summary (Paper A Table 2-like selection x
retention, Table 5-like modes, paired tests against full BF16). What it leaves to others:
running cells (``ray_scout.core.evaluation.harness``) and the statistics themselves.

Row columns (one row per sample x cell): ``core.evaluation.quality.ROW_FIELDS``; ``em``/``f1``/
``contains`` are 0..1 per sample, sizes in bytes, times in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml

from ray_scout.core.evaluation.quality import (FULL, REFERENCE, ROW_FIELDS, SCORES, Cell,
                                               CellSummary, Grid, QualityError, paired,
                                               row_key, summarize)
from ray_scout.core.modes import Mode
from ray_scout.experiments.rowstore import RowStore

# Scratch by default (git-ignored); committed results name their file with --results.
RESULTS_DIR = Path("results/quality")
RETENTIONS = (0.25, 0.5, 0.75)
SELECTORS = ("q2c", "snapkv", "h2o", "streaming", "random")
CODEC_MODES = (Mode.BF16, Mode.INT8, Mode.INT4, Mode.MIXED_INT4)
# Synthetic answers are one word inside a sentence the model likes to repeat, so the RULER
# string match is the headline there; EM/F1 are reported beside it (docs/QUALITY.md).
HEADLINE = {"single_needle": "contains", "multi_needle": "contains", "multi_hop": "contains"}


def _cells(*groups: Iterable[Cell]) -> tuple[Cell, ...]:
    return tuple(dict.fromkeys(c for group in groups for c in group))


def _selection_cells(methods: Sequence[str], retentions: Sequence[float]) -> list[Cell]:
    return [Cell(m, r, Mode.BF16) for m in methods for r in retentions]


def _codec_cells() -> list[Cell]:
    return [Cell(FULL, 1.0, m) for m in CODEC_MODES]


def _scout_cells(retentions: Sequence[float]) -> list[Cell]:
    return [Cell("q2c", r, mode) for r in retentions for mode in (Mode.BF16, Mode.SCOUT)]


def _grid(name: str, cells: tuple[Cell, ...], *, n: int, context_tokens: int,
          task_names: tuple[str, ...] = ("single_needle",)) -> Grid:
    return Grid(name, "embedded", "embedded", task_names, (context_tokens,), cells, n=n)


# The figures of issue 2 first (INT8 vs BF16; Q2C vs random at 25%), then the full tables.
GRIDS: dict[str, Grid] = {
    "demo": _grid("demo", _cells([REFERENCE, Cell(FULL, 1.0, Mode.INT8)],
                                 _selection_cells(("q2c", "random"), (0.25,)),
                                 [Cell("q2c", 0.5, Mode.SCOUT)]), n=6, context_tokens=300),
    "figures": _grid("figures", _cells(_codec_cells(),
                                       _selection_cells(("q2c", "random"), (0.25,)),
                                       [Cell("q2c", 0.5, Mode.SCOUT), Cell(FULL, 1.0, Mode.LOCAL)]),
                     n=100, context_tokens=500),
    "paper-a": _grid("paper-a", _cells(_codec_cells(), _selection_cells(SELECTORS, RETENTIONS)),
                     n=100, context_tokens=500),
    "scout": _grid("scout", _cells([REFERENCE, Cell(FULL, 1.0, Mode.SCOUT)],
                                   _scout_cells(RETENTIONS)), n=100, context_tokens=500),
}


def load_grid(spec: str) -> Grid:
    """A named grid, or a YAML file with Grid's fields (cells as ``[method, retention, mode]``)."""
    if spec in GRIDS:
        return GRIDS[spec]
    path = Path(spec)
    if not path.is_file():
        raise QualityError(f"no grid named {spec!r} and no such file; named grids: "
                           f"{', '.join(GRIDS)}")
    doc = yaml.safe_load(path.read_text())
    try:
        cells = tuple(Cell(*c) for c in doc.pop("cells"))
        doc["tasks"] = tuple(doc["tasks"])
        doc["context_tokens"] = tuple(doc["context_tokens"])
        return Grid(cells=cells, **doc)
    except (KeyError, TypeError, AttributeError) as err:
        raise QualityError(f"{path}: a grid needs name, edge_model, cloud_model, tasks, "
                           f"context_tokens, n and cells of [method, retention, mode] ({err})") from None


# --------------------------------------------------------------------------- storage

STORE = RowStore(
    fields=ROW_FIELDS, error=QualityError,
    ints=("context_tokens", "max_new_tokens", "sample_index", "payload_bytes",
          "payload_with_document_bytes", "kept_context_tokens", "num_context_tokens"),
    floats=("retention", "em", "f1", "contains", "edge_prefill_s", "select_s", "encode_s",
            "cloud_payload_s", "cloud_prefill_s", "cloud_decode_s"))
read_rows, append_rows = STORE.read, STORE.append


def write_parquet(rows: Sequence[Mapping], path: Path) -> None:
    import pandas as pd

    pd.DataFrame(list(rows), columns=ROW_FIELDS).to_parquet(path, index=False)


def grid_rows(rows: Sequence[Mapping], grid: Grid) -> list[dict]:
    """The rows that belong to ``grid``'s cells, tasks, lengths, models and samples."""
    keys = {c.key for c in grid.cells}
    out = []
    for row in rows:
        if (row["edge_model"] == grid.edge_model and row["cloud_model"] == grid.cloud_model
                and row["task"] in grid.tasks and int(row["context_tokens"]) in grid.context_tokens
                and int(row["max_new_tokens"]) == grid.max_new_tokens
                and int(row["sample_index"]) < grid.n
                and (row["method"], float(row["retention"]), row["mode"]) in keys):
            out.append(dict(row))
    return out


# --------------------------------------------------------------------------- summary

def _fmt(s: CellSummary) -> str:
    return f"{s.mean:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}] (n={s.n})"


def _diff(s: CellSummary) -> str:
    if s.diff_vs_reference is None:
        return "reference"
    return (f"{s.diff_vs_reference:+.3f} [{s.diff_low:+.3f}, {s.diff_high:+.3f}], "
            f"p={s.p_vs_reference:.3g}")


def summary_markdown(rows: Sequence[Mapping], grid: Grid) -> str:
    """Tables per task and length: selection x retention (Table 2-like), modes (Table 5-like),
    every cell as mean [95% CI] (n), with paired tests against full-context BF16."""
    lines = [f"# Quality: grid `{grid.name}`", "",
             f"{grid.edge_model} -> {grid.cloud_model}; seed {grid.seed}; "
             f"max_new_tokens {grid.max_new_tokens}. Cells: mean [95% bootstrap CI] (n). "
             "Differences are paired (same samples) against full-context BF16, "
             "sign-flip permutation p-values.", ""]
    by_task: dict[tuple[str, int], list[Mapping]] = {}
    for row in rows:
        by_task.setdefault((row["task"], int(row["context_tokens"])), []).append(row)
    for (task, length), task_rows in sorted(by_task.items()):
        headline = HEADLINE.get(task, "f1")
        tables = {m: summarize(task_rows, m) for m in SCORES}
        lines += [f"## {task}, {length} context tokens", "",
                  f"Headline metric: `{headline}`.", ""]
        lines += _selection_table(tables, headline)
        lines += _mode_table(tables)
        lines += _pairs(task_rows)
    return "\n".join(lines) + "\n"


def _selection_table(tables: Mapping[str, list[CellSummary]], metric: str) -> list[str]:
    cells = [s for s in tables[metric] if s.mode == Mode.BF16.value and s.method != FULL]
    if not cells:
        return []
    retentions = sorted({s.retention for s in cells}, reverse=True)
    full = [s for s in tables[metric] if (s.method, s.retention, s.mode) == REFERENCE.key]
    head = ["method"] + [f"{r:.0%}" for r in retentions]
    out = [f"Selection x retention (BF16 KV of the kept positions), `{metric}`:", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if full:
        out.append("| full context | " + " | ".join([_fmt(full[0])] + [""] * (len(retentions) - 1)) + " |")
    for method in dict.fromkeys(s.method for s in cells):
        row = {s.retention: s for s in cells if s.method == method}
        out.append(f"| {method} | " + " | ".join(_fmt(row[r]) if r in row else "" for r in retentions) + " |")
    return out + [""]


def _mode_table(tables: Mapping[str, list[CellSummary]]) -> list[str]:
    out = ["All cells, every metric (diff = cell minus full BF16, paired):", "",
           "| method | retention | mode | payload bytes | EM | F1 | contains | F1 diff | contains diff |",
           "|---|---|---|---|---|---|---|---|---|"]
    for em, f1, contains in zip(tables["em"], tables["f1"], tables["contains"]):
        out.append(f"| {f1.method} | {f1.retention:.0%} | {f1.mode} | {f1.payload_bytes:,.0f} | "
                   f"{_fmt(em)} | {_fmt(f1)} | {_fmt(contains)} | {_diff(f1)} | {_diff(contains)} |")
    return out + [""]


def _pairs(rows: Sequence[Mapping]) -> list[str]:
    """Q2C against every other selector at each retention both have, on the samples both have."""
    out = []
    baselines = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in ("q2c", "full")]
    for baseline in baselines:
        for retention in sorted({float(r["retention"]) for r in rows if r["method"] == "q2c"}):
            def cell(method: str) -> list[Mapping]:
                return [r for r in rows if r["method"] == method and r["mode"] == Mode.BF16.value
                        and float(r["retention"]) == retention]
            q2c, other = cell("q2c"), cell(baseline)
            if not q2c or not other:
                continue
            if not out:
                out = ["Q2C minus each other selector (BF16 KV, paired):", "",
                       "| baseline | retention | metric | diff [95% CI] | p | n |",
                       "|---|---|---|---|---|---|"]
            for metric in SCORES:
                t = paired(q2c, other, metric)
                out.append(f"| {baseline} | {retention:.0%} | {metric} | {t.mean_diff:+.3f} "
                           f"[{t.low:+.3f}, {t.high:+.3f}] | {t.p_value:.3g} | {t.n} |")
    return out + ([""] if out else [])


# --------------------------------------------------------------------------- command

DTYPES = ("float32", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", default="demo",
                        help=f"a named grid ({', '.join(GRIDS)}) or a YAML grid file")
    parser.add_argument("--n", type=int, help="samples per task and length (overrides the grid)")
    parser.add_argument("--results", type=Path,
                        help="CSV to append to and resume from (default "
                             f"{RESULTS_DIR}/<edge>-<cloud>.csv); Parquet and .md go beside it")
    parser.add_argument("--summary", type=Path, help="Markdown summary path "
                        "(default: beside the CSV, <grid>.md)")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="results CSVs of other runs (say, run in parallel) whose rows "
                             "the --results file lacks: appended to it before anything runs")
    parser.add_argument("--no-run", action="store_true",
                        help="measure nothing: summarize the rows on file")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (1 is faster on a CPU shared with other jobs)")
    parser.add_argument("--device", default="cpu",
                        help="torch device the models run on (cpu, cuda, cuda:1); rows do not "
                             "name it, so keep each device's rows in their own --results file")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="the weights' dtype (default: float32 on the CPU, bfloat16 on a "
                             "GPU; float32 on a GPU computes what the CPU does)")


def checked_device(device: str):
    """``device`` as a torch device that can hold a tensor, or a QualityError saying why not."""
    import torch

    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise QualityError(f"--device {device} is not usable here ({error}); run on the CPU "
                           "(--device cpu) or on a machine whose torch sees that device") from None
    return torch.device(device)


def _load(grid: Grid, device: str = "cpu", dtype: str | None = None):
    import torch

    from ray_scout.core.llm import bottleneck, models

    where = {"device": checked_device(device), "dtype": getattr(torch, dtype) if dtype else None}
    edge = models.load_model(grid.edge_model, **where)
    cloud = (edge if grid.cloud_model == grid.edge_model
             else models.load_model(grid.cloud_model, **where))
    protected = (bottleneck.protected_layers_for(edge, top_k=grid.protected_top_k,
                                                 group_size=grid.group_size)
                 if grid.needs_protected_layers else ())
    return edge, cloud, protected


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def default_results(grid: Grid) -> Path:
    return RESULTS_DIR / f"{_safe(grid.edge_model)}-{_safe(grid.cloud_model)}.csv"


def merge_results(results: Path, others: Sequence[Path]) -> int:
    """Append the rows of ``others`` that ``results`` lacks; returns how many."""
    seen = {row_key(r) for r in read_rows(results)}
    fresh = []
    for other in others:
        for row in read_rows(other):
            if row_key(row) not in seen:
                seen.add(row_key(row))
                fresh.append(row)
    return append_rows(results, fresh)


def measure(grid: Grid, results: Path, *, log=print, device: str = "cpu",
            dtype: str | None = None) -> list[dict]:
    """Run what ``results`` lacks of ``grid`` and return all of the grid's rows."""
    # The runner needs torch and the models: imported here, so --help and --no-run need neither.
    from ray_scout.core.evaluation.harness import run_grid

    done = {row_key(r) for r in read_rows(results)}
    edge, cloud, protected = _load(grid, device, dtype)
    log(f"{grid.name}: {grid.edge_model} -> {grid.cloud_model} on {edge.device} "
        f"({next(edge.model.parameters()).dtype}), {len(grid.cells)} cells x "
        f"{grid.n} samples; protected layers {protected or '-'}; {len(done)} rows on file")
    start = time.perf_counter()
    added = append_rows(results, run_grid(
        grid, edge, cloud, protected_layers=protected, done=done,
        progress=lambda msg: log(f"[{time.perf_counter() - start:7.1f} s] {msg}")))
    log(f"{added} new rows in {time.perf_counter() - start:.1f} s -> {results}")
    return grid_rows(read_rows(results), grid)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    grid = load_grid(args.grid)
    if args.n is not None:
        grid = dataclasses.replace(grid, n=args.n)
    results = args.results or default_results(grid)
    if args.merge:
        print(f"merged {merge_results(results, args.merge)} rows into {results}")
    rows = (grid_rows(read_rows(results), grid) if args.no_run
            else measure(grid, results, device=args.device, dtype=args.dtype))
    write_parquet(read_rows(results), results.with_suffix(".parquet"))
    summary = args.summary or results.with_name(f"{_safe(grid.name)}.md")
    summary.write_text(summary_markdown(rows, grid))
    sys.stdout.write(summary.read_text())
    return 0
