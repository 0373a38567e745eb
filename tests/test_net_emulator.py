"""The TUN emulator: samplers and loss models alone, then real packets through namespaces."""

from __future__ import annotations

import os
import random
import statistics

import pytest

from ray_scout.net.emulator import (
    GilbertElliott,
    TunImpairmentParams,
    TunImpairment,
    _LossDecider,
    unit_jitter_sampler,
)
from ray_scout.net.emulator_bpf import BpfLoss, loss_threshold, random_drop_program
from ray_scout.net.emulator_line import EmulatorLine
from ray_scout.net.errors import NetError
from ray_scout.net.namespaces import in_netns, netlink, write_sysctl
from ray_scout.net.emulator_probe import tcp_transfer, udp_round_trips

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root (CAP_NET_ADMIN) and /dev/net/tun to build namespaces and TUN devices",
)


@pytest.mark.parametrize("distribution", ["normal", "uniform", "paretonormal"])
def test_jitter_samplers_have_zero_mean_and_unit_std(distribution):
    sample = unit_jitter_sampler(distribution, random.Random(7))
    values = [sample() for _ in range(100_000)]
    assert abs(statistics.fmean(values)) < 0.02
    assert statistics.pstdev(values) == pytest.approx(1.0, abs=0.03)


def test_pareto_jitter_has_a_heavy_right_tail():
    sample = unit_jitter_sampler("pareto", random.Random(7))
    values = sorted(sample() for _ in range(100_000))
    assert abs(statistics.fmean(values)) < 0.03
    assert values[-100] > 3 * -values[100]  # far more room above the mean than below


def test_bernoulli_loss_matches_probability():
    decider = _LossDecider(0.03, random.Random(1))
    drops = sum(decider.drop() for _ in range(200_000))
    assert drops / 200_000 == pytest.approx(0.03, abs=0.002)


