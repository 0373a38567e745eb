"""netem for real: every option installed and read back, and the measurable ones measured.

Marked ``netem``: on a kernel without sch_netem (this project's CI host) these run inside the
netem lab, a real 6.1 kernel under QEMU TCG (tests/netem_lab.py). TCG delays the guest's
timers (``labkernel.timer_error``): tolerances on times add the guest's measured overshoot
to the delay goal (0.5 ms + 2%). Two namespaces joined by one veth (offloads off, so netem and
HTB see 1514-byte frames), HTB on the edge's egress with netem under its class, as the lab
topology and NodeLinks shape.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import pytest
from pyroute2 import IPRoute

from ray_scout.net.backends import default_impairment_backend
from ray_scout.net.labkernel import timer_error
from ray_scout.net.namespaces import in_netns, offloads_off
from ray_scout.net.netem import DIST_SCALE, NetemParams, distribution_table, read_netem
from ray_scout.net.probe import probe
from ray_scout.net.profiles import FRAME_BYTES, GilbertElliott, Impairment
from ray_scout.net.shaping import HtbShaper, NetemBackend
from ray_scout.net.traffic import BulkFlow, udp_one_way_delays_s, udp_received
from test_net_node_links import TwoNodes

MBIT = 1_000_000
IDEAL = 1448 / 1514  # TCP payload per 1514-byte frame (timestamps on)
pytestmark = [pytest.mark.netem,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_NET_ADMIN) for namespaces and qdiscs")]


@pytest.fixture
def link():
    """Edge and cloud namespaces; yields a function that shapes the edge's egress."""
    nodes = TwoNodes()
    with in_netns(nodes.netns["edge"]):
        offloads_off([nodes.edge_ifname])
    ipr = None

    def shape(rate_bps: int, impairment: Impairment, queue_bytes: int = 100_000):
        nonlocal ipr
        with in_netns(nodes.netns["edge"]):
            ipr = IPRoute()
        shaper = HtbShaper(ipr, nodes.edge_ifname, rate_bps, queue_bytes, netns=nodes.netns["edge"])
        leaf = shaper.install()
        shaper.impair(leaf, impairment, NetemBackend())
        return nodes, shaper, leaf

    yield shape
    if ipr is not None:
        ipr.close()
    nodes.remove()


def _installed(shaper: HtbShaper):
    with in_netns(shaper.netns):
        (netem,) = read_netem(shaper.ipr, shaper.ifindex)
    return netem


def _tc_show(nodes: TwoNodes) -> str:
    return subprocess.run(["ip", "netns", "exec", nodes.netns["edge"], "tc", "qdisc", "show", "dev",
                           nodes.edge_ifname], capture_output=True, text=True, check=True).stdout


def _delay_tolerance_s(delay_s: float) -> float:
    """The goal (0.5 ms + 2%) plus how late this kernel wakes a sleeper after that long (TCG on
    a loaded host: an idle vCPU waits for the host's scheduler)."""
    return 0.0005 + 0.02 * delay_s + timer_error(delay_s, 50).median_s


def test_the_probe_reports_netem_and_the_default_backend_is_netem():
    capabilities = probe()
    assert capabilities.netem and "no sch_netem" not in capabilities.summary()
    impairment = Impairment(0.020, 0.005, "paretonormal", reorder=0.01, corrupt=0.001)
    assert isinstance(default_impairment_backend(capabilities, [impairment]), NetemBackend)


