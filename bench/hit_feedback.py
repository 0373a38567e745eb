"""The closed loop on hits in the simulator: one link that delivers 70% of its grant.

Four agents with Paper B's Qwen2.5-7B payloads, stage times and 3b-7b quality profile
(0.5 requests/s each, Poisson, 1.5 s deadline) share a constant 100 Mbit/s; agent ``a0``'s link
delivers 70% of whatever it is granted, which nobody tells the allocator. Every run is
made twice on the same seed (the same arrivals, request by request): the allocator
correcting its demands from the delivered rate alone (the earlier closed loop) and from
the delivered rate and the hits (``allocation.hit_corrected_demands``). A transfer cut off at
its deadline is never measured, so an agent whose every transfer misses teaches the
delivered-rate loop nothing; its misses teach the hit loop. Policies: always INT4 (every
transfer sized by the plan) and the adaptive one (10% margin, the grant as its estimate).

    python3 bench/hit_feedback.py [--seeds 10] [--duration-s 120]
        [--out bench/results/hit_feedback]

Writes ``<out>.csv`` (one row per run: policy, allocator, seed, feedback, the slow agent's
and all agents' hits and mean quality, misses counting 0) and ``<out>.md`` (the paired
differences, with-hits minus without, over seeds: mean, 95% bootstrap interval, exact
sign-flip p). Deterministic: no timing, so no bench lock.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_scout import provenance  # noqa: E402
from ray_scout.core.control.capacity import CapacityTrace  # noqa: E402
from ray_scout.core.control.policy import (  # noqa: E402
    AdaptivePolicy, StaticPolicy, paper_b_profile,
)
from ray_scout.core.evaluation.metrics import paired_test  # noqa: E402
from ray_scout.core.modes import Mode  # noqa: E402
from ray_scout.experiments.simulate import SimConfig, paper_b_agent, simulate  # noqa: E402

CAPACITY_BPS = 100e6
SLOW_SHARE = 0.7
PAIR = "3b-7b"


def policies() -> dict:
    return {"always INT4": StaticPolicy(Mode.INT4),
            "adaptive": AdaptivePolicy(paper_b_profile(PAIR), 0.1)}


def run(policy, allocator: str, seed: int, feedback: bool, duration_s: float) -> dict:
    agents = tuple(dataclasses.replace(paper_b_agent(f"a{i}", 0.5, 1.5, pair=PAIR),
                                       link_share=SLOW_SHARE if i == 0 else 1.0)
                   for i in range(4))
    requests, _ = simulate(SimConfig(agents, CapacityTrace.constant(CAPACITY_BPS, duration_s),
                                     policy, allocator=allocator, seed=seed,
                                     closed_loop="hits" if feedback else "delivered_rate"))
    slow = requests[requests.agent == "a0"]
    return {"requests": len(requests), "slow_requests": len(slow),
            "hits": requests.deadline_met.mean(), "quality": requests.quality.mean(),
            "slow_hits": slow.deadline_met.mean(), "slow_quality": slow.quality.mean()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/hit_feedback"))
    args = parser.parse_args()
    where = provenance.record()
    rows = []
    for name, policy in policies().items():
        for allocator in ("quality_max", "optimal"):
            for seed in range(args.seeds):
                for feedback in (False, True):
                    rows.append({"policy": name, "allocator": allocator, "seed": seed,
                                 "hit_feedback": feedback,
                                 **run(policy, allocator, seed, feedback, args.duration_s)})
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    lines = [f"# Closed loop on hits: one link delivering {SLOW_SHARE:.0%} of its grant",
             "", f"`python3 bench/hit_feedback.py --seeds {args.seeds} --duration-s "
             f"{args.duration_s:g}`; {json.dumps(where)}", "",
             "With hits minus without (delivered rate only), paired by seed: mean [95% CI], "
             "p (exact sign flip); hits and quality per request, misses counting 0.", "",
             "| policy | allocator | slow agent hits without → with | slow agent: hits | "
             "slow agent: quality | all agents: hits | all agents: quality |",
             "|---|---|---|---|---|---|---|"]
    for (name, allocator), group in table.groupby(["policy", "allocator"], sort=False):
        off = group[~group.hit_feedback].sort_values("seed")
        on = group[group.hit_feedback].sort_values("seed")
        cells = []
        for column, scale, unit in (("slow_hits", 100, " pts"), ("slow_quality", 1, ""),
                                    ("hits", 100, " pts"), ("quality", 1, "")):
            d = paired_test(on[column].to_numpy() * scale, off[column].to_numpy() * scale)
            cells.append(f"{d.mean_diff:+.3g}{unit} [{d.low:+.3g}, {d.high:+.3g}], "
                         f"p = {d.p_value:.3g}")
        lines.append(f"| {name} | {allocator} | {off.slow_hits.mean():.1%} → "
                     f"{on.slow_hits.mean():.1%} | " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