def test_gilbert_elliott_loss_matches_stationary_rate_and_comes_in_bursts():
    model = GilbertElliott(p_good_to_bad=0.01, p_bad_to_good=0.25, loss_good=0.0, loss_bad=0.8)
    decider = _LossDecider(model, random.Random(3))
    drops = [decider.drop() for _ in range(400_000)]
    assert sum(drops) / len(drops) == pytest.approx(model.mean_loss, rel=0.06)
    pairs = sum(a and b for a, b in zip(drops, drops[1:]))
    # Independent losses at the same rate would make back-to-back drops rare (rate squared).
    assert pairs / sum(drops) > 5 * model.mean_loss


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(delay_s=-0.001), "delay_s"),
        (dict(delay_s=0.01, jitter_s=11.0), "jitter_s"),
        (dict(delay_s=0.01, loss=1.5), "probability"),
        (dict(delay_s=0.01, jitter_distribution="gamma"), "known: uniform"),
        (dict(delay_s=0.01, limit_packets=0), "limit_packets"),
    ],
)
def test_impairment_rejects_out_of_range_values_with_the_fix(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TunImpairmentParams(**kwargs)


def test_gilbert_elliott_rejects_non_probabilities():
    with pytest.raises(ValueError, match="p_bad_to_good"):
        GilbertElliott(p_good_to_bad=0.1, p_bad_to_good=2.0)


def test_change_replaces_only_the_given_parameters_and_validates():
    imp = TunImpairment("rs-never-started", "rs-x", delay_s=0.02, jitter_s=0.002, loss=0.01)
    new = imp.change(loss=0.05)
    assert (new.delay_s, new.jitter_s, new.loss) == (0.02, 0.002, 0.05)
    with pytest.raises(ValueError, match="delay_s"):
        imp.change(delay_s=-1.0)
    assert imp.params.delay_s == 0.02
    assert imp.mechanism == "tun-emulator"


@pytest.fixture(scope="module")
def line():
    with EmulatorLine() as built:
        yield built


def _rtts_ms(line, port, count=60, interval_s=0.01, **kwargs):
    result = udp_round_trips(
        line.ns_a, line.ns_b, line.addresses.b, port, count=count, interval_s=interval_s, **kwargs
    )
    return result, [x * 1e3 for x in result["rtts_s"]]


@pytest.mark.root
@needs_netns
def test_round_trip_gains_the_configured_delay_and_no_packet_leaves_early(line):
    _, base = _rtts_ms(line, 7201)
    with TunImpairment(line.ns_router, line.router_a, delay_s=0.03, seed=1) as imp:
        result, rtts = _rtts_ms(line, 7202)
        stats = imp.stats
    assert result["received"] == result["sent"] == 60
    assert min(rtts) >= 30.0
    assert statistics.median(rtts) - statistics.median(base) == pytest.approx(30.0, abs=1.0)
    assert stats.packets_in == stats.packets_out == 60
    assert stats.packets_dropped == 0 and stats.packets_queued == 0


@pytest.mark.root
@needs_netns
def test_both_directions_add_up_when_each_has_its_own_emulator(line):
    with TunImpairment(line.ns_router, line.router_a, delay_s=0.01), TunImpairment(
        line.ns_router, line.router_b, delay_s=0.025
    ):
        _, rtts = _rtts_ms(line, 7203, count=40)
    assert min(rtts) >= 35.0
    assert statistics.median(rtts) == pytest.approx(35.0, abs=1.5)


@pytest.mark.root
@needs_netns
def test_destination_rule_on_the_router_impairs_only_traffic_to_that_prefix(line):
    with TunImpairment(line.ns_router, None, dst=f"{line.addresses.b}/32", delay_s=0.02) as imp:
        _, rtts = _rtts_ms(line, 7209, count=30)
        stats = imp.stats
    # Only the a→b half is steered; echoes toward a leave untouched, so no loop and no doubling.
    assert statistics.median(rtts) == pytest.approx(20.0, abs=1.5)
    assert stats.packets_in == 30


@pytest.mark.root
@needs_netns
def test_end_host_can_impair_its_own_outgoing_traffic_when_it_forwards():
    with EmulatorLine() as own:
        with in_netns(own.ns_a):
            write_sysctl("net/ipv4/ip_forward", "1")
        with TunImpairment(own.ns_a, None, dst=f"{own.addresses.b}/32", delay_s=0.015):
            _, rtts = _rtts_ms(own, 7210, count=30)
    assert min(rtts) >= 15.0
    assert statistics.median(rtts) == pytest.approx(15.0, abs=1.5)


def test_a_selector_is_required():
    with pytest.raises(ValueError, match="ingress_iface, dst or both"):
        TunImpairment("rs-x", None, delay_s=0.01)


@pytest.mark.root
@needs_netns
def test_change_takes_effect_for_later_packets_without_restart(line):
    with TunImpairment(line.ns_router, line.router_a, delay_s=0.01) as imp:
        _, before = _rtts_ms(line, 7204, count=30)
        imp.change(delay_s=0.04)
        _, after = _rtts_ms(line, 7205, count=30)
    assert statistics.median(before) == pytest.approx(10.0, abs=1.5)
    assert statistics.median(after) == pytest.approx(40.0, abs=1.5)


@pytest.mark.root
@needs_netns
def test_udp_loss_is_exactly_what_the_emulator_dropped_and_near_the_setting(line):
    with TunImpairment(line.ns_router, line.router_a, delay_s=0.005, loss=0.05, seed=11) as imp:
        result, _ = _rtts_ms(line, 7206, count=4000, interval_s=0.0005, wait_s=0.5)
        stats = imp.stats
    assert result["sent"] - result["received"] == stats.packets_dropped
    assert stats.packets_dropped / stats.packets_in == pytest.approx(0.05, abs=0.012)


@pytest.mark.root
@needs_netns
def test_tcp_delivers_every_byte_through_delay_and_loss(line):
    with TunImpairment(line.ns_router, line.router_a, delay_s=0.01, loss=0.03, seed=5) as imp:
        sent, received = tcp_transfer(
            line.ns_a, line.ns_b, line.addresses.b, 7207, duration_s=1.5, congestion="cubic"
        )
        stats = imp.stats
    assert sent["congestion"] == "cubic"
    assert received["bytes"] == sent["bytes_sent"] > 0
    assert stats.packets_dropped > 0  # TCP had to retransmit what the emulator took


@pytest.mark.root
@needs_netns
def test_stop_removes_tun_and_rule_and_can_be_called_twice(line):
    imp = TunImpairment(line.ns_router, line.router_a, delay_s=0.01).start()
    imp.stop()
    imp.stop()
    with netlink(line.ns_router) as ipr:
        assert not ipr.link_lookup(ifname=imp.tun_name)
        assert all(rule.get("table") != imp.table and rule.get_attr("FRA_TABLE") != imp.table
                   for rule in ipr.get_rules())
    _, rtts = _rtts_ms(line, 7208, count=10)
    # Traffic flows directly again (the median, because a loaded host adds stray ms outliers).
    assert statistics.median(rtts) < 2.0


@pytest.mark.root
@needs_netns
def test_missing_interface_namespace_or_forwarding_give_errors_that_say_what_to_do(line):
    with pytest.raises(ValueError, match="not found in namespace"):
        TunImpairment(line.ns_router, "rs-nope", delay_s=0.01).start()
    with pytest.raises(NetError, match="does not exist"):
        TunImpairment("rs-no-such-ns", "rs-ra", delay_s=0.01).start()
    # Host a does not forward: the emulator refuses rather than blackholing traffic.
    imp = TunImpairment(line.ns_a, line.iface_a, delay_s=0.01)
    with pytest.raises(RuntimeError, match="ip_forward=1"):
        imp.start()
    with netlink(line.ns_a) as ipr:
        assert not ipr.link_lookup(ifname=imp.tun_name)


def test_bpf_threshold_maps_probability_onto_the_u32_range():
    assert loss_threshold(0.0) == 0
    assert loss_threshold(0.5) == 2**31
    assert loss_threshold(1.0) == 2**32 - 1
    assert len(random_drop_program(0.01)) == 6 * 8
    with pytest.raises(ValueError, match="probability"):
        loss_threshold(1.01)


@pytest.mark.root
@needs_netns
def test_bpf_loss_drops_the_set_fraction_changes_live_and_leaves_nothing(line):
    with BpfLoss(line.ns_router, line.router_b, loss=0.05) as bpf:
        first, _ = _rtts_ms(line, 7211, count=3000, interval_s=0.0005)
        dropped_first = bpf.stats.packets_dropped
        bpf.change(loss=0.25)
        second, _ = _rtts_ms(line, 7212, count=2000, interval_s=0.0005)
        assert bpf.mechanism == "bpf"
    bpf.stop()
    assert first["sent"] - first["received"] == dropped_first
    assert dropped_first / first["sent"] == pytest.approx(0.05, abs=0.012)
    assert 1 - second["received"] / second["sent"] == pytest.approx(0.25, abs=0.03)
    with netlink(line.ns_router) as ipr:
        index = ipr.link_lookup(ifname=line.router_b)[0]
        assert all(q.get_attr("TCA_KIND") != "clsact" for q in ipr.get_qdiscs(index=index))
