"""Figures of the link layer (issue 3): goodput vs rate, rate-change timing, 35/15 sharing,
and build/teardown of a 1 cloud + 32 edge topology. Needs root.

    nice python3 bench/links_figures.py [goodput|ratechange|share|topology|all] [--out results.json]

Prints a markdown table per figure and writes all numbers as JSON. Traffic is a bulk TCP
flow (cubic, pinned per socket) from edge e0 to the cloud, measured at the receiver.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_scout import provenance  # noqa: E402
from ray_scout.net.cleanup import find_leftovers  # noqa: E402
from ray_scout.net.profiles import MAX_RATE_BPS, load_profile  # noqa: E402
from ray_scout.net.topology import LabTopology  # noqa: E402
from ray_scout.net.traffic import BulkFlow  # noqa: E402

IDEAL = 1448 / 1514  # TCP payload per Ethernet frame with timestamps, MTU 1500
LAB = load_profile("lab")
FAST = LAB.with_rate(1_000_000_000)  # a link that never limits


def _cpu_busy() -> tuple[float, float]:
    fields = [float(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


# The goodput figure measures the access link, so the bottleneck behind it must be faster than
# any rate tested: HTB's ceiling. (At 1 Gbit/s, FAST, a 3 Gbit/s access link measured the
# bottleneck instead: 0.33 of the rate, whatever the CPU.)
GOODPUT_BOTTLENECK = LAB.with_rate(MAX_RATE_BPS)


def goodput(rates_mbit=(5, 10, 25, 50, 100, 200), warmup_s=1.0, window_s=4.0) -> list[dict]:
    rows = []
    neck_bps = GOODPUT_BOTTLENECK.up.rate_bps
    for mbit in rates_mbit:
        rate = mbit * 1_000_000
        if rate >= neck_bps:
            raise ValueError(f"goodput at {mbit} Mbit/s: the bottleneck ({neck_bps / 1e6:.0f} "
                             "Mbit/s) would limit it; test rates below it")
        with LabTopology([LAB.with_rate(rate)], GOODPUT_BOTTLENECK,
                         run_id=f"g{os.getpid() % 4096:03x}") as topo:
            with BulkFlow(topo, "e0") as flow:
                t0 = time.monotonic()
                time.sleep(warmup_s)
                busy0, total0 = _cpu_busy()
                time.sleep(window_s)
                busy1, total1 = _cpu_busy()
            measured = flow.goodput_bps(t0 + warmup_s, t0 + warmup_s + window_s)
        rows.append({"rate_mbit": mbit, "bottleneck_mbit": neck_bps / 1e6,
                     "goodput_mbit": measured / 1e6, "ratio": measured / rate,
                     "ratio_to_ideal": measured / rate / IDEAL, "host_cpu_busy": (busy1 - busy0) / (total1 - total0)})
    return rows


def _effective_after(samples, t_call, target_bps, rising, window_s=0.05, step_s=0.005, horizon_s=1.0) -> float:
    """Seconds after the call until the receive rate over a 50 ms window is within 10% of target."""
    t = t_call
    while t < t_call + horizon_s:
        got = sum(n for ts, n in samples if t <= ts < t + window_s) * 8 / window_s
        if (got >= 0.9 * target_bps) if rising else (got <= 1.1 * target_bps):
            return t - t_call
        t += step_s
    return float("inf")


def ratechange(low_mbit=10, high_mbit=50, repeats=5) -> dict:
    calls, up_s, down_s = [], [], []
    with LabTopology([LAB.with_rate(low_mbit * 1_000_000)], FAST, run_id=f"r{os.getpid() % 4096:03x}") as topo:
        link = topo.uplinks["e0"]
        with BulkFlow(topo, "e0") as flow:
            time.sleep(1.0)
            for _ in range(repeats):
                t_call = time.monotonic()
                link.set_rate(high_mbit * 1_000_000)
                calls.append(time.monotonic() - t_call)
                time.sleep(1.0)
                t_down = time.monotonic()
                link.set_rate(low_mbit * 1_000_000)
                calls.append(time.monotonic() - t_down)
                time.sleep(1.0)
                up_s.append(_effective_after(flow.samples, t_call, high_mbit * 1e6 * IDEAL, rising=True))
                down_s.append(_effective_after(flow.samples, t_down, low_mbit * 1e6 * IDEAL, rising=False))
        # The allocator's call: one agent's guaranteed share on the bottleneck (one class).
        share_calls = []
        for i in range(40):
            start = time.monotonic()
            topo.set_share("e0", (20 + i % 2 * 10) * 1_000_000)
            share_calls.append(time.monotonic() - start)
    return {"low_mbit": low_mbit, "high_mbit": high_mbit, "changes": len(calls),
            "share_call_ms_median": statistics.median(share_calls) * 1e3, "share_call_ms_max": max(share_calls) * 1e3,
            "call_ms_median": statistics.median(calls) * 1e3, "call_ms_max": max(calls) * 1e3,
            "effective_up_ms_max": max(up_s) * 1e3, "effective_down_ms_max": max(down_s) * 1e3,
            "effective_up_ms": [x * 1e3 for x in up_s], "effective_down_ms": [x * 1e3 for x in down_s]}


def share(capacity_mbit=50, shares_mbit=(35, 15), warmup_s=2.0, window_s=8.0) -> dict:
    bottleneck = LAB.with_rate(capacity_mbit * 1_000_000)
    shares = [m * 1_000_000 for m in shares_mbit]
    with LabTopology([FAST, FAST], bottleneck, shares_bps=shares, run_id=f"s{os.getpid() % 4096:03x}") as topo:
        with BulkFlow(topo, "e0", port=5201) as a, BulkFlow(topo, "e1", port=5202) as b:
            t0 = time.monotonic()
            time.sleep(warmup_s + window_s)
        got = [f.goodput_bps(t0 + warmup_s, t0 + warmup_s + window_s) for f in (a, b)]
    total = sum(got)
    return {"capacity_mbit": capacity_mbit, "shares_mbit": list(shares_mbit),
            "goodput_mbit": [g / 1e6 for g in got], "fraction": [g / total for g in got],
            "utilisation_of_ideal": total / (capacity_mbit * 1e6 * IDEAL)}


def topology(edges=32, repeats=5) -> dict:
    builds, teardowns, leftovers = [], [], []
    for i in range(repeats):
        run = f"t{os.getpid() % 256:02x}{i}"
        topo = LabTopology([LAB] * edges, LAB, run_id=run)
        topo.build()
        builds.append(topo.build_s)
        topo.teardown()
        teardowns.append(topo.teardown_s)
        left = find_leftovers(f"rs-{run}-")
        leftovers.append(len(left.namespaces) + len(left.links) + len(left.qdiscs))
    return {"edges": edges, "namespaces": edges + 2, "build_s_median": statistics.median(builds),
            "build_s_max": max(builds), "teardown_s_median": statistics.median(teardowns),
            "teardown_s_max": max(teardowns), "leftover_objects": sum(leftovers)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", nargs="?", default="all", choices=["goodput", "ratechange", "share", "topology", "all"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rates-mbit", type=int, nargs="+", default=None,
                        help="goodput only: the rates to test (default 5 10 25 50 100 200)")
    args = parser.parse_args()
    chosen = ["goodput", "ratechange", "share", "topology"] if args.figure == "all" else [args.figure]
    results = {name: (goodput(tuple(args.rates_mbit)) if name == "goodput" and args.rates_mbit else globals()[name]())
               for name in chosen}
    results["provenance"] = provenance.record()
    results["provenance"]["command"] = "python3 bench/links_figures.py " + " ".join(sys.argv[1:])
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
