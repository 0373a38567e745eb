"""Why does a codec mode change an answer? The first answer token's margin, per layer.

For the samples where a quantized mode's answer differs from BF16's in a quality-harness CSV,
recompute the first answer token's logits from the full-context KV (exact, and after the
codec), and with only one layer's KV quantized at a time. A flip at a near tie (the top two
tokens of the exact cache a few hundredths of a logit apart) says the codec's noise decided
a coin toss; a large margin overturned by one layer says that layer is a bottleneck.

    nice python3 bench/quality_flips.py --results experiments/results/quality/embedded-embedded.csv \
        --mode int8 [--limit 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from ray_scout.core.evaluation import tasks
from ray_scout.core.llm import generation
from ray_scout.core.llm.kv import KVSnapshot
from ray_scout.core.llm.kvcodec import codec_for
from ray_scout.core.llm.models import load_model
from ray_scout.core.modes import Mode
from ray_scout.core.stages.full import EdgeStage


@torch.inference_mode()
def _first_logits(lm, snapshot: KVSnapshot, tail: list[int]) -> torch.Tensor:
    out = lm.model(input_ids=torch.tensor([tail]),
                   position_ids=torch.tensor([[snapshot.next_position]]),
                   attention_mask=torch.ones(1, snapshot.num_tokens + 1, dtype=torch.long),
                   cache=snapshot.to_cache(), use_cache=True)
    return out.logits[0, -1].float()


def flipped_samples(results: Path, mode: str) -> pd.DataFrame:
    rows = pd.read_csv(results)
    full = rows[rows.method == "full"].pivot_table(
        index=["task", "context_tokens", "sample_index"], columns="mode", values="prediction",
        aggfunc="first")
    return full[full["bf16"] != full[mode]].reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--mode", default="int8", choices=["int8", "int4"])
    parser.add_argument("--limit", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    lm = load_model("embedded")
    codec = codec_for(Mode(args.mode), group_size=32)
    flips = flipped_samples(args.results, args.mode)
    print(f"{len(flips)} samples where {args.mode} answers differently from bf16")
    for _, flip in flips.head(args.limit).iterrows():
        sample = tasks.generate(flip.task, int(flip.sample_index) + 1,
                                context_tokens=int(flip.context_tokens), seed=0,
                                count_tokens=lm.tokenizer)[-1]
        analysis = EdgeStage(lm).analyze(sample.context, sample.question)
        exact = generation.pruned_snapshot(analysis.prefill, analysis.kv_positions)
        tail = analysis.layout.input_ids[-1:].tolist()
        reference = _first_logits(lm, exact, tail)
        first, second = reference.topk(2).indices.tolist()
        quantized = codec.decode(codec.encode(exact), dtype=exact.dtype, device=lm.device)
        coded = _first_logits(lm, quantized, tail)
        per_layer = []
        for layer in range(exact.num_layers):
            keys, values = list(exact.keys), list(exact.values)
            keys[layer], values[layer] = quantized.keys[layer], quantized.values[layer]
            logits = _first_logits(lm, KVSnapshot(tuple(keys), tuple(values), exact.positions), tail)
            per_layer.append(float(logits[first] - logits[second]))
        word = lm.tokenizer.decode
        print(f"{flip.task}@{flip.context_tokens} #{flip.sample_index}: bf16 {flip['bf16']!r} | "
              f"{args.mode} {flip[args.mode]!r}")
        print(f"  first token: exact margin {word([first])!r} - {word([second])!r} = "
              f"{float(reference[first] - reference[second]):+.3f} logits; after "
              f"{args.mode}: {float(coded[first] - coded[second]):+.3f}")
        worst = sorted(range(len(per_layer)), key=lambda layer: per_layer[layer])[:3]
        print("  only one layer quantized, lowest margins: " +
              ", ".join(f"layer {layer} {per_layer[layer]:+.3f}" for layer in worst))


if __name__ == "__main__":
    main()