def test_every_option_is_installed_as_asked(link):
    impairment = Impairment(0.020, 0.005, "normal", loss=0.01, delay_correlation=0.25, duplicate=0.01,
                            reorder=0.02, corrupt=0.005)
    nodes, shaper, leaf = link(100 * MBIT, impairment)
    netem = _installed(shaper)
    assert (netem.delay_s, netem.jitter_s) == (0.020, 0.005)
    assert netem.loss == pytest.approx(0.01) and netem.duplicate == pytest.approx(0.01)
    assert netem.reorder == pytest.approx(0.02) and netem.corrupt == pytest.approx(0.005)
    assert netem.delay_correlation == pytest.approx(0.25)
    assert netem.limit_packets == NetemParams.for_impairment(impairment, queue_bytes=100_000,
                                                             rate_bps=100 * MBIT).limit_packets
    assert netem.parent == leaf.classid
    # iproute2 reads the same qdisc back, independently of our decoder.
    shown = _tc_show(nodes)
    for words in ("delay 20ms  5ms 25%", "loss 1%", "duplicate 1%", "reorder 2%", "corrupt 0.5%"):
        assert words in shown, shown
    # Every table distribution loads, and a burst-loss model replaces the random loss.
    for distribution in ("pareto", "paretonormal"):
        shaper.impair(leaf, Impairment(0.020, 0.004, distribution), NetemBackend())
        assert _installed(shaper).jitter_s == 0.004
    shaper.impair(leaf, Impairment(0.010, gilbert_elliott=GilbertElliott(0.01, 0.3, 0.001, 0.9)), NetemBackend())
    netem = _installed(shaper)
    assert netem.loss == 0 and netem.gilbert_elliott == pytest.approx((0.01, 0.3, 0.9, 0.001))
    assert "loss gemodel" in _tc_show(nodes)


def _sigma_from_iqr(values: list[float]) -> float:
    """A normal's sigma from the interquartile range: a starved vCPU's outliers do not move it."""
    quartiles = statistics.quantiles(values, n=4)
    return (quartiles[2] - quartiles[0]) / 1.349


def test_delay_and_normal_jitter_are_what_the_packets_get(link):
    # One-way delays from the kernel's own stamps (sender's clock, receiver's SO_TIMESTAMPNS),
    # less the path's own (measured first without netem). A timer is never early, only late
    # (TCG on a loaded host: by milliseconds, see _delay_tolerance_s): the earliest packet shows
    # netem's delay itself, the median adds the typical lateness.
    nodes, shaper, leaf = link(100 * MBIT, Impairment())
    base = min(udp_one_way_delays_s(nodes, "edge", count=40))
    shaper.impair(leaf, Impairment(0.020), NetemBackend())
    fixed = [d - base for d in udp_one_way_delays_s(nodes, "edge", count=100)]
    goal_s = 0.0005 + 0.02 * 0.020
    assert min(fixed) == pytest.approx(0.020, abs=goal_s)
    assert statistics.median(fixed) == pytest.approx(0.020, abs=_delay_tolerance_s(0.020))
    shaper.impair(leaf, Impairment(0.020, 0.005, "normal"), NetemBackend())
    jittered = [d - base for d in udp_one_way_delays_s(nodes, "edge", count=300)]
    # The spread is the jitter's; its centre is checked coarsely (half a sigma): in the lab the
    # jittered median sits 1.9-2.4 ms above 20 ms in every run so far while the fixed delay's is
    # within 0.3 ms, an offset not yet explained (docs/LINKS.md, "netem, measured in the lab").
    assert _sigma_from_iqr(jittered) == pytest.approx(0.005, rel=0.25)
    assert statistics.median(jittered) == pytest.approx(0.020, abs=0.0025)


def _table_quantile_s(distribution: str, delay_s: float, jitter_s: float, q: float) -> float:
    """Where netem's table puts quantile ``q``: delay + jitter x entry / NETEM_DIST_SCALE, an
    entry drawn uniformly (no correlation)."""
    table = sorted(distribution_table(distribution))
    return delay_s + jitter_s * table[min(len(table) - 1, int(q * len(table)))] / DIST_SCALE


