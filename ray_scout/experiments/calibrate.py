"""``scout calibrate``: measure a model pair's quality per transport mode, write a profile.

What lives here: the calibration grid (BF16, INT8, INT4, mixed INT4 of the full context;
scout at the configured retention; the edge model alone), run through the quality harness
(same CSV store, so rows already measured by ``scout quality`` are reused), and the
``QualityProfile`` YAML the policy and the testbed load. What it leaves to others: the
harness (``core.evaluation.quality``, ``experiments.quality``) and the policy that reads the
profile.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from ray_scout import provenance
from ray_scout.core.evaluation.quality import (
    Grid, calibration_cells, profile_from_rows, reference_cell,
)
from ray_scout.experiments import quality as harness


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--edge", default="embedded", help="edge model (load_model source)")
    parser.add_argument("--cloud", default="embedded", help="cloud model (load_model source)")
    parser.add_argument("--out", type=Path, required=True,
                        help="profile to write (.yaml or .json), e.g. "
                             "experiments/profiles/quality-<edge>-<cloud>.yaml")
    parser.add_argument("--task", default="single_needle",
                        help="synthetic task the samples come from (docs/TASKS.md)")
    parser.add_argument("--context-tokens", type=int, default=500,
                        help="context length of each sample, in tokens")
    parser.add_argument("--n", type=int, default=100,
                        help="samples per mode (the 95%% CIs in the profile shrink with it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task's samples")
    parser.add_argument("--scout-retention", type=float, default=0.5,
                        help="retention the scout mode is calibrated at (EdgeOptions default)")
    parser.add_argument("--scorer", default="q2c", help="scout's selection method")
    parser.add_argument("--results", type=Path,
                        help="CSV to resume from and append to (default: the harness's "
                             "<edge>-<cloud>.csv, shared with `scout quality`)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def calibration_grid(args: argparse.Namespace) -> Grid:
    cells = calibration_cells(args.scout_retention, args.scorer)
    reference = reference_cell(args.edge, args.cloud)
    ordered = tuple(dict.fromkeys([reference, *cells.values()]))
    return Grid("calibrate", args.edge, args.cloud, (args.task,), (args.context_tokens,),
                ordered, n=args.n, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    grid = calibration_grid(args)
    rows = harness.measure(grid, args.results or harness.default_results(grid))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    source = (f"scout calibrate --edge {args.edge} --cloud {args.cloud} --task {args.task} "
              f"--context-tokens {args.context_tokens} --n {args.n} --seed {args.seed} "
              f"--scout-retention {args.scout_retention}; {date}; {provenance.cpu_name()} "
              f"torch {torch.__version__}; F1 relative to the cloud model's full-precision F1")
    profile = profile_from_rows(rows, calibration_cells(args.scout_retention, args.scorer),
                                name=f"quality-{args.edge}-{args.cloud}", edge_model=args.edge,
                                cloud_model=args.cloud, source=source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(args.out)
    print(args.out.read_text())
    return 0
