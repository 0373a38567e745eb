"""One link, two mechanisms: netem (in the netem lab's real kernel) beside the TUN emulator (on
the host), configured vs measured. Needs root.

    # netem, inside the lab (a kernel with sch_netem under QEMU TCG):
    python3 -m ray_scout.cli net lab-kernel --writable bench/results -- \\
        python3 bench/netem_lab.py --mechanism netem --out bench/results/netem_lab_netem.json
    # the TUN emulator, on this host:
    python3 bench/netem_lab.py --mechanism tun-emulator --out bench/results/netem_lab_tun.json
    # the side-by-side table (docs/LINKS.md):
    python3 bench/netem_lab.py --table bench/results/netem_lab_netem.json bench/results/netem_lab_tun.json

The link: two namespaces and one veth (offloads off), HTB on the edge's egress with the
mechanism under its class, the impairment on that one direction. Per profile:
- RTT: 300 one-byte TCP exchanges (Python, Nagle off); the delay added is each exchange's
  round trip less the median round trip of the same path without the impairment. And the
  one-way delay of 300 datagrams from the kernel's stamps (``udp_one_way_delays_s``: no
  receiving process's wake-up in it), less the path's own.
- jitter: the standard deviation of the one-way delay with normal jitter (sigma as configured).
- loss: numbered UDP datagrams, the fraction that never arrived (>= 20k).
- goodput: one bulk TCP flow (cubic) at the link rate with the delay on, against the layer-2
  ideal rate x 1448/1514, after a warm-up.
Beside them, the timer error where they ran (``labkernel.timer_error``: how late a 1 ms and a
20 ms sleep wake up) and the machine, load and date. A figure that misses its goal (RTT within
0.5 ms + 2%, loss within +-0.3% absolute, goodput within 2% of the ideal) is named in the
record's ``misses``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyroute2 import IPRoute, netns  # noqa: E402

from ray_scout import provenance  # noqa: E402
from ray_scout.net.backends import TunEmulatorBackend  # noqa: E402
from ray_scout.net.labkernel import in_lab, timer_error  # noqa: E402
from ray_scout.net.namespaces import add_veth, address_up, create_netns, in_netns, offloads_off  # noqa: E402
from ray_scout.net.profiles import Impairment  # noqa: E402
from ray_scout.net.shaping import HtbShaper, NetemBackend  # noqa: E402
from ray_scout.net.traffic import BulkFlow, tcp_round_trips_s, udp_one_way_delays_s, udp_received  # noqa: E402

EDGE_IP, CLOUD_IP = "10.81.0.1", "10.81.0.2"
RATE_BPS, DELAY_S, JITTER_S, LOSS = 20_000_000, 0.020, 0.005, 0.01
IDEAL = 1448 / 1514


class Pair:
    """Edge and cloud namespaces joined by one veth (the ``Nodes`` of ray_scout.net.traffic)."""

    def __init__(self):
        self.netns = {"edge": f"rs-bn{os.getpid():x}-e", "cloud": f"rs-bn{os.getpid():x}-c"}
        self.ip = {"edge": EDGE_IP, "cloud": CLOUD_IP}
        iprs = {node: create_netns(ns) for node, ns in self.netns.items()}
        self.ifname = f"rs-bn{os.getpid():x}"
        add_veth(iprs["edge"], self.ifname, 2, self.netns["cloud"], self.ifname + "c", 2)
        for node in ("edge", "cloud"):
            address_up(iprs[node], 2, self.ip[node])
            iprs[node].close()
        with in_netns(self.netns["edge"]):
            offloads_off([self.ifname])
        with in_netns(self.netns["cloud"]):
            offloads_off([self.ifname + "c"])

    def socket(self, node: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
        with in_netns(self.netns[node]):
            return socket.socket(socket.AF_INET, kind)

    def address(self, node: str) -> str:
        return self.ip[node]

    def remove(self) -> None:
        for ns in self.netns.values():
            netns.remove(ns)


def _backend(mechanism: str):
    return NetemBackend() if mechanism == "netem" else TunEmulatorBackend(realtime_priority=10, seed=1)


class Link:
    """HTB on the edge's egress at RATE_BPS, the mechanism under its class."""

    def __init__(self, pair: Pair, mechanism: str):
        self.pair, self.mechanism = pair, mechanism
        with in_netns(pair.netns["edge"]):
            self.ipr = IPRoute()
        self.shaper = HtbShaper(self.ipr, pair.ifname, RATE_BPS, int(RATE_BPS * 0.1 / 8), netns=pair.netns["edge"])
        self.leaf = self.shaper.install()
        self.backend, self.port = None, None

    def impair(self, impairment: Impairment) -> None:
        self.clear()
        self.backend = _backend(self.mechanism)
        self.port = self.shaper.impair(self.leaf, impairment, self.backend, local=EDGE_IP, peer=CLOUD_IP)

    def clear(self) -> None:
        if self.port is not None:
            self.shaper.unimpair(self.leaf, self.port, self.backend)
            self.port = None

    def close(self) -> None:
        self.clear()
        self.shaper.remove()
        self.ipr.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _udp_loss(pair: Pair, count: int, port: int = 5500) -> float:
    # ~8 datagrams per ms (about 4 Mbit/s): under the link rate and within what the TUN
    # emulator's Python pump forwards, so what is missing is the loss model's (at 64 per ms the
    # pump overflowed: 28% lost).
    return 1 - len(set(udp_received(pair, "edge", port=port, count=count, gap_s=0.001, burst=8))) / count