def test_pareto_jitter_has_the_tables_floor_and_a_heavier_tail_than_normal(link):
    # 3000 datagrams per distribution at 20 ms +- 5 ms. TCG's late timers shift every delay
    # later, alike for the three (the same run, one after another), so the test compares them
    # with each other: Pareto's delays have a floor (netem's Pareto table is one-sided, alpha 3,
    # less its mean, times 4/3: nothing below delay - 2/3 jitter), normal's p1 is 2.3 sigma below,
    # and Pareto's tail above the median is longer. paretonormal sits between.
    nodes, shaper, leaf = link(100 * MBIT, Impairment())
    base = min(udp_one_way_delays_s(nodes, "edge", count=40))
    rows = {}
    for n, distribution in enumerate(("normal", "pareto", "paretonormal")):
        shaper.impair(leaf, Impairment(0.020, 0.005, distribution), NetemBackend())
        got = sorted(d - base for d in udp_one_way_delays_s(nodes, "edge", port=5320 + n, count=3000, gap_s=0.002))
        assert len(got) > 2900, f"{distribution}: {len(got)} of 3000 datagrams arrived"
        rows[distribution] = {q: (got[int(q * len(got))], _table_quantile_s(distribution, 0.020, 0.005, q))
                              for q in (0.01, 0.5, 0.99)}
        print(f"{distribution}: " + ", ".join(f"p{round(q * 100)} {m * 1e3:.2f} ms (table {t * 1e3:.2f})"
                                               for q, (m, t) in rows[distribution].items()))
    print(_timer_note())
    floor = {d: r[0.01][0] for d, r in rows.items()}
    tail = {d: r[0.99][0] - r[0.5][0] for d, r in rows.items()}
    # The tables put pareto's p1 8.4 ms above normal's (16.7 vs 8.3 ms) and its p99 - p50 at
    # 21.6 ms against normal's 11.6 ms.
    assert floor["pareto"] - floor["normal"] == pytest.approx(
        rows["pareto"][0.01][1] - rows["normal"][0.01][1], abs=0.0025)
    assert tail["pareto"] > tail["normal"] + 0.005
    assert floor["normal"] < floor["paretonormal"] < floor["pareto"]


def _udp(nodes: TwoNodes, count: int, gap_s: float = 0.0, port: int = 5400) -> list[int]:
    return udp_received(nodes, "edge", port=port, count=count, gap_s=gap_s)


def test_random_and_burst_loss_duplication_and_corruption_rates(link):
    count = 10_000
    nodes, shaper, leaf = link(100 * MBIT, Impairment(loss=0.05))
    # 4 standard deviations of a binomial count: fails by chance once in ~16,000 runs.
    assert 1 - len(_udp(nodes, count)) / count == pytest.approx(0.05, abs=4 * (0.05 * 0.95 / count) ** 0.5)
    burst = GilbertElliott(p_good_to_bad=0.01, p_bad_to_good=0.2)
    shaper.impair(leaf, Impairment(gilbert_elliott=burst), NetemBackend())
    got = _udp(nodes, count, port=5401)
    lost = sorted(set(range(count)) - set(got))
    runs = 1 + sum(1 for a, b in zip(lost, lost[1:]) if b != a + 1)
    # Bursts make losses correlated (lag-1 correlation 1 - p - r): the spread grows ~ (1 + rho) / (1 - rho).
    rho = 1 - burst.p_good_to_bad - burst.p_bad_to_good
    spread = (burst.mean_loss * (1 - burst.mean_loss) / count * (1 + rho) / (1 - rho)) ** 0.5
    assert len(lost) / count == pytest.approx(burst.mean_loss, abs=4 * spread)
    assert len(lost) / runs > 2.5, "Gilbert-Elliott losses come in bursts (mean 1/r = 5 packets)"
    shaper.impair(leaf, Impairment(duplicate=0.05), NetemBackend())
    extra = len(_udp(nodes, count, port=5402)) - count
    assert extra / count == pytest.approx(0.05, abs=4 * (0.05 * 0.95 / count) ** 0.5)
    # A corrupted datagram fails its UDP checksum at the receiver and is dropped there.
    shaper.impair(leaf, Impairment(corrupt=0.05), NetemBackend())
    assert 1 - len(_udp(nodes, count, port=5403)) / count == pytest.approx(0.05, abs=4 * (0.05 * 0.95 / count) ** 0.5)


def test_reordered_packets_skip_the_delay(link):
    nodes, shaper, _ = link(100 * MBIT, Impairment(0.010, reorder=0.25))
    got = _udp(nodes, 1000, gap_s=0.0005, port=5404)
    assert sorted(got) == list(range(1000))
    early = sum(1 for a, b in zip(got, got[1:]) if b < a)
    # About a quarter of the packets overtake the ones still in the 10 ms delay line.
    assert 0.15 < early / 1000 < 0.35


