"""The lab topology on a kernel without netem: 2 edges whose access links carry 20 Mbit/s (HTB)
+ 20 ms one-way delay + 1% loss per direction (TUN emulator, picked by the probe). Needs root.

    nice python3 bench/links_emulated.py [--runs 3] [--window-s 10] [--out results.json]

Per run and congestion control: the TCP round trip (median of 50 one-byte exchanges on one
connection) and the goodput of one bulk flow e0 -> cloud at the receiver, after a 2 s warm-up,
beside the Mathis bound MSS/RTT * sqrt(3/2) / sqrt(p); also the emulator's own drop fraction,
build/teardown time and the leftovers after teardown (must be none).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_scout import provenance  # noqa: E402
from ray_scout.net.cleanup import find_leftovers  # noqa: E402
from ray_scout.net.profiles import load_profile, profile_from_dict  # noqa: E402
from ray_scout.net.topology import LabTopology, pid_run_id  # noqa: E402
from ray_scout.net.traffic import BulkFlow, tcp_round_trips_s  # noqa: E402

RATE_BPS, DELAY_S, LOSS, MSS_BYTES = 20_000_000, 0.020, 0.01, 1448


def one_run(cc: str, window_s: float, warmup_s: float = 2.0) -> dict:
    access = profile_from_dict({"name": "bench", "rate": "20mbit", "delay": "20ms", "loss": "1%",
                                "congestion_control": cc})
    run = pid_run_id()
    with LabTopology([access] * 2, load_profile("lab").with_rate(1_000_000_000), run_id=run) as topo:
        mechanisms = sorted({"+".join(r.mechanisms) for r in topo.shaping()})
        rtts_s = tcp_round_trips_s(topo, "e0", count=50)
        with BulkFlow(topo, "e0") as flow:
            t0 = time.monotonic()
            time.sleep(warmup_s + window_s)
        goodput_bps = flow.goodput_bps(t0 + warmup_s, t0 + warmup_s + window_s)
        stats = topo.impairment.emulators()[(topo.edge("e0").netns, f"rs-{run}-e0")].stats
        build_s = topo.build_s
    rtt_s = statistics.median(rtts_s)
    return {"cc": cc, "mechanisms": mechanisms, "rtt_median_ms": rtt_s * 1e3, "rtt_min_ms": min(rtts_s) * 1e3,
            "goodput_mbit": goodput_bps / 1e6,
            "mathis_mbit": MSS_BYTES * 8 / rtt_s * math.sqrt(1.5) / math.sqrt(LOSS) / 1e6,
            "uplink_dropped": stats.packets_dropped / stats.packets_in, "uplink_packets": stats.packets_in,
            "build_s": build_s, "teardown_s": topo.teardown_s, "leftovers_empty": find_leftovers(f"rs-{run}-").empty}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    where = provenance.record()  # at the start: the load before the runs
    rows = [one_run(cc, args.window_s) for cc in ("cubic", "bbr") for _ in range(args.runs)]
    print("| cc | mechanisms | RTT median ms | RTT min ms | goodput Mbit/s | Mathis Mbit/s | uplink drop |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cc']} | {' '.join(r['mechanisms'])} | {r['rtt_median_ms']:.2f} | {r['rtt_min_ms']:.2f} | "
              f"{r['goodput_mbit']:.2f} | {r['mathis_mbit']:.2f} | {r['uplink_dropped']:.3%} |")
    if args.out:
        args.out.write_text(json.dumps({**where, "command": "python3 " + " ".join(sys.argv),
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
