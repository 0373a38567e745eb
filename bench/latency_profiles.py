"""Measure latency profiles (prefill and per-token decode time vs tokens) for profiled fidelity.

    python3 bench/latency_profiles.py --source embedded --lengths 128 256 512 1024 2048
    python3 bench/latency_profiles.py --source random:qwen2.5-7b --device cuda --lengths 128 512 2048 4096 8192

Writes experiments/profiles/<model>@<device>.yaml (the files the testbed reads) and prints a table.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from ray_scout.core.llm import latency, models

OUT_DIR = Path(__file__).resolve().parent.parent / "experiments" / "profiles"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", action="append", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", required=True)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    command = "python3 bench/latency_profiles.py " + shlex.join(sys.argv[1:])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{'model':28} {'device':6} {'tokens':>7} {'prefill ms':>11} {'decode ms/tok':>14}")
    for source in args.source:
        lm = models.load_model(source, device=args.device)
        profile = latency.measure(lm, args.lengths, decode_steps=args.decode_steps,
                                  repeats=args.repeats, command=command)
        name = profile.model_id.replace("random:", "").replace("/", "_")
        profile.save(args.out_dir / f"{name}@{profile.device}.yaml")
        for (n, pre), (_, dec) in zip(profile.prefill_points, profile.decode_points):
            print(f"{profile.model_id:28} {profile.device:6} {n:7d} {pre * 1e3:11.1f} "
                  f"{dec * 1e3:14.2f}")
        del lm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