def _netem_queue(shaper: HtbShaper) -> dict:
    """netem's queue statistics: ``qlen`` (packets it holds now), ``drops``."""
    with in_netns(shaper.netns):
        (queue,) = [q.get_attr("TCA_STATS2").get_attr("TCA_STATS_QUEUE")
                    for q in shaper.ipr.get_qdiscs(index=shaper.ifindex) if q.get_attr("TCA_KIND") == "netem"]
    return queue


def _goodput_bps(flow: BulkFlow, warmup_s: float, window_s: float) -> float:
    time.sleep(warmup_s)
    start = time.monotonic()
    time.sleep(window_s)
    return flow.goodput_bps(start, time.monotonic())


def _timer_note() -> str:
    """The guest's own timer error, printed beside each rate figure it limits."""
    error = timer_error(0.001, 100)
    return f"1 ms sleeps overshoot {error.median_s * 1e3:.2f} ms median, {error.p99_s * 1e3:.1f} ms p99 here"


# What the guest can show of a rate. The host's HTB figures (docs/LINKS.md) are within 2% of the
# ideal; in the guest HTB releases packets on TCG's late timers, and a loaded host starves the
# guest's CPU, so goodput may fall short (bench/netem_lab.py measures by how much) but never
# exceed the rate.
TCG_GOODPUT_FLOOR = 0.5


@pytest.mark.parametrize("delay_s", [0.010, 0.100])
def test_htb_rate_holds_with_netem_delay_under_the_class(link, delay_s):
    rate_bps = 5 * MBIT
    nodes, shaper, _ = link(rate_bps, Impairment(delay_s), queue_bytes=int(rate_bps * 0.05 / 8))
    with BulkFlow(nodes, "edge", port=5205) as flow:
        goodput = _goodput_bps(flow, warmup_s=1.0 + 10 * delay_s, window_s=4.0)
    print(f"goodput / ideal at {rate_bps / MBIT:.0f} Mbit/s + {delay_s * 1e3:.0f} ms: {goodput / (rate_bps * IDEAL):.3f}; "
          f"{_timer_note()}")
    assert TCG_GOODPUT_FLOOR < goodput / (rate_bps * IDEAL) < 1.02
    assert _installed(shaper).limit_packets >= rate_bps * delay_s / 8 / FRAME_BYTES


@pytest.mark.parametrize("delay_s", [0.010, 0.100])
def test_at_1_gbit_netem_under_the_class_holds_the_delay_line_without_a_drop(link, delay_s):
    # The guest cannot send 1 Gbit/s (TCG): what this rate tests is netem's limit, sized for
    # 1 Gbit/s x delay plus the queue. Whatever the guest sends sits in the delay line for
    # delay_s; netem's default limit (1000 packets) drops once that exceeds 1000 frames.
    rate_bps = 1000 * MBIT
    nodes, shaper, _ = link(rate_bps, Impairment(delay_s), queue_bytes=int(rate_bps * 0.05 / 8))
    held = []
    with BulkFlow(nodes, "edge", port=5207) as flow:
        time.sleep(1.0 + 10 * delay_s)
        start = time.monotonic()
        while time.monotonic() - start < 3.0:  # a few reads: each is a netlink dump under TCG
            held.append(_netem_queue(shaper)["qlen"])
            time.sleep(0.5)
        goodput = flow.goodput_bps(start, time.monotonic())
    queue = _netem_queue(shaper)
    print(f"1 Gbit/s + {delay_s * 1e3:.0f} ms: goodput {goodput / MBIT:.0f} Mbit/s ({goodput / (rate_bps * IDEAL):.3f} "
          f"of the ideal), netem held up to {max(held)} packets, dropped {queue['drops']}; {_timer_note()}")
    assert _installed(shaper).limit_packets >= rate_bps * delay_s / 8 / FRAME_BYTES
    assert goodput < rate_bps * IDEAL * 1.02
    assert max(held) > 0 and queue["drops"] == 0


