"""The edge and cloud pipeline end to end on one GPU: every mode's bytes, encode and cloud time.

    PYTHONPATH=. python3 bench/gpu_pipeline.py [--preset qwen2.5-3b] [--repeats 3]

Runs core.stages.full exactly as the actors do (EdgeStage.encode -> bytes -> CloudStage.answer)
with a random-weight model at a preset's shape on CUDA; it checks that the GPU paths
(Triton codecs, SDPA prefill, Q2C, cache rebuild, scout re-prefill) work together and times
them. Random weights make the answers meaningless; the timings and sizes are exact.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from ray_scout.core.llm.models import load_model
from ray_scout.core.modes import CLOUD_MODES
from ray_scout.core.stages.full import CloudStage, EdgeOptions, EdgeStage

CONTEXT = "The harbour of Velmora was rebuilt in 1911. The code word for the vault is amberline. "


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen2.5-3b")
    parser.add_argument("--repeat-context", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lm = load_model(f"random:{args.preset}", device="cuda")
    edge = EdgeStage(lm, EdgeOptions(protected_layers=(0,), max_new_tokens=args.max_new_tokens))
    cloud = CloudStage({lm.model_id: lm}, max_new_tokens=args.max_new_tokens)
    context = CONTEXT * args.repeat_context
    cloud.documents.put(context)
    analysis, analyze_s = timed(lambda: edge.analyze(context, "What is the code word?"))
    analysis, analyze_s = timed(lambda: edge.analyze(context, "What is the code word?"))
    sizes = edge.payload_sizes(analysis)
    print(f"{torch.cuda.get_device_name()}; {lm.model_id}; {analysis.layout.num_tokens} prompt "
          f"tokens; edge analyze (prefill + Q2C) {analyze_s * 1e3:.1f} ms")
    print(f"{'mode':11} {'bytes':>10} {'encode ms':>10} {'cloud ms':>9} {'payload->KV ms':>15}")
    for mode in CLOUD_MODES:
        edge.encode(analysis, mode)  # warm-up
        cloud.answer(edge.encode(analysis, mode).data)
        runs = []
        for _ in range(args.repeats):
            request, encode_s = timed(lambda: edge.encode(analysis, mode))
            answer, cloud_s = timed(lambda: cloud.answer(request.data))
            runs.append((encode_s, cloud_s, answer.decode_payload_s))
        encode_s, cloud_s, payload_s = (statistics.median(r[i] for r in runs) for i in range(3))
        assert len(request.data) == sizes[mode]
        print(f"{mode.value:11} {sizes[mode]:10d} {encode_s * 1e3:10.1f} {cloud_s * 1e3:9.1f} "
              f"{payload_s * 1e3:15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
