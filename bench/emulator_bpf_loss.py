"""Loss alone from the eBPF ``cls_bpf`` program: UDP loss at 1/3/5% and a bulk TCP flow.

Three-namespace line (a ↔ router ↔ b); ``BpfLoss`` on the router's egress toward b. Counts
UDP datagrams echoed back (b→a is unimpaired) against those sent, and the hook's own drop
counter; then one bulk TCP flow per congestion control at 50 Mbit/s (HTB) + 1% loss, no
added delay, to show TCP recovering from in-kernel drops. TSO/GSO are off on the line (see below).

Run as root:  PYTHONPATH=. nice python3 bench/emulator_bpf_loss.py --out bench/results/emulator_bpf_loss.json
"""

from __future__ import annotations

import argparse

from emulator_fidelity import table, write_json  # bench/ is on sys.path when run as a script

from ray_scout import provenance
from ray_scout.net.emulator_bpf import BpfLoss
from ray_scout.net.emulator_line import EmulatorLine
from ray_scout.net.emulator_probe import tcp_transfer, udp_round_trips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss-packets", type=int, default=30000)
    parser.add_argument("--tcp-duration-s", type=float, default=10.0)
    parser.add_argument("--out", help="write all rows as JSON here")
    args = parser.parse_args()
    results = provenance.record()  # at the start: the date and load before the runs
    rows = []
    # Segmentation offload off: the hook runs once per skb, and TCP's skbs would otherwise be
    # 64 KB aggregates, making 1% per skb far less than 1% per segment.
    with EmulatorLine(segmentation_offload=False) as line:
        for port, loss in enumerate((0.01, 0.03, 0.05), start=7500):
            with BpfLoss(line.ns_router, line.router_b, loss=loss) as bpf:
                r = udp_round_trips(line.ns_a, line.ns_b, line.addresses.b, port,
                                    count=args.loss_packets, interval_s=0.0002, size_bytes=1000, wait_s=1.0)
                stats = bpf.stats
            measured = 1 - r["received"] / r["sent"]
            rows.append({"loss_pct": 100 * loss, "sent": r["sent"], "received": r["received"],
                         "measured_loss_pct": 100 * measured, "error_pct_abs": 100 * (measured - loss),
                         "hook_dropped": stats.packets_dropped})
        results["udp"] = rows
        line.limit_rate(50_000_000)
        tcp = []
        for port, congestion in enumerate(("cubic", "bbr"), start=7510):
            with BpfLoss(line.ns_router, line.router_b, loss=0.01) as bpf:
                sent, got = tcp_transfer(line.ns_a, line.ns_b, line.addresses.b, port,
                                         duration_s=args.tcp_duration_s, congestion=congestion)
                stats = bpf.stats
            tcp.append({"congestion": sent["congestion"], "rate_mbit": 50, "loss_pct": 1.0,
                        "goodput_mbit_s": got["bytes"] * 8 / (got["last_s"] - got["first_s"]) / 1e6,
                        "delivered_all": got["bytes"] == sent["bytes_sent"],
                        "hook_packets": stats.packets, "hook_dropped": stats.packets_dropped,
                        "hook_dropped_pct": 100 * stats.packets_dropped / stats.packets})
        results["tcp"] = tcp
    for name in ("udp", "tcp"):
        print(f"## {name}\n" + table(results[name]) + "\n")
    write_json(args.out, results)

if __name__ == "__main__":
    main()
