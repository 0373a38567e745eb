"""netem's options as the project encodes them, checked without a kernel: the distribution
tables against iproute2's own files, the limit against rate x delay, the refusals."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ray_scout.net.errors import NetError
from ray_scout.net.netem import DIST_ENTRIES, U32_MAX, NetemParams, distribution_table
from ray_scout.net.profiles import FRAME_BYTES, GilbertElliott, Impairment, profile_from_dict

IPROUTE2_TABLES = Path("/usr/lib/x86_64-linux-gnu/tc")
MBIT = 1_000_000


@pytest.mark.parametrize("name", ["normal", "pareto", "paretonormal"])
def test_tables_are_the_ones_iproute2_ships(name, missing):
    shipped = IPROUTE2_TABLES / f"{name}.dist"
    if not shipped.is_file():
        missing(f"iproute2's {shipped} is not installed here to compare with (apt-get install iproute2)")
    values = [int(v) for line in shipped.read_text().splitlines() if not line.startswith("#") for v in line.split()]
    assert distribution_table(name) == tuple(values)


def test_uniform_table_spans_minus_to_plus_sigma_evenly():
    table = distribution_table("uniform")
    assert len(table) == DIST_ENTRIES and table[0] == -8192 and table[-1] == 8192 - 4
    assert sum(table) / len(table) == pytest.approx(-2, abs=1)


def test_the_limit_covers_rate_times_delay_plus_the_queue():
    # 1 Gbit/s x 100 ms = 12.5 MB in the delay line, plus a 1 MB queue, in 1514-byte frames.
    params = NetemParams.for_impairment(Impairment(0.100), queue_bytes=1_000_000, rate_bps=1_000 * MBIT)
    assert params.limit_packets == -(-(1_000_000 + 12_500_000) // FRAME_BYTES)
    # Jitter lengthens the delay line: up to delay + 4 jitter.
    jittered = NetemParams.for_impairment(Impairment(0.010, 0.005), queue_bytes=15_140, rate_bps=10 * MBIT)
    assert jittered.limit_packets == -(-(15_140 + 10 * MBIT * 0.030 / 8) // FRAME_BYTES)


def test_every_attribute_is_sent_so_a_change_replaces_all_of_them():
    options = NetemParams(100, 0.02).options()
    names = [name for name, _ in options["attrs"]]
    assert names == ["TCA_NETEM_LATENCY64", "TCA_NETEM_JITTER64", "TCA_NETEM_CORR", "TCA_NETEM_REORDER",
                     "TCA_NETEM_CORRUPT", "TCA_NETEM_RATE"]
    assert dict(options["attrs"])["TCA_NETEM_LATENCY64"] == 20_000_000 and options["delay"] == 20_000_000 // 64


def test_options_carry_table_burst_loss_and_probabilities():
    params = NetemParams(500, 0.03, 0.004, "paretonormal", delay_correlation=0.25, duplicate=0.01, reorder=0.5,
                         corrupt=0.001, gilbert_elliott=GilbertElliott(0.01, 0.3, 0.002, 0.9), rate_bps=8 * 10**10)
    options = params.options()
    attrs = dict(options["attrs"])
    table = struct.unpack(f"={DIST_ENTRIES}h", attrs["TCA_NETEM_DELAY_DIST"])
    assert table == distribution_table("paretonormal")
    ge = attrs["TCA_NETEM_LOSS"]["attrs"][0][1]
    # The kernel loses in the bad state when a draw exceeds h: h = 1 - loss_bad.
    assert ge["h"] == round((1 - 0.9) * U32_MAX) and ge["k1"] == round(0.002 * U32_MAX)
    assert options["gap"] == 1 and options["duplicate"] == round(0.01 * U32_MAX)
    assert attrs["TCA_NETEM_RATE64"] == 10**10 and attrs["TCA_NETEM_RATE"]["rate"] == U32_MAX


@pytest.mark.parametrize("kwargs, words", [
    ({"reorder": 0.1}, "give a delay with reorder"),
    ({"delay_s": 0.01, "delay_correlation": 0.2}, "give a jitter"),
    ({"delay_s": 0.01, "jitter_s": 0.001, "distribution": "lognormal"}, "no 'lognormal' distribution"),
    ({"loss": 0.01, "gilbert_elliott": GilbertElliott(0.1, 0.1)}, "either a random loss"),
    ({"duplicate": 1.5}, "fraction"),
])
def test_netem_refuses_what_it_cannot_mean(kwargs, words):
    with pytest.raises(NetError, match=words):
        NetemParams(100, **kwargs)


def test_profiles_carry_every_netem_parameter():
    profile = profile_from_dict({"rate": "10mbit", "delay": "10ms", "jitter": "2ms", "delay_correlation": "25%",
                                 "duplicate": "1%", "reorder": "2%", "corrupt": "0.1%",
                                 "loss_model": {"p_good_to_bad": "1%", "p_bad_to_good": "30%", "loss_bad": "100%"}})
    impairment = profile.up.impairment
    assert (impairment.delay_correlation, impairment.duplicate, impairment.reorder, impairment.corrupt) == \
        (0.25, 0.01, 0.02, 0.001)
    assert impairment.gilbert_elliott == GilbertElliott(0.01, 0.3, 0.0, 1.0)
    assert impairment.mean_loss == pytest.approx(0.01 / 0.31)
    with pytest.raises(NetError, match="loss_model"):
        profile_from_dict({"rate": "10mbit", "loss_model": {"p": "1%"}})
