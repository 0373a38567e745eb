"""``scout cross-family``: one family's Q2C selection answered by another family's model.

What lives here: the run over two models A and B (say SmolLM2 and Gemma 3) that, per sample,
prefills each model once and answers, on each model: the full context (the model alone),
its own Q2C selection at every retention, and the other model's Q2C selection mapped onto
its tokens through character offsets (scout across families), with the mapping's coverage
and the attention alignment (how much of a model's own top-k the other's top-k covers, in
characters); the resumable CSV store; the Markdown summary with bootstrap CIs and paired
tests. ``--alignment-only`` keeps the prefills and the mapping measures and decodes no answer
(its own CSV layout and summary): the answers are most of a sample's cost at long context.
What it leaves to others: selection and mapping (``core.llm.selection``,
``core.llm.scout``), decoding (``core.llm.generation``), statistics (``core.evaluation``).

The cloud end of scout (``scout.scout_answer``) is prefill + ``positions_in_spans`` +
``answer_pruned``; here one prefill per model serves every cell of a sample, so the cells
are exactly scout's answers at a fraction of the cost. Wire encoding is not repeated
(``scout quality`` measures scout through the wire bytes; tests/test_scout.py pins the
round trip).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ray_scout.core.evaluation import metrics, tasks
from ray_scout.experiments.rowstore import RowStore

if TYPE_CHECKING:
    from ray_scout.core.llm.models import LoadedModel

RETENTIONS = (0.25, 0.5, 0.75)
FULL, OWN, MAPPED = "full", "own_q2c", "mapped_q2c"
FIELDS = (
    "model_a", "model_b", "task", "context_tokens", "max_new_tokens", "sample_index",
    "sample_id", "cloud_model", "edge_model", "selection", "retention", "kept_cloud_tokens",
    "num_cloud_context", "coverage", "precision", "alignment", "chance_alignment",
    "prediction", "answers", "em", "f1", "contains", "cloud_prefill_s",
)
_FLOATS = ("retention", "coverage", "precision", "alignment", "chance_alignment", "em", "f1",
           "contains", "cloud_prefill_s")
_INTS = ("context_tokens", "max_new_tokens", "sample_index", "kept_cloud_tokens",
         "num_cloud_context")
# --alignment-only rows: the mapped cells' measures without an answer (no decoding settings).
ALIGNMENT_FIELDS = tuple(f for f in FIELDS if f not in (
    "max_new_tokens", "prediction", "answers", "em", "f1", "contains"))
_ALIGNMENT_FLOATS = tuple(f for f in _FLOATS if f in ALIGNMENT_FIELDS)
_ALIGNMENT_INTS = tuple(f for f in _INTS if f in ALIGNMENT_FIELDS)


class CrossFamilyError(ValueError):
    """Arguments or stored rows the cross-family run cannot use."""


def _scores(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    return {"em": metrics.exact_match(prediction, answers), "f1": metrics.f1(prediction, answers),
            "contains": metrics.contains_answer(prediction, answers)}


def _prefill_and_select(models: Sequence[tuple[str, LoadedModel]], sample: tasks.Sample,
                        retentions: Sequence[float]) -> tuple[dict, dict]:
    """Each model's prefill of the sample and its own Q2C positions at every retention."""
    # torch and the models come in with the first sample, so --help and --no-run need neither.
    from ray_scout.core.llm import generation, selection
    from ray_scout.core.llm.prompt import build_prompt

    prefills, own = {}, {}
    for name, lm in models:
        pre = generation.prefill(lm, build_prompt(lm.tokenizer, sample.context, sample.question))
        prefills[name] = pre
        q2c = selection.q2c(pre)
        own[name] = {r: selection.select_positions(q2c, r) for r in retentions}
    return prefills, own


