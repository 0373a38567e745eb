
import pytest
from hypothesis import given, strategies as st

from ray_scout.net.errors import NetError
from ray_scout.net.profiles import (
    MIN_QUEUE_BYTES, default_queue_bytes, list_profiles, load_profile, parse_loss, parse_queue_bytes,
    parse_rate_bps, parse_time_s, profile_from_dict)


@pytest.mark.parametrize("text, bps", [("10mbit", 10_000_000), ("10Mbit", 10_000_000), ("10 Mbit/s", 10_000_000),
                                       ("2.5gbit", 2_500_000_000), ("64kbit", 64_000)])
def test_rate_units_are_case_insensitive_and_in_bits_per_second(text, bps):
    assert parse_rate_bps(text) == bps


@given(st.integers(min_value=8, max_value=10_000_000))
def test_rate_roundtrips_through_kbit_text(kbit):
    assert parse_rate_bps(f"{kbit}kbit") == kbit * 1000


@pytest.mark.parametrize("text", ["10", "10mb", "fast", "20gbit", "1kbit"])
def test_rate_without_unit_or_out_of_range_is_rejected_with_advice(text):
    with pytest.raises(NetError, match="unit|range"):
        parse_rate_bps(text)


def test_time_loss_and_queue_units():
    assert parse_time_s("20ms") == pytest.approx(0.02)
    assert parse_time_s("500us") == pytest.approx(0.0005)
    assert parse_loss("1%") == pytest.approx(0.01) and parse_loss(0.02) == pytest.approx(0.02)
    assert parse_queue_bytes("50ms", 8_000_000) == 50_000
    assert parse_queue_bytes("256kB", 8_000_000) == 256_000
    with pytest.raises(NetError):
        parse_loss("100%")
    with pytest.raises(NetError):
        parse_queue_bytes("100b", 8_000_000)


@given(st.text(max_size=12))
def test_parsers_raise_only_net_error_on_garbage(text):
    for parse in (parse_rate_bps, parse_time_s, parse_loss):
        try:
            parse(text)
        except NetError:
            pass


def test_default_queue_is_one_bdp_with_floors():
    assert default_queue_bytes(100_000_000, 0.025, 0.0) == 625_000  # 100 Mbit/s x 50 ms
    assert default_queue_bytes(100_000_000, 0.0, 0.0) == 250_000  # 20 ms floor
    assert default_queue_bytes(10_000, 0.0, 0.0) == MIN_QUEUE_BYTES


def test_asymmetric_profile_overrides_one_direction():
    p = profile_from_dict({"rate": "20mbit", "delay": "10ms", "up": {"rate": "5mbit"}})
    assert p.up.rate_bps == 5_000_000 and p.down.rate_bps == 20_000_000
    assert p.up.impairment.delay_s == pytest.approx(0.01)


def test_unknown_key_is_named_in_the_error():
    with pytest.raises(NetError, match="bandwidth"):
        profile_from_dict({"rate": "1mbit", "bandwidth": "2mbit"})


def test_every_shipped_profile_loads():
    names = list_profiles()
    assert {"5g", "lte", "wifi", "edge-dc", "lab"} <= set(names)
    for name in names:
        assert load_profile(name).up.rate_bps > 0


def test_missing_profile_error_lists_the_known_ones():
    with pytest.raises(NetError, match="lte"):
        load_profile("no-such-profile")


def test_non_root_gets_told_to_run_as_root(monkeypatch):
    from ray_scout.net.errors import CapabilityError
    from ray_scout.net.probe import probe

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(CapabilityError, match="root"):
        probe()


@pytest.mark.parametrize("mtu, message", [(64, "must lie in 128..1500"),
                                          (9000, "must lie in 128..1500"),
                                          ("200B", "whole number of bytes"),
                                          (True, "whole number of bytes")])
def test_an_mtu_off_ethernet_or_not_a_number_is_refused(mtu, message):
    with pytest.raises(NetError, match=message):
        profile_from_dict({"name": "x", "rate": "10mbit", "mtu": mtu})


def test_a_smaller_mtu_delivers_less_payload_per_shaped_bit():
    assert profile_from_dict({"rate": "10mbit"}).payload_share == 1.0
    share = profile_from_dict({"rate": "10mbit", "mtu": 576}).payload_share
    assert share == pytest.approx((524 / 590) / (1448 / 1514))
