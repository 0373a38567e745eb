"""The quality harness's runner: every sample of every cell of a grid answered through the
real request path (``EdgeStage.encode`` -> bytes -> ``CloudStage.answer``, so quality is that
of the payloads the testbed sends), one tidy row per sample x cell (``quality.ROW_FIELDS``).

What lives here: the runner (``run_grid``). What it leaves to others: the grid's values, the
rows' columns and the statistics (``core.evaluation.quality``, torch-free), which grids exist
and where rows are stored (``ray_scout.experiments.quality``).

Cost model: each sample is prefilled ONCE per edge model (capturing what every scorer of the
grid needs); every method's scores and every retention's positions derive from that one
prefill. Decoding (cloud side) is the cost, one per sample x cell.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from ray_scout.core.evaluation import metrics, tasks
from ray_scout.core.evaluation.quality import FULL, Cell, Grid, QualityError
from ray_scout.core.llm import selection
from ray_scout.core.llm.models import LoadedModel
from ray_scout.core.llm.scorers import CAPTURE
from ray_scout.core.modes import KV_MODES, Mode
from ray_scout.core.stages.full import CloudStage, EdgeAnalysis, EdgeOptions, EdgeStage

_CAPTURE_ORDER = ("none", "last", "all")


@dataclasses.dataclass(frozen=True)
class _SampleEdge:
    analysis: EdgeAnalysis
    scores: dict[str, torch.Tensor]
    select_s: dict[str, float]


def _capture_for(cells: Iterable[Cell]) -> str:
    needed = [CAPTURE[c.method] for c in cells if c.method != FULL]
    return max(needed, key=_CAPTURE_ORDER.index, default="none")


def _scorer_with_capture(capture: str) -> str:
    return next(name for name, cap in CAPTURE.items() if cap == capture)


def _analyze(lm: LoadedModel, sample: tasks.Sample, cells: Sequence[Cell],
             seed: int) -> _SampleEdge:
    """One prefill of the sample; every method's scores derived from it."""
    stage = EdgeStage(lm, EdgeOptions(scorer=_scorer_with_capture(_capture_for(cells))))
    analysis = stage.analyze(sample.context, sample.question)
    scores, select_s = {}, {}
    for method in dict.fromkeys(c.method for c in cells if c.method != FULL):
        start = time.perf_counter()
        # Random draws a fresh permutation per sample, reproducible from the grid's seed.
        params = {"seed": seed} if method == "random" else {}
        scores[method] = selection.score(method, analysis.prefill, **params)
        select_s[method] = time.perf_counter() - start
    return _SampleEdge(analysis, scores, select_s)


def _cell_analysis(edge: _SampleEdge, cell: Cell) -> EdgeAnalysis:
    analysis = edge.analysis
    if cell.method == FULL:
        everything = torch.arange(analysis.layout.num_context)
        return dataclasses.replace(analysis, scout_positions=everything, kv_positions=everything)
    positions = selection.select_positions(edge.scores[cell.method], cell.retention)
    return dataclasses.replace(analysis, scores=edge.scores[cell.method],
                               scout_positions=positions, kv_positions=positions)


def _edge_stage(lm: LoadedModel, grid: Grid, cell: Cell, protected: tuple[int, ...],
                cloud_model_id: str) -> EdgeStage:
    options = EdgeOptions(
        scorer=cell.method if cell.method != FULL else "q2c",
        scout_retention=cell.retention if cell.mode == Mode.SCOUT else 1.0,
        kv_retention=cell.retention if cell.mode in KV_MODES else 1.0,
        group_size=grid.group_size, protected_layers=protected,
        max_new_tokens=grid.max_new_tokens)
    return EdgeStage(lm, options, cloud_model_id=cloud_model_id)