def _mapped_cells(models: Sequence[tuple[str, LoadedModel]], sample: tasks.Sample,
                  prefills: Mapping, own: Mapping, cloud_name: str,
                  retention: float) -> Iterator[tuple[dict, object]]:
    """Per other (edge) model: the mapped cell's measures and the cloud positions it keeps."""
    from ray_scout.core.llm import scout

    context = sample.context
    pre = prefills[cloud_name]
    offsets = pre.layout.context_offsets
    mine_chars = scout.char_mask(offsets, own[cloud_name][retention], len(context))
    everything = scout.char_mask(offsets, range(pre.layout.num_context), len(context))
    for edge_name, _ in models:
        if edge_name == cloud_name:
            continue
        edge_offsets = prefills[edge_name].layout.context_offsets
        chosen = own[edge_name][retention]
        mapped = scout.mapping_coverage(edge_offsets, offsets, chosen, len(context))
        edge_chars = scout.char_mask(edge_offsets, chosen, len(context))
        yield dict(
            edge_model=edge_name, selection=MAPPED, retention=retention,
            kept_cloud_tokens=int(mapped.cloud_positions.numel()),
            coverage=mapped.coverage, precision=mapped.precision,
            # Alignment: share of the cloud's own top-k characters that the edge's top-k
            # also holds; chance: what an edge selection of that many characters drawn at
            # random would hold on average.
            alignment=float((edge_chars & mine_chars).sum()) / max(1, int(mine_chars.sum())),
            chance_alignment=float(edge_chars.sum()) / max(1, int(everything.sum())),
        ), mapped.cloud_positions


def _cloud_base(sample: tasks.Sample, cloud_name: str, pre) -> dict:
    return {"task": sample.task, "sample_id": sample.sample_id, "cloud_model": cloud_name,
            "num_cloud_context": pre.layout.num_context, "cloud_prefill_s": pre.prefill_s}


def sample_rows(models: Sequence[tuple[str, LoadedModel]], sample: tasks.Sample, *,
                retentions: Sequence[float], max_new_tokens: int) -> Iterator[dict]:
    """Every row of one sample: per cloud model, full context, own Q2C and the other
    model's Q2C mapped, at every retention."""
    from ray_scout.core.llm import generation

    prefills, own = _prefill_and_select(models, sample, retentions)
    for cloud_name, cloud_lm in models:
        pre = prefills[cloud_name]
        cloud_base = dict(_cloud_base(sample, cloud_name, pre), answers="|".join(sample.answers),
                          max_new_tokens=max_new_tokens)
        answer = generation.greedy_answer(cloud_lm, pre.snapshot, pre.logits,
                                          max_new_tokens=max_new_tokens)
        yield dict(cloud_base, edge_model=cloud_name, selection=FULL, retention=1.0,
                   kept_cloud_tokens=pre.layout.num_context, coverage=1.0, precision=1.0,
                   alignment=1.0, chance_alignment=1.0, prediction=answer.text,
                   **_scores(answer.text, sample.answers))
        for r in retentions:
            mine = own[cloud_name][r]
            answer = generation.answer_pruned(cloud_lm, pre, mine, max_new_tokens=max_new_tokens)
            yield dict(cloud_base, edge_model=cloud_name, selection=OWN, retention=r,
                       kept_cloud_tokens=int(mine.numel()), coverage=1.0, precision=1.0,
                       alignment=1.0, chance_alignment=1.0, prediction=answer.text,
                       **_scores(answer.text, sample.answers))
            for cell, positions in _mapped_cells(models, sample, prefills, own, cloud_name, r):
                answer = generation.answer_pruned(cloud_lm, pre, positions,
                                                  max_new_tokens=max_new_tokens)
                yield dict(cloud_base, **cell, prediction=answer.text,
                           **_scores(answer.text, sample.answers))


