"""Why SnapKV beats Q2C on the embedded model: which rows vote, and whether pooling helps.

    python3 bench/snapkv_vs_q2c.py --model embedded --task single_needle --context-tokens 500 \
        --n 200 --out bench/results/snapkv_vs_q2c-embedded.csv

SnapKV and Q2C differ in two ways: the rows whose last-layer attention votes (Q2C: the
question's tokens; SnapKV: the prompt's last 32 tokens, i.e. the end of the question plus
the template after it) and pooling (SnapKV smooths the votes along positions with a
kernel of 5, so whole phrases are kept; Q2C keeps single tokens). Per sample (the same
samples as `scout quality`'s grids: seed 0, sized with the model's tokenizer) one prefill
scores six variants that separate the two:

    q2c            question rows, no pooling          (Paper A)
    q2c_pool       question rows, avg pooling k=5
    tail           rows after the question (template, assistant header), no pooling
    window         last 32 rows, no pooling
    snapkv         last 32 rows, avg pooling k=5      (SnapKV)
    window_q2c     last 32 rows + question rows, no pooling

and records, at 25/50/75% retention, the share of the evidence sentence's tokens kept and
whether every token of the answer span is kept. Appends to the CSV (resumable by sample)
and prints a Markdown table of means with bootstrap CIs and paired differences to q2c. Each
run that adds samples appends its provenance (``ray_scout.provenance.record()``, the command,
the samples added) to ``<out>.provenance.jsonl`` beside the CSV, whose columns stay as they were.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

from ray_scout import provenance
from ray_scout.core.evaluation import metrics, tasks
from ray_scout.core.llm import generation, selection
from ray_scout.core.llm.models import load_model
from ray_scout.core.llm.prompt import build_prompt
from ray_scout.core.llm.scout import positions_in_spans

RETENTIONS = (0.25, 0.5, 0.75)
WINDOW, KERNEL = 32, 5
FIELDS = ("model", "task", "context_tokens", "sample_index", "sample_id", "variant",
          "retention", "needle_kept", "answer_kept")


def variants(pre) -> dict[str, torch.Tensor]:
    layout = pre.layout
    question = torch.arange(layout.question_span.start, layout.question_span.stop)
    tail = torch.arange(layout.question_span.stop, layout.num_tokens)
    window = torch.arange(max(0, layout.num_tokens - WINDOW), layout.num_tokens)
    return {
        "q2c": selection.q2c(pre),
        "q2c_pool": selection.q2c(pre, kernel=KERNEL),
        "tail": selection.votes(pre, tail),
        "window": selection.snapkv(pre, window=WINDOW, kernel=1),
        "snapkv": selection.snapkv(pre, window=WINDOW, kernel=KERNEL),
        "window_q2c": selection.votes(pre, torch.unique(torch.cat([question, window]))),
    }


def sample_rows(lm, sample: tasks.Sample) -> list[dict]:
    layout = build_prompt(lm.tokenizer, sample.context, sample.question)
    pre = generation.prefill(lm, layout)
    needle = set(positions_in_spans(layout.context_offsets, sample.meta["needle_spans"]).tolist())
    answer = set(positions_in_spans(layout.context_offsets, [sample.meta["answer_span"]]).tolist())
    rows = []
    for name, scores in variants(pre).items():
        for r in RETENTIONS:
            kept = set(selection.select_positions(scores, r).tolist())
            rows.append({"variant": name, "retention": r,
                         "needle_kept": len(needle & kept) / len(needle),
                         "answer_kept": float(answer <= kept)})
    return rows


def summary(rows: list[dict]) -> str:
    lines = ["| variant | retention | needle tokens kept | answer span kept | "
             "answer kept, minus q2c (paired) | n |", "|---|---|---|---|---|---|"]
    by = {}
    for row in rows:
        by.setdefault((row["variant"], row["retention"]), {})[row["sample_id"]] = row
    for (variant, r), cell in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        needle = metrics.bootstrap_ci([x["needle_kept"] for x in cell.values()])
        answer = metrics.bootstrap_ci([x["answer_kept"] for x in cell.values()])
        base = by[("q2c", r)]
        shared = sorted(set(cell) & set(base))
        diff = ""
        if variant != "q2c":
            t = metrics.paired_test([cell[s]["answer_kept"] for s in shared],
                                    [base[s]["answer_kept"] for s in shared])
            diff = f"{t.mean_diff:+.3f} [{t.low:+.3f}, {t.high:+.3f}], p={t.p_value:.2g}"
        lines.append(f"| {variant} | {r:.0%} | {needle.mean:.3f} [{needle.low:.3f}, "
                     f"{needle.high:.3f}] | {answer.mean:.3f} [{answer.low:.3f}, "
                     f"{answer.high:.3f}] | {diff} | {len(cell)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--task", default="single_needle")
    parser.add_argument("--context-tokens", type=int, default=500)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-run", action="store_true", help="summarize the CSV only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stored = []
    if args.out.exists():
        with args.out.open(newline="") as handle:
            stored = [dict(r, retention=float(r["retention"]), needle_kept=float(r["needle_kept"]),
                           answer_kept=float(r["answer_kept"])) for r in csv.DictReader(handle)]
    key = (args.model, args.task, str(args.context_tokens))
    mine = [r for r in stored if (r["model"], r["task"], r["context_tokens"]) == key]
    if not args.no_run:
        done = {r["sample_id"] for r in mine}
        lm = load_model(args.model)
        samples = tasks.generate(args.task, args.n, context_tokens=args.context_tokens, seed=0,
                                 count_tokens=lm.tokenizer)
        new = not args.out.exists()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        added = 0
        where = provenance.record()  # at the start: the load before the run
        with args.out.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            for index, sample in enumerate(samples):
                if sample.sample_id in done:
                    continue
                rows = [dict(r, model=args.model, task=args.task,
                             context_tokens=args.context_tokens, sample_index=index,
                             sample_id=sample.sample_id) for r in sample_rows(lm, sample)]
                writer.writerows(rows)
                handle.flush()
                mine += rows
                added += 1
                print(f"[{time.perf_counter() - start:7.1f} s] sample {index + 1}/{args.n}",
                      flush=True)
        if added:
            with args.out.with_suffix(".provenance.jsonl").open("a") as handle:
                handle.write(json.dumps({**where, "command": "python3 " + " ".join(sys.argv),
                                         "samples_added": added}) + "\n")
    print(f"{args.model}, {args.task}, {args.context_tokens} tokens:\n")
    print(summary(mine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
