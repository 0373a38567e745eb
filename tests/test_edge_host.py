"""The edge host without Ray: many profiled agents in one process, one thread each, over
loopback TCP to a real cloud server; and how agents are split into hosts."""

from __future__ import annotations

import dataclasses
import time

import pytest

from ray_scout.experiments.placement import edge_hosts


class _Recorder:
    """Stands in for the Recorder actor: ``add.remote``, ``add_many.remote`` and
    ``recorded_request_ids.remote``."""

    def __init__(self, recorded=()):
        self.rows: list[tuple[str, dict]] = []
        recorder = self

        class _Add:
            def remote(self, table, row):
                recorder.rows.append((table, row))

        class _AddMany:
            def remote(self, table, rows):
                recorder.rows.extend((table, row) for row in rows)

        class _Ids:
            def remote(self):
                return set(recorded)

        self.add, self.add_many, self.recorded_request_ids = _Add(), _AddMany(), _Ids()

    def table(self, name):
        return [row for table, row in self.rows if table == name]


def test_agents_split_into_at_most_one_host_per_core_as_even_as_can_be():
    agents = [f"a{i}" for i in range(10)]
    assert [len(h) for h in edge_hosts(agents, 3, one_per_agent=False)] == [4, 3, 3]
    assert sum(edge_hosts(agents, 3, one_per_agent=False), []) == agents
    assert edge_hosts(agents[:2], 16, one_per_agent=False) == [["a0"], ["a1"]]
    # Full fidelity: a model per agent, never shared between threads.
    assert edge_hosts(agents[:3], 1, one_per_agent=True) == [["a0"], ["a1"], ["a2"]]


def _spec(count: int, rate_hz: float, duration_s: float):
    from ray_scout.experiments.spec import parse_spec

    return parse_spec({
        "name": "host", "fidelity": "profiled", "duration_s": duration_s, "seed": 3,
        "capacity": {"kind": "constant", "rate": "100mbit"},
        "cloud": {"models": {"qwen2.5-7b": {"timing": "paper_b"}}},
        "agents": [{"name": "a", "count": count, "model": "qwen2.5-7b",
                    "context_tokens": [64], "deadline_s": 2.0, "arrival_rate_hz": rate_hz,
                    "quality": "paper_b:3b-7b"}],
        "policies": ["static:scout"], "allocators": ["equal"]})


def _configs(spec, address):
    from ray_scout.actors.edge import AgentConfig
    from ray_scout.experiments.runner import request_shapes, workloads
    from ray_scout.experiments.spec import quality_profile

    shapes, work = request_shapes(spec), workloads(spec)
    g = spec.agents[0]
    return [AgentConfig(name=name, netns=None, cloud_address=address, policy="static:scout",
                        allocator="equal", quality=quality_profile(spec, g), shapes=shapes["a"],
                        cloud_model="qwen2.5-7b", deadline_s=g.deadline_s, arrivals=work[name],
                        initial_bps=1e6) for name in spec.agent_names], work


def _cloud():
    from ray_scout.actors.cloud import CloudActor
    from ray_scout.core.stages.profiled import ProfiledService, load_timing

    return CloudActor("c", [("127.0.0.1", 0)], None,
                      ProfiledService({"qwen2.5-7b": load_timing("paper_b")}), slots=64,
                      connections=128)


