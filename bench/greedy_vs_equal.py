"""How often Paper B's greedy loses to the equal split on small random instances: why
``quality_max`` also scores the proportional plans (docs/POLICY.md, Allocation).

Instances as in ``tests/test_allocation.py``: 1-8 agents, each with 1-5 of the cloud modes,
payloads of 0-3 MB, quality 0-1.2 per mode, weight 0.1-3, a 1.5 s deadline with 0.5 s of
fixed latency, and a bottleneck of 0.5-60 Mbit/s; seeded. Pure computation (no timing), so
the load of the machine does not matter.

    python3 bench/greedy_vs_equal.py [--instances 10000] [--seed 0] [--out bench/results/greedy_vs_equal.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_scout import provenance  # noqa: E402
from ray_scout.core.control.allocation import Demand, allocate  # noqa: E402
from ray_scout.core.modes import CLOUD_MODES  # noqa: E402


def instance(rng: np.random.Generator) -> tuple[list[Demand], float]:
    demands = []
    for i in range(int(rng.integers(1, 9))):
        modes = rng.choice(len(CLOUD_MODES), size=int(rng.integers(1, 6)), replace=False)
        chosen = [CLOUD_MODES[m] for m in modes]
        demands.append(Demand(f"a{i}", {m: int(rng.integers(0, 3_000_001)) for m in chosen},
                              {m: float(rng.uniform(0, 1.2)) for m in chosen}, 1.5,
                              {m: 0.5 for m in chosen}, weight=float(rng.uniform(0.1, 3))))
    return demands, float(rng.uniform(0.5e6, 60e6))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10_000, help="random instances")
    parser.add_argument("--seed", type=int, default=0, help="seed of the instances")
    parser.add_argument("--out", type=Path, help="write the counts as JSON here")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    worse = worse_by = 0
    losses = []
    for _ in range(args.instances):
        demands, capacity_bps = instance(rng)
        greedy = allocate("greedy", demands, capacity_bps).objective
        equal = allocate("equal", demands, capacity_bps).objective
        if greedy < equal - 1e-9:
            worse += 1
            losses.append((equal - greedy) / equal)
        worse_by += greedy > equal + 1e-9
    result = {"instances": args.instances, "seed": args.seed,
              "greedy_below_equal": worse, "greedy_below_equal_share": worse / args.instances,
              "greedy_above_equal": int(worse_by),
              "median_relative_loss_when_below": float(np.median(losses)) if losses else 0.0,
              **provenance.record(),
              "command": "python3 bench/greedy_vs_equal.py " + " ".join(sys.argv[1:])}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
