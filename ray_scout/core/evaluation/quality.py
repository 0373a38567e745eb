"""The quality harness's values: a grid of (models, task, length, method x retention, mode)
cells, its tidy rows and the statistics over them.

What lives here: the grid's values (``Cell``, ``Grid``), the rows' columns (one per sample x
cell, ``ROW_FIELDS``) and identity (``row_key``), and the statistics over those rows (cell
means with bootstrap CIs, paired tests against the reference cell, relative quality for a
``QualityProfile``). Torch-free, so grids are named, checked and summarized (and ``scout
quality --help`` answers) without loading a model. What it leaves to others: answering the
cells through the real request path (``core.evaluation.harness``), which grids exist and
where rows are stored (``ray_scout.experiments.quality``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from ray_scout.core.evaluation import metrics, tasks
from ray_scout.core.llm.scorers import CAPTURE
from ray_scout.core.modes import KV_MODES, Mode
from ray_scout.core.control.policy import ModeQuality, QualityProfile

# The method of cells that keep the whole context (retention 1).
FULL = "full"
# Scores of one row; ``headline`` picks one of them per task in the summary.
SCORES = ("em", "f1", "contains")
ROW_FIELDS = (
    "grid", "edge_model", "cloud_model", "task", "context_tokens", "max_new_tokens",
    "sample_index", "sample_id",
    "method", "retention", "mode", "payload_bytes", "payload_with_document_bytes",
    "kept_context_tokens", "num_context_tokens", "prediction", "answers", "em", "f1",
    "contains", "edge_prefill_s", "select_s", "encode_s", "cloud_payload_s", "cloud_prefill_s",
    "cloud_decode_s",
)

class QualityError(ValueError):
    """A grid that cannot be run, or rows that cannot be summarized."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One way of answering: a selection ``method`` keeping ``retention`` of the context,
    sent as ``mode``. ``method`` is ``"full"`` (retention 1) or a scorer's name (``scorers.CAPTURE``);
    ``local`` is always ``full``: the edge model answers from its own whole prefill."""

    method: str
    retention: float
    mode: Mode

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.parse(self.mode) if isinstance(self.mode, str)
                           else self.mode)
        object.__setattr__(self, "retention", float(self.retention))
        if self.method != FULL and self.method not in CAPTURE:
            raise QualityError(f"unknown method {self.method!r}; use 'full' or one of "
                               f"{', '.join(CAPTURE)}")
        if not 0.0 < self.retention <= 1.0:
            raise QualityError(f"retention must lie in (0, 1], got {self.retention}")
        if (self.method == FULL) != (self.retention == 1.0):
            raise QualityError(f"cell {self.method}@{self.retention:g}: method 'full' and "
                               "retention 1 go together (a scorer at 100% keeps everything)")
        if self.mode == Mode.LOCAL and self.method != FULL:
            raise QualityError("local answers from the edge's whole prefill: use method 'full'")

    @property
    def key(self) -> tuple[str, float, str]:
        return (self.method, self.retention, self.mode.value)


REFERENCE = Cell(FULL, 1.0, Mode.BF16)


@dataclasses.dataclass(frozen=True)
class Grid:
    """Everything a run needs besides the models; ``n`` samples per (task, length).

    ``edge_model``/``cloud_model`` are ``load_model`` sources (``"embedded"``, a path, a hub
    id); rows carry these names.
    """

    name: str
    edge_model: str
    cloud_model: str
    tasks: tuple[str, ...]
    context_tokens: tuple[int, ...]
    cells: tuple[Cell, ...]
    n: int
    seed: int = 0
    max_new_tokens: int = 20
    group_size: int = 32
    protected_top_k: int = 1

    def __post_init__(self) -> None:
        for task in self.tasks:
            if task not in tasks.TASKS:
                raise QualityError(f"unknown task {task!r}; known: {', '.join(tasks.TASKS)}")
        if self.n < 1:
            raise QualityError(f"n must be at least 1, got {self.n}")
        if not self.cells:
            raise QualityError("a grid needs at least one cell")
        if len({c.key for c in self.cells}) != len(self.cells):
            raise QualityError("a grid lists the same cell twice")

    @property
    def needs_protected_layers(self) -> bool:
        return any(c.mode == Mode.MIXED_INT4 for c in self.cells)


def row_key(row: Mapping) -> tuple:
    """The identity of a row: models, task, length, decode cap, sample and cell.

    The grid's name is provenance only, so grids that share cells share their rows.
    """
    return (row["edge_model"], row["cloud_model"], row["task"], int(row["context_tokens"]),
            int(row["max_new_tokens"]), row["sample_id"], row["method"],
            float(row["retention"]), row["mode"])


# --------------------------------------------------------------------------- statistics

CELL_COLUMNS = ("task", "context_tokens", "method", "retention", "mode")


def _groups(rows: Sequence[Mapping], columns: Sequence[str]) -> dict[tuple, list[Mapping]]:
    out: dict[tuple, list[Mapping]] = {}
    for row in rows:
        out.setdefault(tuple(row[c] for c in columns), []).append(row)
    return out


def _by_sample(rows: Sequence[Mapping], metric: str) -> dict[str, float]:
    return {row["sample_id"]: float(row[metric]) for row in rows}


@dataclasses.dataclass(frozen=True)
class CellSummary:
    """One cell's mean of ``metric`` with its 95% bootstrap CI, and the paired test against
    the reference cell (full context, BF16) on the samples both have."""

    task: str
    context_tokens: int
    method: str
    retention: float
    mode: str
    metric: str
    n: int
    mean: float
    ci_low: float
    ci_high: float
    payload_bytes: float
    diff_vs_reference: float | None
    diff_low: float | None
    diff_high: float | None
    p_vs_reference: float | None


def paired(rows_a: Sequence[Mapping], rows_b: Sequence[Mapping], metric: str,
           seed: int = 0) -> metrics.PairedResult:
    """Paired test of ``metric``, a minus b, on the samples both cells hold."""
    a, b = _by_sample(rows_a, metric), _by_sample(rows_b, metric)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise QualityError("the two cells share no samples; a paired test needs the same ones")
    return metrics.paired_test([a[s] for s in shared], [b[s] for s in shared], seed=seed)


def summarize(rows: Sequence[Mapping], metric: str, *, seed: int = 0) -> list[CellSummary]:
    """Per cell: mean, CI, n and the paired difference to the reference cell."""
    if metric not in SCORES:
        raise QualityError(f"metric must be one of {SCORES}, not {metric!r}")
    cells = _groups(rows, CELL_COLUMNS)
    out = []
    for key, cell_rows in sorted(cells.items(), key=lambda kv: _sort_key(kv[0])):
        task, length = key[0], key[1]
        ci = metrics.bootstrap_ci([float(r[metric]) for r in cell_rows], seed=seed)
        reference = cells.get((task, length) + REFERENCE.key)
        test = None
        if reference is not None and key[2:] != REFERENCE.key:
            test = paired(cell_rows, reference, metric, seed=seed)
        out.append(CellSummary(
            task, int(length), key[2], float(key[3]), key[4], metric, len(cell_rows), ci.mean,
            ci.low, ci.high, float(np.mean([float(r["payload_bytes"]) for r in cell_rows])),
            test.mean_diff if test else None, test.low if test else None,
            test.high if test else None, test.p_value if test else None))
    return out


def _sort_key(key: tuple) -> tuple:
    task, length, method, retention, mode = key
    order = [m.value for m in Mode]
    return (task, int(length), method != FULL, method, -float(retention), order.index(mode))


def reference_cell(edge_model: str, cloud_model: str) -> Cell:
    """The cloud model's own full-precision, full-context answer.

    Same model on both sides: its full BF16 KV. Different models: scout at 100% retention,
    which is exactly the cloud model prefilling and answering the whole prompt itself.
    """
    return REFERENCE if edge_model == cloud_model else Cell(FULL, 1.0, Mode.SCOUT)


def relative_to_reference(rows: Sequence[Mapping], cell: Cell, *, reference: Cell = REFERENCE,
                          metric: str = "f1", n_resamples: int = 2000,
                          seed: int = 0) -> tuple[float, int, float, float]:
    """mean(metric of ``cell``) / mean(metric of ``reference``), paired over shared samples.

    Returns ``(ratio, n, ci_low, ci_high)``; the CI is the percentile bootstrap of the ratio
    of means, resampling samples (both cells together, so their correlation is kept).
    """
    cell_rows = [r for r in rows if (r["method"], float(r["retention"]), r["mode"]) == cell.key]
    ref_rows = [r for r in rows if (r["method"], float(r["retention"]), r["mode"]) == reference.key]
    a, b = _by_sample(cell_rows, metric), _by_sample(ref_rows, metric)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise QualityError(f"no samples hold both {cell.key} and the reference {reference.key}")
    x = np.array([a[s] for s in shared])
    y = np.array([b[s] for s in shared])
    if y.sum() == 0:
        raise QualityError(f"the reference scores 0 {metric} on all {len(shared)} samples; "
                           "relative quality is undefined (pick another metric or task)")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(shared), size=(n_resamples, len(shared)))
    den = y[idx].sum(axis=1)
    ratios = np.where(den > 0, x[idx].sum(axis=1) / np.where(den > 0, den, 1), np.nan)
    low, high = np.nanquantile(ratios, [0.025, 0.975])
    return float(x.sum() / y.sum()), len(shared), float(low), float(high)


def calibration_cells(scout_retention: float, scorer: str = "q2c") -> dict[Mode, Cell]:
    """The cell that stands for each transport mode in a quality profile."""
    cells = {mode: Cell(FULL, 1.0, mode) for mode in KV_MODES}
    cells[Mode.SCOUT] = (Cell(scorer, scout_retention, Mode.SCOUT) if scout_retention < 1.0
                         else Cell(FULL, 1.0, Mode.SCOUT))
    cells[Mode.LOCAL] = Cell(FULL, 1.0, Mode.LOCAL)
    return cells


def profile_from_rows(rows: Sequence[Mapping], cells: Mapping[Mode, Cell], *, name: str,
                      edge_model: str, cloud_model: str, source: str,
                      seed: int = 0) -> QualityProfile:
    """A ``relative_f1`` profile: each mode's F1 over the cloud model's own full-precision F1
    (``reference_cell``), with n and the bootstrap CI of the ratio."""
    reference = reference_cell(edge_model, cloud_model)
    modes = {}
    for mode, cell in cells.items():
        ratio, n, low, high = relative_to_reference(rows, cell, reference=reference, seed=seed)
        modes[mode] = ModeQuality(round(ratio, 4), n=n, ci_low=round(low, 4),
                                  ci_high=round(high, 4))
    return QualityProfile(name, edge_model, cloud_model, "relative_f1", modes, source)
