"""Cloud micro-batching on this machine: throughput and latency of scout requests per batch size.

    PYTHONPATH=. nice python3 bench/cloud_batching.py --source embedded --context-tokens 256 \
        --requests 4 --batch-sizes 1 2 4

Builds scout payloads (the cloud holds the documents) from synthetic single-needle samples,
answers them in chunks of each batch size through ``CloudStage.answer`` (size 1) or
``CloudStage.answer_batch``, and reports per batch size: requests per second, the per-request
latency (a member's latency is its batch's wall time), the speed-up over size 1, and how many
answers equal the unbatched ones. It also measures a latency profile of the same model and
prints what ``ProfiledCloud.batch_service_s``'s model predicts for each batch, next to the
measurement. Writes bench/results/cloud_batching.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from ray_scout import provenance
from ray_scout.core.evaluation import tasks
from ray_scout.core.llm import latency, models
from ray_scout.core.modes import Mode
from ray_scout.core.stages.full import CloudStage, EdgeOptions, EdgeStage
from ray_scout.core.llm.scout import DocumentStore

OUT = Path(__file__).resolve().parent / "results" / "cloud_batching.json"


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="embedded")
    parser.add_argument("--context-tokens", type=int, default=256)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--scout-retention", type=float, default=0.5)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    command = "PYTHONPATH=. nice python3 bench/cloud_batching.py " + shlex.join(sys.argv[1:])
    torch.manual_seed(0)
    load_before = os.getloadavg()
    lm = models.load_model(args.source)
    samples = tasks.generate("single_needle", args.requests, context_tokens=args.context_tokens,
                             seed=0, count_tokens=lm.tokenizer)
    edge = EdgeStage(lm, EdgeOptions(scout_retention=args.scout_retention))
    store = DocumentStore()
    payloads, prompt_tokens, kept_tokens = [], [], []
    for sample in samples:
        store.put(sample.context)
        analysis = edge.analyze(sample.context, sample.question)
        payloads.append(edge.encode(analysis, Mode.SCOUT, cloud_has_document=True).data)
        prompt_tokens.append(analysis.layout.num_tokens)
        kept_tokens.append(analysis.layout.num_tokens - analysis.layout.num_context
                           + int(analysis.scout_positions.numel()))
    cloud = CloudStage({lm.model_id: lm}, documents=store, max_new_tokens=args.max_new_tokens)
    cloud.answer(payloads[0])  # warm-up
    rows, reference = [], []
    for size in args.batch_sizes:
        throughputs, latencies, texts = [], [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            texts = []
            for chunk in _chunks(payloads, size):
                began = time.perf_counter()
                answers = [cloud.answer(chunk[0])] if size == 1 else cloud.answer_batch(chunk)
                latencies += [time.perf_counter() - began] * len(chunk)
                for answer in answers:
                    if isinstance(answer, Exception):
                        raise answer
                    texts.append(answer.text)
            throughputs.append(len(payloads) / (time.perf_counter() - start))
        reference = reference or texts  # the first batch size (1) is the unbatched reference
        print(f"batch {size}: {statistics.median(throughputs):.3f} req/s", flush=True)
        rows.append({"batch_size": size, "requests_per_s": statistics.median(throughputs),
                     "latency_median_s": statistics.median(latencies),
                     "latency_max_s": max(latencies),
                     "equal_to_unbatched": sum(a == b for a, b in zip(texts, reference))})
    # Forward passes each request really decodes: its answer's tokens plus the tail step.
    steps = [len(lm.tokenizer.encode(text, add_special_tokens=False)) + 1 for text in reference]
    base = rows[0]["requests_per_s"]
    for row in rows:
        row["speedup"] = row["requests_per_s"] / base

    # The profiled-fidelity batch model, fed a profile of this model measured now.
    profile = latency.measure(lm, sorted({args.context_tokens, 2 * args.context_tokens,
                                          4 * args.context_tokens}),
                              repeats=1, command=command)
    for row in rows:
        predicted = []
        for chunk in _chunks(list(range(len(payloads))), row["batch_size"]):
            predicted.append(profile.prefill_s(sum(prompt_tokens[i] for i in chunk))
                             + max(profile.decode_s(kept_tokens[i], steps[i]) for i in chunk))
        row["modelled_batch_s_median"] = statistics.median(predicted)
    result = {
        **provenance.record(), "command": command, "model": lm.model_id, "threads": torch.get_num_threads(),
        "prompt_tokens_median": statistics.median(prompt_tokens),
        # provenance.record()'s load average is the one at the end.
        "loadavg_before": load_before,
        "decode_steps": steps,
        "profile_prefill_points": profile.prefill_points,
        "profile_decode_points": profile.decode_points,
        "rows": rows,
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{lm.model_id}, prompts ~{result['prompt_tokens_median']} tokens, "
          f"load {load_before[0]:.1f} -> {result['load_average_1_5_15'][0]:.1f}")
    print(f"{'batch':>5} {'req/s':>7} {'speed-up':>8} {'lat med s':>9} {'lat max s':>9} "
          f"{'equal':>5} {'model s':>8}")
    for row in rows:
        print(f"{row['batch_size']:>5} {row['requests_per_s']:>7.3f} {row['speedup']:>8.2f} "
              f"{row['latency_median_s']:>9.3f} {row['latency_max_s']:>9.3f} "
              f"{row['equal_to_unbatched']:>5} {row['modelled_batch_s_median']:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