def test_a_live_rate_change_grows_netems_limit_and_keeps_its_packets(link):
    nodes, shaper, leaf = link(5 * MBIT, Impairment(0.100), queue_bytes=100_000)
    before = _installed(shaper).limit_packets
    with BulkFlow(nodes, "edge", port=5206) as flow:
        time.sleep(2.0)  # the delay line holds 100 ms of packets now
        assert _installed(shaper).limit_packets == before
        held = _netem_queue(shaper)
        shaper.set_rate(10 * MBIT)
        kept = _netem_queue(shaper)
        after = _installed(shaper)
        # cubic needs a few 100 ms round trips to open its window to the new BDP.
        goodput = _goodput_bps(flow, warmup_s=3.0, window_s=3.0)
    print(f"goodput / ideal after 5 -> 10 Mbit/s under 100 ms: {goodput / (10 * MBIT * IDEAL):.3f}; {_timer_note()}")
    assert after.limit_packets > before
    assert after.limit_packets >= 10 * MBIT * 0.100 / 8 / FRAME_BYTES
    assert after.delay_s == 0.100, "the change kept the impairment"
    assert goodput < 10 * MBIT * IDEAL * 1.02
    # The change re-sized netem in place: what it held is still there, nothing was dropped.
    assert held["qlen"] > 10 and kept["qlen"] > 0.5 * held["qlen"] and kept["drops"] == held["drops"]


# What `scout run` needs in the guest, each part measured (docs/LINKS.md, "scout run in the lab"):
# TCG starts every Python process Ray launches in tens of seconds.
SCOUT_RUN_TIMEOUT_S = 1200  # 624-827 s at host load 3-8 (docs/LINKS.md)


def test_scout_run_in_the_lab_picks_netem_for_a_delayed_bottleneck_and_links_csv_says_so(tmp_path):
    # A real `scout run` of the modes table (profiled, 100 Mbit/s) with its bottleneck given
    # 20 ms, end to end: Ray started in the guest, the actors, the shaped links, one request
    # stream, the tables. One policy and 10 s of arrivals keep it short. Started through
    # ray_scout.experiments.labray: Ray 2.60's fixed start-up waits (15 s for the agents' port files,
    # 30 s for the raylet) are shorter than TCG's process starts (its docstring says what it
    # changes). impairment is the spec's default, auto.
    import csv

    import yaml

    from ray_scout.experiments.spec import read_document

    neck = tmp_path / "lab-20ms.yaml"
    neck.write_text("name: lab-20ms\nrate: 100mbit\ndelay: 20ms\nqueue: 50ms\ncongestion_control: cubic\n")
    doc = read_document("experiments/modes_table.yaml")
    doc["network"]["bottleneck"] = str(neck)
    doc.update(duration_s=10, policies=["static:bf16"])
    assert "impairment" not in doc["network"]
    spec, out = tmp_path / "modes_table_20ms.yaml", tmp_path / "out"
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "ray_scout.experiments.labray", "run", str(spec), "--out", str(out),
                          "--no-progress", "--no-dashboard"], capture_output=True, text=True, check=False,
                         timeout=SCOUT_RUN_TIMEOUT_S)
    took_s = time.monotonic() - started
    log = (out / "run.log").read_text() if (out / "run.log").is_file() else ""
    print(f"scout run in the lab: exit {run.returncode} after {took_s:.0f} s; {_timer_note()}")
    assert run.returncode == 0, f"{run.stderr[-2000:]}\n--- run.log:\n{log[-4000:]}"
    with open(out / "links.csv") as table:
        links = list(csv.DictReader(table))
    delayed = [row for row in links if float(row["delay_s"]) > 0]
    assert delayed and all(row["mechanisms"] == "htb+netem" for row in delayed), links
    assert {float(row["delay_s"]) for row in delayed} == {0.020}
    assert 100 * MBIT in {int(row["rate_bps"]) for row in delayed}, "the bottleneck up at the spec's capacity"
    assert all(row["mechanisms"] == "htb" for row in links if float(row["delay_s"]) == 0)
    with open(out / "requests.csv") as table:
        requests = list(csv.DictReader(table))
    assert requests and {row["policy"] for row in requests} == {"static:bf16"}, requests