def alignment_rows(models: Sequence[tuple[str, LoadedModel]], sample: tasks.Sample, *,
                   retentions: Sequence[float]) -> Iterator[dict]:
    """The mapped cells of one sample (``sample_rows``' measures) without decoding."""
    prefills, own = _prefill_and_select(models, sample, retentions)
    for cloud_name, _ in models:
        cloud_base = _cloud_base(sample, cloud_name, prefills[cloud_name])
        for r in retentions:
            for cell, _ in _mapped_cells(models, sample, prefills, own, cloud_name, r):
                yield dict(cloud_base, **cell)


def measure_rows(models: Sequence[tuple[str, LoadedModel]], task: str, context_tokens: int, n: int, *,
        seed: int = 0, retentions: Sequence[float] = RETENTIONS, max_new_tokens: int = 20,
        done: Iterable[str] = (), alignment_only: bool = False, log=print) -> Iterator[dict]:
    """Rows for ``n`` samples (sized with model A's tokenizer), skipping ``done`` sample ids;
    ``alignment_only``: ``alignment_rows`` (ALIGNMENT_FIELDS) instead of ``sample_rows``."""
    done = set(done)
    (name_a, lm_a), (name_b, _) = models
    samples = tasks.generate(task, n, context_tokens=context_tokens, seed=seed,
                             count_tokens=lm_a.tokenizer)
    start = time.perf_counter()
    for index, sample in enumerate(samples):
        if sample.sample_id in done:
            continue
        rows = (alignment_rows(models, sample, retentions=retentions) if alignment_only
                else sample_rows(models, sample, retentions=retentions,
                                 max_new_tokens=max_new_tokens))
        for row in rows:
            yield dict(row, model_a=name_a, model_b=name_b, context_tokens=context_tokens,
                       sample_index=index)
        log(f"[{time.perf_counter() - start:7.1f} s] {task}@{context_tokens} sample "
            f"{index + 1}/{n}")


# --------------------------------------------------------------------------- storage

STORE = RowStore(fields=FIELDS, ints=_INTS, floats=_FLOATS, error=CrossFamilyError,
                 flush_by="sample_id")
read_rows, append_rows = STORE.read, STORE.append
ALIGNMENT_STORE = RowStore(fields=ALIGNMENT_FIELDS, ints=_ALIGNMENT_INTS,
                           floats=_ALIGNMENT_FLOATS, error=CrossFamilyError, flush_by="sample_id")


def read_alignment_rows(path: Path) -> list[dict]:
    """Alignment rows on file: an ``--alignment-only`` CSV, or a full run's mapped rows."""
    try:
        return ALIGNMENT_STORE.read(path)
    except CrossFamilyError:
        # Not the alignment layout: a full run's CSV, or read_rows' error naming its columns.
        return [{k: r[k] for k in ALIGNMENT_FIELDS} for r in read_rows(path)
                if r["selection"] == MAPPED]


def complete_samples(rows: Sequence[Mapping], model_a: str, model_b: str, task: str,
                     context_tokens: int, max_new_tokens: int | None = None) -> set[str]:
    """Sample ids on file for this run; ``max_new_tokens`` None for alignment-only rows."""
    key = (model_a, model_b, task, context_tokens)
    return {r["sample_id"] for r in rows
            if (r["model_a"], r["model_b"], r["task"], r["context_tokens"]) == key
            and r.get("max_new_tokens") == max_new_tokens}


# --------------------------------------------------------------------------- summary

def _cell(rows: Sequence[Mapping], **match) -> list[Mapping]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _ci(rows: Sequence[Mapping], field: str) -> str:
    ci = metrics.bootstrap_ci([r[field] for r in rows])
    return f"{ci.mean:.3f} [{ci.low:.3f}, {ci.high:.3f}]"


def _paired(a: Sequence[Mapping], b: Sequence[Mapping], field: str) -> str:
    by_a = {r["sample_id"]: r[field] for r in a}
    by_b = {r["sample_id"]: r[field] for r in b}
    shared = sorted(set(by_a) & set(by_b))
    test = metrics.paired_test([by_a[s] for s in shared], [by_b[s] for s in shared])
    return f"{test.mean_diff:+.3f} [{test.low:+.3f}, {test.high:+.3f}], p={test.p_value:.2g}"