def measure(mechanism: str, rtt_count: int, loss_count: int, window_s: float) -> dict:
    pair = Pair()
    link = Link(pair, mechanism)
    try:
        base = statistics.median(tcp_round_trips_s(pair, "edge", "cloud", port=5400, count=rtt_count)[10:])
        base_one_way = statistics.median(udp_one_way_delays_s(pair, "edge", "cloud", port=5410, count=100))
        link.impair(Impairment(DELAY_S))
        added = [rtt - base for rtt in tcp_round_trips_s(pair, "edge", "cloud", port=5401, count=rtt_count)[10:]]
        one_way = [d - base_one_way for d in udp_one_way_delays_s(pair, "edge", "cloud", port=5411, count=rtt_count)]
        link.impair(Impairment(DELAY_S, JITTER_S, "normal"))
        jittered = [d - base_one_way
                    for d in udp_one_way_delays_s(pair, "edge", "cloud", port=5412, count=2 * rtt_count)]
        link.impair(Impairment(loss=LOSS))
        loss = _udp_loss(pair, loss_count)
        link.impair(Impairment(DELAY_S))
        with BulkFlow(pair, "edge", port=5403) as flow:
            time.sleep(2.0)
            start = time.monotonic()
            time.sleep(window_s)
            goodput_bps = flow.goodput_bps(start, time.monotonic())
    finally:
        link.close()
        pair.remove()
    record = {
        "mechanism": mechanism, "base_rtt_ms": base * 1e3,
        "delay_configured_ms": DELAY_S * 1e3, "delay_median_ms": statistics.median(added) * 1e3,
        "delay_p99_ms": _percentile(added, 0.99) * 1e3, "rtt_samples": len(added),
        "one_way_base_ms": base_one_way * 1e3, "one_way_median_ms": statistics.median(one_way) * 1e3,
        "one_way_p99_ms": _percentile(one_way, 0.99) * 1e3, "one_way_samples": len(one_way),
        "jitter_configured_ms": JITTER_S * 1e3, "jitter_std_ms": statistics.stdev(jittered) * 1e3,
        "jitter_fixed_delay_std_ms": statistics.stdev(one_way) * 1e3, "jitter_samples": len(jittered),
        "loss_configured": LOSS, "loss_measured": loss, "loss_packets": loss_count,
        "rate_mbit": RATE_BPS / 1e6, "goodput_mbit": goodput_bps / 1e6,
        "goodput_over_ideal": goodput_bps / (RATE_BPS * IDEAL), "goodput_window_s": window_s,
    }
    misses = []
    goal_ms = 0.5 + 0.02 * record["delay_configured_ms"]
    if abs(record["delay_median_ms"] - record["delay_configured_ms"]) > goal_ms:
        misses.append("TCP RTT median beyond 0.5 ms + 2%")
    if abs(record["one_way_median_ms"] - record["delay_configured_ms"]) > goal_ms:
        misses.append("one-way delay median beyond 0.5 ms + 2%")
    if abs(loss - LOSS) > 0.003:
        misses.append("loss beyond +-0.3% absolute")
    if abs(record["goodput_over_ideal"] - 1) > 0.02:
        misses.append("goodput beyond 2% of the layer-2 ideal")
    record["misses"] = misses
    return record


def table(paths: list[str]) -> str:
    rows = ["| mechanism (where) | timer overshoot 1 ms / 20 ms sleep, median (p99) | TCP RTT added, median / p99 "
            "(configured 20 ms) | one-way added, median / p99 | jitter std (configured 5 ms) | loss (configured 1%) "
            "| goodput / ideal (20 Mbit/s + 20 ms) | misses |", "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        data = json.loads(Path(path).read_text())
        r, t1, t20 = data["result"], data["timer_1ms"], data["timer_20ms"]
        # Files from before provenance.record() kept the kernel and in_lab in a "machine" dict.
        host = data["machine"] if isinstance(data["machine"], dict) else data
        kernel = host.get("kernel") or data["machine"].split(", kernel ")[1].split(",")[0]
        where = f"{kernel}, {'lab guest' if host['in_lab'] else 'host'}"
        rows.append(
            f"| {r['mechanism']} ({where}) | {t1['median_s'] * 1e3:.2f} ({t1['p99_s'] * 1e3:.1f}) / "
            f"{t20['median_s'] * 1e3:.2f} ({t20['p99_s'] * 1e3:.1f}) ms | {r['delay_median_ms']:.2f} / "
            f"{r['delay_p99_ms']:.2f} ms | {r['one_way_median_ms']:.2f} / {r['one_way_p99_ms']:.2f} ms | "
            f"{r['jitter_std_ms']:.2f} ms | {100 * r['loss_measured']:.2f}% of "
            f"{r['loss_packets']} | {r['goodput_over_ideal']:.3f} | {'; '.join(r['misses']) or 'none'} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mechanism", choices=("netem", "tun-emulator"))
    parser.add_argument("--out")
    parser.add_argument("--rtt-count", type=int, default=300)
    parser.add_argument("--loss-count", type=int, default=20_000)
    parser.add_argument("--window-s", type=float, default=6.0)
    parser.add_argument("--table", nargs="+", metavar="JSON")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return 0
    # At the start: record()'s load average is the one before the runs.
    data = {**provenance.record(), "in_lab": in_lab(), "command": " ".join(sys.argv),
            "timer_1ms": timer_error(0.001, 300).as_row(), "timer_20ms": timer_error(0.020, 50).as_row(),
            "result": measure(args.mechanism, args.rtt_count, args.loss_count, args.window_s),
            "loadavg_after": Path("/proc/loadavg").read_text().split()[:3]}
    text = json.dumps(data, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
