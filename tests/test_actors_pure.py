"""The pure parts of the actors: HTB splits, epoch ticks, policy names, an agent's demand
and its state in a few words."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ray_scout.actors.allocator import sent_outcome, tick_times
from ray_scout.core.control.allocation import Outcome
from ray_scout.actors.link_manager import split_for_htb
from ray_scout.core.control.capacity import CapacityTrace
from ray_scout.core.modes import Mode
from ray_scout.core.stages.profiled import PaperBTiming, latency_model
from ray_scout.core.stages.request import Arrival, RequestShape
from ray_scout.net.errors import NetError
from ray_scout.net.profiles import MIN_RATE_BPS


@given(st.lists(st.floats(0, 1e8), min_size=1, max_size=40), st.floats(1e6, 1e9))
def test_htb_split_keeps_the_minimum_and_fits_the_capacity(rates, capacity):
    shares = split_for_htb(capacity, {f"a{i}": r for i, r in enumerate(rates)})
    assert all(v >= MIN_RATE_BPS for v in shares.values())
    assert sum(shares.values()) <= capacity


def test_htb_split_refuses_more_agents_than_the_minimum_allows():
    with pytest.raises(NetError, match="minimum"):
        split_for_htb(10_000, {"a": 0, "b": 0})


def test_a_lab_node_refuses_an_access_profile_with_an_mtu_before_touching_a_link(monkeypatch):
    # A lab node's access link is its NIC: an mtu in the profile could not be honoured there.
    # Were the check gone, the manager would shape this host's real interface: refused here.
    from ray_scout.actors.link_manager import NodeLinkManager
    from ray_scout.net.node_links import NodeLinks

    monkeypatch.setattr(NodeLinks, "build",
                        lambda self: pytest.fail("shaped a real interface for an mtu profile"))
    with pytest.raises(NetError, match=r"\['lab_mtu200'\] set an mtu"):
        NodeLinkManager("10.0.0.1", {"a0": 5000}, {"a0": "lab_mtu200"}, "lab", 50e6,
                        {"a0": 25e6})


def test_epoch_ticks_include_every_capacity_change():
    trace = CapacityTrace(((0, 1e6), (0.25, 2e6), (1.5, 3e6)), 3.0)
    ticks = tick_times(trace, 0.5, 2.0)
    assert ticks == [0.0, 0.25, 0.5, 1.0, 1.5, 2.0]


def test_adaptive_offload_keeps_local_as_the_fallback_only():
    from ray_scout.core.control.policy import make_policy
    from ray_scout.core.control.policy import ModeQuality, PolicyInput, QualityProfile

    profile = QualityProfile("same-model", "m", "m", "relative_f1",
                             {m: ModeQuality(1.0) for m in (Mode.INT8, Mode.SCOUT, Mode.LOCAL)})
    lat = latency_model(PaperBTiming(), PaperBTiming(), 100, 50, 24, rtt_s=0.01)
    lat = dataclasses.replace(lat, edge_s={**lat.edge_s, Mode.LOCAL: 0.05})
    request = PolicyInput(bandwidth_bps=100e6, deadline_s=5.0,
                          payload_bytes={Mode.INT8: 1_000_000, Mode.SCOUT: 400}, latency=lat)
    assert make_policy("adaptive", profile, 0.1).decide(request).mode == Mode.LOCAL
    assert make_policy("adaptive:offload", profile, 0.1).decide(request).mode != Mode.LOCAL
    down = dataclasses.replace(request, bandwidth_bps=0.0)
    assert make_policy("adaptive:offload", profile, 0.1).decide(down).mode == Mode.LOCAL


def _agent_config(arrivals, **extra):
    from ray_scout.actors.edge import AgentConfig
    from ray_scout.core.control.policy import (
        PAPER_B_PAYLOAD_BYTES, paper_b_latency, paper_b_profile,
    )

    latency = paper_b_latency()
    shape = RequestShape(170, 128, dict(PAPER_B_PAYLOAD_BYTES), latency, dict(latency.edge_s))
    return AgentConfig(name="e0", netns=None, cloud_address=("127.0.0.1", 1), policy="adaptive",
                       allocator="quality_max", quality=paper_b_profile("3b-7b"),
                       shapes={170: shape}, cloud_model="qwen2.5-7b", deadline_s=2.5,
                       arrivals=arrivals, safety_margin=0.2, **extra)


def test_an_agent_demands_room_for_its_queue_and_its_policy_margin():
    from ray_scout.actors.edge import EdgeAgent

    arrivals = tuple(Arrival(i, t, 170) for i, t in enumerate((1.0, 3.5, 4.0, 8.0)))
    demand = EdgeAgent(_agent_config(arrivals), recorder=None).demand()
    # Without a rate from the runner, the schedule's own: 4 arrivals by t = 8 s.
    assert demand.arrival_rate_hz == pytest.approx(0.5) and demand.safety_margin == 0.2
    given = EdgeAgent(_agent_config(arrivals, arrival_rate_hz=0.25), recorder=None).demand()
    assert given.arrival_rate_hz == 0.25


def test_a_static_agent_demands_no_margin():
    from ray_scout.actors.edge import EdgeAgent

    cfg = dataclasses.replace(_agent_config((Arrival(0, 1.0, 170),)), policy="static:int8")
    assert EdgeAgent(cfg, recorder=None).demand().safety_margin == 0.0


def test_a_static_agent_demands_its_one_mode_and_an_adaptive_one_every_mode_it_knows():
    from ray_scout.actors.edge import EdgeAgent

    cfg = _agent_config((Arrival(0, 1.0, 170),))
    static = EdgeAgent(dataclasses.replace(cfg, policy="static:int4"), recorder=None).demand()
    assert set(static.quality) == {Mode.INT4}
    adaptive = EdgeAgent(cfg, recorder=None).demand()
    assert set(adaptive.quality) == {Mode.BF16, Mode.INT8, Mode.INT4, Mode.MIXED_INT4,
                                     Mode.SCOUT}


def test_an_agent_tells_its_state_in_its_repr():
    from ray_scout.actors.edge import EdgeAgent

    arrival = Arrival(0, 1.0, 170)
    agent = EdgeAgent(_agent_config((arrival,), initial_bps=25e6), recorder=None)
    assert repr(agent) == ("e0 - adaptive/quality_max: mode -, grant 25.0 Mbit/s, hits 0/0")
    agent.set_grant(12.5e6)
    row = agent._blank_row(arrival, 0.0, 0.0)
    agent._finish(dict(row, outcome="hit"), Mode.INT8)
    agent._finish(row, Mode.SCOUT)
    assert repr(agent) == ("e0 - adaptive/quality_max: mode scout, grant 12.5 Mbit/s, "
                           "hits 1/2")


def test_the_hit_loop_weighs_the_requests_whose_payload_went_on_the_wire():
    # The same requests the simulator weighs: hits, and misses cut off on the wire; not a
    # local answer, an error, nor a request whose deadline passed before it was sent.
    sent = dict(agent="a0", mode="int8", payload_bytes=5_000, grant_bps=8e6, error="")
    assert sent_outcome({**sent, "outcome": "hit", "deadline_met": True}) == Outcome(
        Mode.INT8, 5_000, 8e6, True)
    assert sent_outcome({**sent, "outcome": "miss", "cancelled": True,
                         "error": "deadline passed after 1.2 s"}).deadline_met is False
    for before in ("deadline passed during edge compute",
                   "deadline of 1.500 s passed before request 3 was sent",
                   "deadline passed while connecting to ('10.0.0.1', 9000)"):
        assert sent_outcome({**sent, "outcome": "miss", "error": before}) is None
    assert sent_outcome({**sent, "outcome": "error"}) is None
    assert sent_outcome({**sent, "mode": "local", "payload_bytes": 0, "outcome": "hit"}) is None
    assert sent_outcome({**sent, "mode": "", "outcome": "expired"}) is None