def summary_markdown(rows: Sequence[Mapping]) -> str:
    """Per task and length: each model alone, own vs mapped Q2C per retention (paired), and
    the mapping's coverage and alignment with its chance level."""
    lines = ["# Cross-family scout", "",
             "Per cell: mean [95% bootstrap CI], n samples. `mapped - own`: paired difference "
             "(the other model's Q2C mapped through character offsets minus the cloud model's "
             "own Q2C at the same retention; paired bootstrap CI, sign-flip permutation p).", ""]
    for (model_a, model_b, task, length), group in _groups(rows):
        n = len({r["sample_id"] for r in group})
        lines += [f"## {task}, {length} context tokens ({model_a} tokens), n = {n}", "",
                  "| cloud model | selection | retention | cloud tokens kept | contains | F1 | "
                  "mapped - own, contains | mapped - own, F1 |",
                  "|---|---|---|---|---|---|---|---|"]
        for cloud in (model_a, model_b):
            full = _cell(group, cloud_model=cloud, selection=FULL)
            lines.append(f"| {cloud} | full context | 100% | {_mean(full, 'kept_cloud_tokens')} | "
                         f"{_ci(full, 'contains')} | {_ci(full, 'f1')} | | |")
            for r in sorted({row["retention"] for row in group if row["selection"] == OWN}):
                own = _cell(group, cloud_model=cloud, selection=OWN, retention=r)
                mapped = _cell(group, cloud_model=cloud, selection=MAPPED, retention=r)
                lines.append(f"| {cloud} | own Q2C | {r:.0%} | {_mean(own, 'kept_cloud_tokens')} | "
                             f"{_ci(own, 'contains')} | {_ci(own, 'f1')} | | |")
                if mapped:
                    edge = mapped[0]["edge_model"]
                    lines.append(
                        f"| {cloud} | {edge} Q2C, mapped | {r:.0%} | "
                        f"{_mean(mapped, 'kept_cloud_tokens')} | {_ci(mapped, 'contains')} | "
                        f"{_ci(mapped, 'f1')} | {_paired(mapped, own, 'contains')} | "
                        f"{_paired(mapped, own, 'f1')} |")
        lines += ["", "Mapping and alignment (edge Q2C top-k vs the cloud model's own, in "
                  "characters):", "",
                  "| edge -> cloud | retention | coverage | precision | cloud retention | "
                  "alignment | chance |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {cells} |" for cells in _alignment_cells(group, (model_a, model_b))]
        lines.append("")
    return "\n".join(lines) + "\n"


def _groups(rows: Sequence[Mapping]) -> list[tuple[tuple, list[Mapping]]]:
    """Rows per (model A, model B, task, context tokens), in that order."""
    groups: dict[tuple, list[Mapping]] = {}
    for row in rows:
        groups.setdefault((row["model_a"], row["model_b"], row["task"], row["context_tokens"]),
                          []).append(row)
    return sorted(groups.items())


def _alignment_cells(group: Sequence[Mapping], clouds: Sequence[str]) -> Iterator[str]:
    """Per direction and retention: edge -> cloud, retention, coverage, precision, cloud
    retention, alignment, chance (Markdown cells, mean [95% bootstrap CI])."""
    for cloud in clouds:
        for r in sorted({row["retention"] for row in group if row["selection"] == MAPPED}):
            mapped = _cell(group, cloud_model=cloud, selection=MAPPED, retention=r)
            if not mapped:
                continue
            retained = [dict(x=m["kept_cloud_tokens"] / m["num_cloud_context"]) for m in mapped]
            yield (f"{mapped[0]['edge_model']} -> {cloud} | {r:.0%} | "
                   f"{_ci(mapped, 'coverage')} | {_ci(mapped, 'precision')} | "
                   f"{_ci(retained, 'x')} | {_ci(mapped, 'alignment')} | "
                   f"{_ci(mapped, 'chance_alignment')}")