def test_one_host_runs_fifty_agents_concurrently_and_records_every_request():
    from ray_scout.actors.edge import EdgeHost

    spec = _spec(50, 0.5, 4.0)
    cloud = _cloud()
    try:
        configs, work = _configs(spec, cloud.ready()[0])
        recorder = _Recorder()
        host = EdgeHost("h", recorder, spec.agent_names)
        # What Ray's Actors table shows (it reads the repr once, as the actor starts).
        assert repr(host) == "h: 50 agents (a0 .. a49), waiting for a trial"
        assert set(host.prepare(configs)) == set(spec.agent_names)
        host.set_grants({name: 2e6 for name in spec.agent_names})
        assert {a.grant_bps for a in host.agents.values()} == {2e6}
        start = time.time()
        done = host.run(configs, start + 0.2, restarted=False)
        wall = time.time() - start
    finally:
        cloud.close()
    rows = recorder.table("requests")
    issued = sorted(a.request_id for arrivals in work.values() for a in arrivals)
    assert sorted(r["request_id"] for r in rows) == issued
    assert sum(done.values()) == len(issued) > 50
    assert all(r["outcome"] == "hit" for r in rows), {r["error"] for r in rows}
    # The host's tally, as it prints it at the end of a trial.
    idle = sum(not arrivals for arrivals in work.values())  # no arrival in 4 s: mode "-"
    assert repr(host) == (f"h: 50 agents, hits {len(rows)}/{len(rows)}, last modes scout "
                          f"{50 - idle}" + (f", - {idle}" if idle else ""))
    # Sequential agents would take the sum of their schedules; threads take the longest.
    assert wall < spec.duration_s + 3 * spec.agents[0].deadline_s


def test_a_restarted_host_records_past_arrivals_without_rows_as_lost():
    from ray_scout.actors.edge import EdgeHost

    spec = _spec(2, 2.0, 3.0)
    configs, work = _configs(spec, ("127.0.0.1", 9))  # no cloud: only the lost rows count
    past = [a for arrivals in work.values() for a in arrivals if a.t_s < 2.0]
    kept = {a.request_id for a in past[::2]}  # rows the old process had recorded
    recorder = _Recorder(recorded=kept)
    # A restarted host starts empty and rebuilds its agents from the run's configs; only
    # past arrivals remain, so all that happens is the restart's bookkeeping.
    configs = [dataclasses.replace(c, arrivals=tuple(a for a in c.arrivals if a.t_s < 2.0))
               for c in configs]
    EdgeHost("h", recorder, spec.agent_names).run(configs, time.time() - 2.5, restarted=True)
    lost = recorder.table("requests")
    assert sorted(r["request_id"] for r in lost) == sorted(
        a.request_id for a in past if a.request_id not in kept)
    assert all(r["outcome"] == "lost" and not r["deadline_met"] for r in lost)
    assert {e["event"] for e in recorder.table("events")} == {"restarted"}


def test_a_first_start_serves_arrivals_already_due_instead_of_calling_them_lost():
    from ray_scout.actors.edge import EdgeHost

    spec = _spec(3, 2.0, 2.0)
    cloud = _cloud()
    try:
        configs, work = _configs(spec, cloud.ready()[0])
        recorder = _Recorder()
        # The host starts a second late (a loaded box starting hundreds of threads).
        EdgeHost("h", recorder, spec.agent_names).run(configs, time.time() - 1.0, restarted=False)
    finally:
        cloud.close()
    rows = recorder.table("requests")
    assert len(rows) == sum(len(w) for w in work.values())
    assert "lost" not in {r["outcome"] for r in rows} and not recorder.table("events")


def test_a_host_needs_agents():
    from ray_scout.actors.edge import EdgeHost

    with pytest.raises(ValueError, match="at least one agent"):
        EdgeHost("h", _Recorder(), ["a0"]).prepare([])


def test_a_host_hands_its_rows_over_in_batches_and_the_rest_at_the_end():
    from ray_scout.actors.edge import RowBatcher

    recorder = _Recorder()
    calls = []
    many = recorder.add_many.remote
    recorder.add_many.remote = lambda table, rows: (calls.append(len(rows)), many(table, rows))
    rows = RowBatcher(recorder, interval_s=0.05)
    published = []
    for i in range(5):
        rows.add({"request_id": i})
        rows.later(lambda i=i: published.append(i))
    time.sleep(0.2)  # a few flushes: the five rows went in one call, their lines with it
    assert calls == [5] and published == list(range(5))
    rows.add({"request_id": 5})
    rows.close()  # what is left goes as the host's run ends, not an interval later
    assert calls == [5, 1] and [r["request_id"] for r in recorder.table("requests")] == list(range(6))
    with pytest.raises(ValueError, match="interval_s"):
        RowBatcher(recorder, interval_s=0)
