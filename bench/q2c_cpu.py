"""Q2C on the CPU: Q·K scores vs eager attention, edge-stage speed, scout payload sizes, needle.

Usage: nice python3 bench/q2c_cpu.py [--lengths 512 2048 4096] [--repeats 3] [--out FILE.md]

Four tables, printed as Markdown (and written to --out):
1. Agreement of Q2C from the hooked last-layer queries (SDPA prefill) with Q2C from eager
   attention probabilities: max abs / relative score difference, identical top-k at 25/50/75%.
2. Edge-stage time (prefill + scoring + top-k at 50%) per context length: SDPA + Q·K vs eager
   with ``output_attentions=True`` (every layer's [heads, T, T] kept, the papers' code path)
   and vs eager keeping only the last layer's probabilities (a forward hook), which is the
   cheapest eager variant and the only one that fits memory at 4K.
3. Scout payload body sizes for Q2C selections of 25/50/75% at ~170 tokens, 1K and 4K.
4. Needle sanity: share of the needle's tokens each scorer keeps at 25%.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from ray_scout import provenance
from ray_scout.core.llm import selection
from ray_scout.core.llm.generation import attention_modules, prefill
from ray_scout.core.llm.models import load_model
from ray_scout.core.llm.prompt import build_prompt
from ray_scout.core.llm.scout import BITMAP, build_payload, encode_indices

QUESTION = "What is the secret code for the vault?"
NEEDLE = "The secret code for the vault is 4729 and it was set by Admiral Okafor."
# output_attentions keeps layers x heads x T x T float32: refuse above this many bytes.
EAGER_ALL_LAYERS_LIMIT_BYTES = 6 * 1024**3


def haystack(tokenizer, target_tokens: int, seed: int = 0) -> str:
    """Varied filler sentences with the needle in the middle, about ``target_tokens`` long."""
    rng = random.Random(seed)
    subjects = ["The river", "A farmer", "The old bridge", "Our neighbour", "The council", "A small boat",
                "The library", "The night train"]
    verbs = ["crossed", "painted", "visited", "repaired", "described", "watched", "opened", "followed"]
    places = ["the green hills", "a quiet road", "the market square", "an empty field", "the harbour",
              "the northern gate", "a wooden fence", "a long corridor"]
    times = ["morning", "evening", "spring", "winter", "summer", "autumn"]
    budget = target_tokens - len(tokenizer(" " + NEEDLE, add_special_tokens=False)["input_ids"])
    sentences: list[str] = []
    # Pre-tokenization splits at spaces, so per-sentence counts add up to the whole.
    while budget > 0:
        sentence = (f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(places)} in the "
                    f"{rng.choice(times)}.")
        budget -= len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
        sentences.append(sentence)
    sentences.insert(len(sentences) // 2, NEEDLE)
    return " ".join(sentences)


def _timed(variants: dict, repeats: int) -> dict:
    """Median wall and CPU seconds of each variant, and its last result.

    Variants run round-robin after one warm-up round, so drift in the machine's load hits
    them alike. CPU time (all threads of this process) is the figure to compare on a shared
    box, where other processes stretch wall time unpredictably.
    """
    runs = {name: ([], [], None) for name in variants}
    for round_ in range(repeats + 1):
        for name, fn in variants.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            result = fn()
            wall, cpu, _ = runs[name]
            if round_:  # round 0 warms allocator and dispatch caches
                wall.append(time.perf_counter() - wall_start)
                cpu.append(time.process_time() - cpu_start)
            runs[name] = (wall, cpu, result)
    return {name: (statistics.median(w), statistics.median(c), r) for name, (w, c, r) in runs.items()}


def edge_sdpa(lm, layout):
    pre = prefill(lm, layout, capture="last")
    scores = selection.q2c(pre)
    return scores, selection.select_positions(scores, 0.5)


def edge_eager_all(lm, layout):
    scores = selection.q2c_eager_reference(lm, layout)
    return scores, selection.select_positions(scores, 0.5)


@torch.inference_mode()
def edge_eager_last(lm, layout):
    """Eager attention everywhere, keeping only the last layer's probabilities."""
    kept = {}

    def keep(module, args, out):
        kept["attn"] = out[1]

    handle = attention_modules(lm)[-1].register_forward_hook(keep)
    previous = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    try:
        lm.model(input_ids=layout.input_ids.unsqueeze(0), use_cache=True, logits_to_keep=1)
    finally:
        lm.model.set_attn_implementation(previous)
        handle.remove()
    q = slice(layout.question_span.start, layout.question_span.stop)
    c = slice(layout.context_span.start, layout.context_span.stop)
    scores = kept["attn"][0, :, q, c].float().sum(dim=(0, 1))
    return scores, selection.select_positions(scores, 0.5)


