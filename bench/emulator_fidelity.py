"""How faithfully the TUN emulator delays and drops real packets, and what TCP makes of it.

Builds a three-namespace line (a ↔ router ↔ b), attaches ``TunImpairment`` to the router
for a→b, and measures from probe processes in a and b:
- UDP round-trip time against the configured one-way delay (the b→a path is unimpaired),
- the standard deviation of jittered delay,
- UDP loss over tens of thousands of datagrams,
- bulk TCP goodput at 50 Mbit/s (HTB on the router's egress toward b) + 20 ms + 1% loss for
  cubic and bbr, against the Mathis et al. loss-limited bound MSS/RTT * sqrt(3/2)/sqrt(p),
- CPU of the pump thread and of this process (read from /proc/self/stat) per Mbit/s, and
  the most one pump carries on this host (bulk TCP with no rate limit).

Run as root:  nice python3 bench/emulator_fidelity.py --out bench/results/emulator_fidelity.json
Prints one markdown table per part; bounded in time (about 5 minutes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics

from ray_scout import provenance
from ray_scout.net.emulator import TunImpairment
from ray_scout.net.emulator_line import EmulatorLine
from ray_scout.net.emulator_probe import tcp_transfer, udp_round_trips

MSS_BYTES = 1448
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The host is shared and the bench runs under nice: the pump thread and the UDP probes (the
# measuring instrument) run SCHED_FIFO so that what is measured is the emulator, not the
# scheduler. Set by --no-realtime to None to see what a loaded host does without it.
RT_PRIORITY: int | None = 10


def process_cpu_s() -> float:
    """utime + stime of this process, from /proc/self/stat."""
    with open("/proc/self/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_pct_per_mbit_s(cpu_s: float, size_bytes: int) -> float:
    """Percent of one core per Mbit/s carried: CPU seconds per megabit, times 100."""
    return 100 * cpu_s / (size_bytes * 8 / 1e6)


def udp_run(line: EmulatorLine, count: int, interval_s: float, size_bytes: int, wait_s: float) -> dict:
    return udp_round_trips(
        line.ns_a, line.ns_b, line.addresses.b, 7001, count=count, interval_s=interval_s,
        size_bytes=size_bytes, wait_s=wait_s, realtime_priority=RT_PRIORITY,
    )


def rtt_rows(line: EmulatorLine, count: int) -> list[dict]:
    rows = []
    base_ms = None
    for delay_ms in (0, 10, 20, 50, 100):
        with TunImpairment(line.ns_router, line.router_a, realtime_priority=RT_PRIORITY, delay_s=delay_ms / 1e3, seed=1):
            r = udp_run(line, count, 0.01, 64, 0.5)
        rtts = [x * 1e3 for x in r["rtts_s"]]
        mean_ms = statistics.fmean(rtts)
        if delay_ms == 0:
            base_ms = mean_ms
        rows.append({
            "delay_ms": delay_ms, "probes": r["received"], "rtt_mean_ms": mean_ms,
            "rtt_median_ms": statistics.median(rtts), "rtt_p99_ms": sorted(rtts)[int(0.99 * len(rtts))],
            "added_mean_ms": mean_ms - base_ms, "error_ms": mean_ms - base_ms - delay_ms,
        })
    return rows


def jitter_rows(line: EmulatorLine, count: int) -> list[dict]:
    rows = []
    cases = (
        (50, 5, "normal", True, 0.005),
        # Order kept: fine when packets are further apart than the jitter, shrinks it when not.
        (20, 2, "normal", False, 0.02),
        (50, 5, "normal", False, 0.005),
        (100, 10, "normal", True, 0.005),
        (50, 5, "paretonormal", True, 0.005),
    )
    base = udp_run(line, count, 0.005, 64, 0.5)
    base_std_ms = statistics.pstdev(base["rtts_s"]) * 1e3
    for delay_ms, jitter_ms, dist, reorder, interval_s in cases:
        with TunImpairment(
            line.ns_router, line.router_a, realtime_priority=RT_PRIORITY, delay_s=delay_ms / 1e3, jitter_s=jitter_ms / 1e3,
            jitter_distribution=dist, reorder=reorder, seed=2,
        ):
            r = udp_run(line, count, interval_s, 64, 0.5)
        rtts = [x * 1e3 for x in r["rtts_s"]]
        std_ms = statistics.pstdev(rtts)
        q1, _, q3 = statistics.quantiles(rtts, n=4)
        rows.append({
            "delay_ms": delay_ms, "jitter_ms": jitter_ms, "distribution": dist, "reorder": reorder,
            "interval_ms": interval_s * 1e3, "probes": r["received"],
            "rtt_mean_ms": statistics.fmean(rtts), "rtt_std_ms": std_ms,
            "std_error_pct": 100 * (std_ms - jitter_ms) / jitter_ms,
            # Normal-equivalent spread from the quartiles: what a few scheduler outliers leave alone.
            "iqr_std_ms": (q3 - q1) / 1.349, "base_std_ms": base_std_ms,
        })
    return rows


def loss_rows(line: EmulatorLine, count: int) -> list[dict]:
    rows = []
    for loss in (0.01, 0.03, 0.05):
        cpu0 = process_cpu_s()
        with TunImpairment(line.ns_router, line.router_a, realtime_priority=RT_PRIORITY, delay_s=0.01, loss=loss, seed=3) as imp:
            r = udp_run(line, count, 0.0002, 1000, 1.0)
            stats = imp.stats
        measured = 1 - r["received"] / r["sent"]
        mbit_s = stats.bytes_in * 8 / (count * 0.0002) / 1e6
        rows.append({
            "loss_pct": 100 * loss, "sent": r["sent"], "received": r["received"],
            "measured_loss_pct": 100 * measured, "error_pct_abs": 100 * (measured - loss),
            "emulator_dropped": stats.packets_dropped, "offered_mbit_s": mbit_s,
            "pump_cpu_pct_per_mbit_s": cpu_pct_per_mbit_s(stats.cpu_s, stats.bytes_in),
            "process_cpu_pct_per_mbit_s": cpu_pct_per_mbit_s(process_cpu_s() - cpu0, stats.bytes_in),
        })
    return rows


def mathis_bps(rtt_s: float, loss: float) -> float:
    return MSS_BYTES * 8 / rtt_s * math.sqrt(1.5) / math.sqrt(loss)


def tcp_rows(line: EmulatorLine, duration_s: float, base_rtt_s: float, repeats: int) -> list[dict]:
    rows = []
    port = 7100
    for loss, runs in ((0.0, 1), (0.01, repeats)):
        for run, congestion in itertools.product(range(runs), ("cubic", "bbr")):
            port += 1
            cpu0 = process_cpu_s()
            with TunImpairment(line.ns_router, line.router_a, realtime_priority=RT_PRIORITY,
                               delay_s=0.02, loss=loss, seed=4 + run) as imp:
                sent, got = tcp_transfer(line.ns_a, line.ns_b, line.addresses.b, port,
                                         duration_s=duration_s, congestion=congestion)
                stats = imp.stats
            goodput = got["bytes"] * 8 / (got["last_s"] - got["first_s"])
            row = {
                "congestion": sent["congestion"], "run": run, "rate_mbit": 50, "delay_ms": 20, "loss_pct": 100 * loss,
                "goodput_mbit_s": goodput / 1e6, "goodput_over_rate": goodput / 50e6,
                "emulator_dropped": stats.packets_dropped, "packets_in": stats.packets_in,
                "pump_cpu_pct_per_mbit_s": cpu_pct_per_mbit_s(stats.cpu_s, stats.bytes_in),
                "process_cpu_pct_per_mbit_s": cpu_pct_per_mbit_s(process_cpu_s() - cpu0, stats.bytes_in),
            }
            if loss:
                bound = mathis_bps(0.02 + base_rtt_s, loss)
                row["mathis_mbit_s"] = bound / 1e6
                row["goodput_over_mathis"] = goodput / bound
            rows.append(row)
    return rows


def tcp_summary(rows: list[dict]) -> list[dict]:
    """Mean and spread of goodput over the repeated runs of each (congestion, loss)."""
    out = []
    keys = sorted({(r["congestion"], r["loss_pct"]) for r in rows})
    for congestion, loss_pct in keys:
        runs = [r for r in rows if (r["congestion"], r["loss_pct"]) == (congestion, loss_pct)]
        goodputs = [r["goodput_mbit_s"] for r in runs]
        row = {
            "congestion": congestion, "loss_pct": loss_pct, "runs": len(runs),
            "goodput_mean_mbit_s": statistics.fmean(goodputs),
            "goodput_std_mbit_s": statistics.pstdev(goodputs),
            "goodput_over_rate": statistics.fmean(goodputs) / 50,
        }
        if "mathis_mbit_s" in runs[0]:
            row["mathis_mbit_s"] = runs[0]["mathis_mbit_s"]
            row["goodput_over_mathis"] = row["goodput_mean_mbit_s"] / runs[0]["mathis_mbit_s"]
        out.append(row)
    return out


def ceiling_row(line: EmulatorLine, duration_s: float) -> dict:
    """Bulk TCP with no HTB: how fast the Python pump can carry packets on this host."""
    cpu0 = process_cpu_s()
    with TunImpairment(line.ns_router, line.router_a, realtime_priority=RT_PRIORITY, delay_s=0.005) as imp:
        sent, got = tcp_transfer(line.ns_a, line.ns_b, line.addresses.b, 7099,
                                 duration_s=duration_s, congestion="cubic")
        stats = imp.stats
    goodput = got["bytes"] * 8 / (got["last_s"] - got["first_s"])
    return {
        "congestion": sent["congestion"], "delay_ms": 5, "goodput_mbit_s": goodput / 1e6,
        "packets_in": stats.packets_in, "packets_overflow": stats.packets_overflow,
        "pump_cpu_pct_per_mbit_s": cpu_pct_per_mbit_s(stats.cpu_s, stats.bytes_in),
        "process_cpu_pct_per_mbit_s": cpu_pct_per_mbit_s(process_cpu_s() - cpu0, stats.bytes_in),
    }


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    for row in rows[1:]:
        keys += [k for k in row if k not in keys]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | None, results: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt-probes", type=int, default=300)
    parser.add_argument("--jitter-probes", type=int, default=1000)
    parser.add_argument("--loss-packets", type=int, default=30000)
    parser.add_argument("--tcp-duration-s", type=float, default=15.0)
    parser.add_argument("--tcp-repeats", type=int, default=3, help="runs of each lossy TCP case")
    parser.add_argument("--out", help="write all rows as JSON here")
    parser.add_argument("--no-realtime", action="store_true", help="leave every thread SCHED_OTHER")
    args = parser.parse_args()
    global RT_PRIORITY
    if args.no_realtime:
        RT_PRIORITY = None
    # At the start: the date and load before the runs.
    results = {**provenance.record(), "realtime_priority": RT_PRIORITY}
    with EmulatorLine() as line:
        results["rtt"] = rtt_rows(line, args.rtt_probes)
        print("## RTT vs configured one-way delay\n" + table(results["rtt"]) + "\n", flush=True)
        results["jitter"] = jitter_rows(line, args.jitter_probes)
        print("## Jitter\n" + table(results["jitter"]) + "\n", flush=True)
        results["loss"] = loss_rows(line, args.loss_packets)
        print("## UDP loss\n" + table(results["loss"]) + "\n", flush=True)
        results["ceiling"] = [ceiling_row(line, args.tcp_duration_s / 2)]
        print("## Ceiling: bulk TCP with no rate limit\n" + table(results["ceiling"]) + "\n", flush=True)
        line.limit_rate(50_000_000)
        base_rtt_s = results["rtt"][0]["rtt_mean_ms"] / 1e3
        results["tcp"] = tcp_rows(line, args.tcp_duration_s, base_rtt_s, args.tcp_repeats)
        print("## Bulk TCP, 50 Mbit/s HTB + 20 ms\n" + table(results["tcp"]) + "\n", flush=True)
        results["tcp_summary"] = tcp_summary(results["tcp"])
        print("## Bulk TCP summary\n" + table(results["tcp_summary"]) + "\n", flush=True)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