def alignment_summary_markdown(rows: Sequence[Mapping]) -> str:
    """One table over tasks and lengths: the mapping's coverage and the attention alignment
    with its chance level (rows of ``--alignment-only`` runs or full runs' mapped rows)."""
    lines = ["# Cross-family attention alignment", "",
             "Alignment: of the characters the cloud model's own Q2C top-k keeps, the share the "
             "edge model's Q2C top-k also keeps; chance: the share an edge selection of as many "
             "characters drawn at random would keep (about the retention). Coverage: share of "
             "the edge's kept characters that land on kept cloud tokens; precision: share of "
             "the kept cloud tokens' characters the edge kept. Mean [95% bootstrap CI] over "
             "n samples; context tokens counted with model A's tokenizer.", "",
             "| task | context tokens | n | edge -> cloud | retention | coverage | precision | "
             "cloud retention | alignment | chance |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (model_a, model_b, task, length), group in _groups(rows):
        n = len({r["sample_id"] for r in group})
        lines += [f"| {task} | {length} | {n} | {cells} |"
                  for cells in _alignment_cells(group, (model_a, model_b))]
    return "\n".join(lines) + "\n"


def _mean(rows: Sequence[Mapping], field: str) -> str:
    return f"{sum(r[field] for r in rows) / len(rows):.0f}"


# --------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--a", default="embedded", help="model A (load_model source); "
                        "its tokenizer sizes the contexts")
    parser.add_argument("--b", default="embedded:gemma3-270m", help="model B")
    parser.add_argument("--task", default="single_needle", choices=sorted(tasks.TASKS),
                        help="the synthetic task the samples come from")
    parser.add_argument("--context-tokens", type=int, default=256,
                        help="approximate context length of each sample")
    parser.add_argument("--n", type=int, default=200, help="samples per cell")
    parser.add_argument("--seed", type=int, default=0, help="the task generator's seed")
    parser.add_argument("--max-new-tokens", type=int, default=20,
                        help="longest answer decoded")
    parser.add_argument("--results", type=Path, required=True,
                        help="CSV to append to and resume from")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="more results CSVs to include in the summary")
    parser.add_argument("--summary", type=Path, help="Markdown summary (default: beside the CSV)")
    parser.add_argument("--no-run", action="store_true", help="summarize the rows on file")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--alignment-only", action="store_true",
                        help="prefill and select only: the mapping's coverage and the attention "
                        "alignment, no answers decoded (a CSV of its own layout; --merge may "
                        "name full runs' CSVs, whose mapped rows join the summary)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ray_scout.core.llm.models import load_model

    torch.set_num_threads(args.threads)
    if args.a == args.b:
        raise CrossFamilyError("--a and --b name the same model; cross-family needs two")
    only = args.alignment_only
    store = ALIGNMENT_STORE if only else STORE
    if not args.no_run:
        # The store's own reader: a CSV of the other layout is refused, not appended to.
        done = complete_samples(store.read(args.results), args.a, args.b, args.task,
                                args.context_tokens, None if only else args.max_new_tokens)
        models = [(args.a, load_model(args.a)), (args.b, load_model(args.b))]
        added = store.append(args.results, measure_rows(
            models, args.task, args.context_tokens, args.n, seed=args.seed,
            max_new_tokens=args.max_new_tokens, done=done, alignment_only=only))
        print(f"{added} new rows -> {args.results}")
    read = read_alignment_rows if only else read_rows
    rows = [r for path in [args.results, *args.merge] for r in read(path)
            if r["sample_index"] < args.n]
    summary = args.summary or args.results.with_suffix(".md")
    summary.write_text((alignment_summary_markdown if only else summary_markdown)(rows))
    sys.stdout.write(summary.read_text())
    return 0