def agreement_and_speed(lm, lengths, repeats):
    rows = []
    for target in lengths:
        layout = build_prompt(lm.tokenizer, haystack(lm.tokenizer, target), QUESTION)
        t = layout.num_tokens
        all_layers_bytes = lm.facts.num_layers * lm.facts.num_attention_heads * t * t * 4
        variants = {"sdpa": lambda: edge_sdpa(lm, layout), "last": lambda: edge_eager_last(lm, layout)}
        if all_layers_bytes <= EAGER_ALL_LAYERS_LIMIT_BYTES:
            variants["all"] = lambda: edge_eager_all(lm, layout)
        timed = _timed(variants, repeats)
        sdpa_wall, sdpa_cpu, (mine, _) = timed["sdpa"]
        last_wall, last_cpu, (ref, _) = timed["last"]
        all_wall, all_cpu = None, None
        if "all" in timed:
            all_wall, all_cpu, (ref, _) = timed["all"]
        diff = (mine - ref).abs()
        same = all(torch.equal(selection.select_positions(mine, r), selection.select_positions(ref, r))
                   for r in (0.25, 0.5, 0.75))
        rows.append(dict(
            context_tokens=layout.num_context, prompt_tokens=t,
            max_abs_diff=float(diff.max()), max_rel_diff=float((diff / ref.abs().clamp_min(1e-12)).max()),
            same_topk=same, reference="output_attentions" if all_cpu is not None else "eager hook",
            sdpa_qk_cpu_s=sdpa_cpu, eager_last_cpu_s=last_cpu, eager_all_cpu_s=all_cpu,
            speedup_vs_eager_last=last_cpu / sdpa_cpu,
            speedup_vs_eager_all=all_cpu / sdpa_cpu if all_cpu is not None else None,
            sdpa_qk_wall_s=sdpa_wall, eager_last_wall_s=last_wall, eager_all_wall_s=all_wall,
            eager_all_gib=all_layers_bytes / 1024**3,
        ))
        print(rows[-1], flush=True)
    return rows


def payload_sizes(lm, lengths):
    rows = []
    for target in lengths:
        context = haystack(lm.tokenizer, target)
        layout = build_prompt(lm.tokenizer, context, QUESTION)
        pre = prefill(lm, layout, capture="last")
        scores = selection.q2c(pre)
        n = layout.num_context
        for retention in (0.25, 0.5, 0.75):
            positions = selection.select_positions(scores, retention)
            code = encode_indices(positions, n)
            bare = build_payload(context, QUESTION, layout.context_offsets, positions, include_document=False)
            full = build_payload(context, QUESTION, layout.context_offsets, positions, include_document=True)
            rows.append(dict(
                context_tokens=n, retention=retention, kept=len(positions),
                code="bitmap" if code[0] == BITMAP else "delta-varint", code_bytes=len(code),
                bitmap_bytes=1 + (n + 7) // 8, spans=len(bare.char_spans),
                body_bytes=bare.size_bytes, body_with_doc_bytes=full.size_bytes,
                document_utf8_bytes=len(context.encode("utf-8")),
            ))
            print(rows[-1], flush=True)
    return rows


def needle_shares(lm, target=500):
    context = haystack(lm.tokenizer, target)
    layout = build_prompt(lm.tokenizer, context, QUESTION)
    start = context.index(NEEDLE)
    offsets = layout.context_offsets
    needle = torch.nonzero((offsets[:, 0] >= start) & (offsets[:, 1] <= start + len(NEEDLE))).view(-1)
    rows = []
    for name in selection.SCORERS:
        pre = prefill(lm, layout, capture=selection.CAPTURE[name])
        kept = selection.select_positions(selection.score(name, pre), 0.25)
        rows.append(dict(scorer=name, context_tokens=layout.num_context, needle_tokens=len(needle),
                         needle_kept_share=float(torch.isin(needle, kept).float().mean())))
        print(rows[-1], flush=True)
    return rows


def markdown(rows) -> str:
    columns = list(rows[0])

    def cell(value):
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 2048, 4096],
                        help="contexts of the agreement and timing table (none: skip it; "
                             "the other two tables do not depend on the machine's load)")
    parser.add_argument("--payload-lengths", type=int, nargs="+", default=[170, 1024, 4096],
                        help="contexts of the scout payload size table")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", help="also write the tables to this Markdown file "
                        "(bench/results/q2c_cpu.md), with the machine, commit and load")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("embedded")
    sections = [
        ("Q2C agreement and edge-stage time (median of %d)" % args.repeats,
         agreement_and_speed(lm, args.lengths, args.repeats)),
        ("Scout payload body sizes (Q2C selections)", payload_sizes(lm, args.payload_lengths)),
        ("Needle tokens kept at 25% retention", needle_shares(lm)),
    ][0 if args.lengths else 1:]
    text = "\n\n".join(f"### {title}\n\n{markdown(rows)}" for title, rows in sections) + "\n"
    record = provenance.record()
    text = (f"Machine: {record['machine']}; commit {record['commit']}; {record['date']}; load "
            f"average {record['load_average_1_5_15']}; command: python3 bench/q2c_cpu.py "
            + " ".join(sys.argv[1:]) + "\n\n" + text)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
