"""Whether a change to the allocator keeps every plan: dump all strategies' splits, compare.

Instances: every strategy of ``allocation.STRATEGIES`` under both objectives, on the three
populations of ``bench/allocator_speed.py`` at 3, 10, 100 and 1,000 agents and 0.03-10
Mbit/s per agent (six capacities), and on 40 random small populations (2-11 agents, seeds
0-39) at 0.05, 0.5 and 5 Mbit/s per agent: 1,920 splits.

    python3 bench/same_plans.py dump OUT.pkl      # on the code before the change
    python3 bench/same_plans.py dump NEW.pkl      # on the code after it
    python3 bench/same_plans.py compare OUT.pkl NEW.pkl

``compare`` lists every split whose modes, rates (to 1e-9 relative) or objective (1e-12)
differ, and how many are worse, and exits 1 if any differs.
"""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import allocator_speed  # noqa: E402
from ray_scout.core.control import allocation  # noqa: E402


def dump(path: Path) -> None:
    per_token = allocator_speed.bf16_bytes_per_token()
    out = {}

    def split(key, demands, capacity_bps, objective):
        for strategy in allocation.STRATEGIES:
            a = allocation.allocate(strategy, demands, capacity_bps, objective)
            out[key + (strategy,)] = (dict(a.rate_bps), {k: v.value for k, v in a.mode.items()},
                                      a.objective)

    for objective in allocation.OBJECTIVES:
        for name in ("random", "cell", "identical"):
            for n in (3, 10, 100, 1000):
                demands = allocator_speed.population(name, n, per_token)
                for per_agent in (0.03, 0.1, 0.3, 1, 3, 10):
                    split((objective, name, n, per_agent), demands, n * per_agent * 1e6,
                          objective)
        for seed in range(40):
            n = int(np.random.default_rng(seed).integers(2, 12))
            demands = allocator_speed.random_demands(n, seed, per_token)
            for per_agent in (0.05, 0.5, 5):
                split((objective, "seed", seed, per_agent), demands, n * per_agent * 1e6,
                      objective)
    path.write_bytes(pickle.dumps(out))
    print(f"{len(out)} splits in {path}")


def compare(before: Path, after: Path) -> int:
    a, b = (pickle.loads(p.read_bytes()) for p in (before, after))
    if a.keys() != b.keys():
        print("the two dumps cover different splits")
        return 1
    differ = worse = 0
    for key in a:
        (ra, ma, oa), (rb, mb, ob) = a[key], b[key]
        same = (ma == mb and math.isclose(oa, ob, rel_tol=1e-12, abs_tol=1e-12)
                and all(math.isclose(ra[x], rb[x], rel_tol=1e-9, abs_tol=1e-6) for x in ra))
        if not same:
            differ += 1
            worse += ob < oa - 1e-9 * (1 + abs(oa))
            print("differs:", key, oa, ob)
    print(f"{len(a) - differ} same, {differ} different ({worse} worse)")
    return 1 if differ else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "dump":
        dump(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