def _score_row(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    return {"em": metrics.exact_match(prediction, answers), "f1": metrics.f1(prediction, answers),
            "contains": metrics.contains_answer(prediction, answers)}


def run_grid(grid: Grid, edge_lm: LoadedModel, cloud_lm: LoadedModel, *,
             protected_layers: tuple[int, ...] = (),
             done: Iterable[tuple] = (),
             progress: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Yield one row per (task, length, sample, cell), sample-major.

    Sample-major order means an interrupted run leaves every cell with the same samples, so
    paired tests stay valid at any stopping point. ``done`` holds ``row_key``s already
    measured; those are skipped (and a sample whose cells are all done is not prefilled).
    ``protected_layers`` are mixed INT4's 16-bit layers (required when the grid has it).
    """
    if grid.needs_protected_layers and not protected_layers:
        raise QualityError("the grid has mixed_int4 cells: pass protected_layers (the edge "
                           "model's bottleneck layers, bottleneck.protected_layers_for)")
    done = set(done)
    cloud = CloudStage({edge_lm.model_id: edge_lm, cloud_lm.model_id: cloud_lm},
                       max_new_tokens=grid.max_new_tokens)
    for task in grid.tasks:
        for length in grid.context_tokens:
            samples = tasks.generate(task, grid.n, context_tokens=length, seed=grid.seed,
                                     count_tokens=edge_lm.tokenizer)
            for index, sample in enumerate(samples):
                ids = (grid.edge_model, grid.cloud_model, task, length, grid.max_new_tokens,
                       sample.sample_id)
                todo = [c for c in grid.cells if ids + c.key not in done]
                if not todo:
                    continue
                yield from _sample_rows(grid, edge_lm, cloud_lm, cloud, sample, index, length,
                                        todo, protected_layers)
                if progress:
                    progress(f"{task}@{length} sample {index + 1}/{grid.n}: {len(todo)} cells")


def _sample_rows(grid: Grid, edge_lm: LoadedModel, cloud_lm: LoadedModel, cloud: CloudStage,
                 sample: tasks.Sample, index: int, length: int, cells: Sequence[Cell],
                 protected: tuple[int, ...]) -> Iterator[dict]:
    edge = _analyze(edge_lm, sample, cells, seed=grid.seed * 1_000_003 + index)
    cloud.documents.put(sample.context)  # the common case: the cloud knows the document
    base = {"grid": grid.name, "edge_model": grid.edge_model, "cloud_model": grid.cloud_model,
            "task": sample.task, "context_tokens": length,
            "max_new_tokens": grid.max_new_tokens, "sample_index": index,
            "sample_id": sample.sample_id, "answers": "|".join(sample.answers),
            "edge_prefill_s": edge.analysis.timings["prefill_s"],
            "num_context_tokens": edge.analysis.layout.num_context}
    for cell in cells:
        analysis = _cell_analysis(edge, cell)
        row = dict(base, method=cell.method, retention=cell.retention, mode=cell.mode.value,
                   select_s=edge.select_s.get(cell.method, 0.0),
                   kept_context_tokens=int(analysis.kv_positions.numel()))
        if cell.mode == Mode.LOCAL:
            answer = EdgeStage(edge_lm, EdgeOptions(max_new_tokens=grid.max_new_tokens)) \
                .answer_locally(analysis)
            row.update(payload_bytes=0, payload_with_document_bytes=0, encode_s=0.0,
                       cloud_payload_s=0.0, cloud_prefill_s=0.0, cloud_decode_s=answer.decode_s,
                       prediction=answer.text)
        else:
            # Scout names the cloud model; KV payloads are the edge model's own cache.
            target = cloud_lm.model_id if cell.mode == Mode.SCOUT else edge_lm.model_id
            stage = _edge_stage(edge_lm, grid, cell, protected, target)
            encoded = stage.encode(analysis, cell.mode)
            with_document = (len(stage.encode(analysis, cell.mode, cloud_has_document=False).data)
                             if cell.mode == Mode.SCOUT else len(encoded.data))
            answer = cloud.answer(encoded.data)
            row.update(payload_bytes=len(encoded.data),
                       payload_with_document_bytes=with_document, encode_s=encoded.encode_s,
                       cloud_payload_s=answer.decode_payload_s, cloud_prefill_s=answer.prefill_s,
                       cloud_decode_s=answer.decode_s, prediction=answer.text)
        row.update(_score_row(row["prediction"], sample.answers))
        yield row
