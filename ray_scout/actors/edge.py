"""EdgeAgent: one edge device's workload, estimator and policy, and its requests' timelines.

What lives here: the agent's loop over a seeded arrival schedule (requests wait in the
agent's own FIFO: one edge model answers one request at a time), the policy decision on the
time left, the send over a ``Connection`` from the agent's namespace with the deadline as the
transport's budget, and one row per request streamed to the ``Recorder`` as soon as it is
final. What it leaves to others: the edge compute and what an answer is worth (an ``Edge``
stage of ``core.stages``, full or profiled: the agent does not ask which), splitting capacity
(the allocator tells it its grant), the cloud, shaping.

Timeline of a request (unix seconds, all on this host's clock; the columns of ``requests``):
arrival -> start (after the agent queue) -> edge compute (prefill, select, decide, encode) ->
tx start -> tx end (last byte to the kernel) -> tx acked -> cloud queue -> cloud compute ->
answer received -> scored. ``overhead_s`` is what is left of the latency after agent queue,
edge compute, bytes on the wire (tx start to acked), cloud queue and cloud compute: the
testbed's own cost plus one propagation RTT.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from ray_scout.core.control.allocation import Demand, demand_for
from ray_scout.core.control.estimators import GrantEstimator, make_estimator
from ray_scout.core.control.policy import (
    Decision, LatencyModel, Policy, PolicyInput, QualityProfile, make_policy,
)
from ray_scout.core.modes import Mode
from ray_scout.core.stages.request import Arrival, Edge, EdgeOutcome, RequestShape
from ray_scout.transport.client import (
    Connection, ConnectionLost, DeadlineExceeded, RemoteError, TransportError,
)


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """Everything an agent needs, built by the runner (picklable, no live objects)."""

    name: str
    netns: str | None
    cloud_address: tuple[str, int]
    policy: str  # 'adaptive' or 'static:<mode>'
    allocator: str
    quality: QualityProfile
    shapes: Mapping[int, RequestShape]  # by context tokens
    cloud_model: str
    deadline_s: float
    arrivals: tuple[Arrival, ...]
    # The mean request rate the agent reports to the allocator; None: its schedule's own.
    arrival_rate_hz: float | None = None
    estimator: str = "grant"
    initial_bps: float = 10e6
    safety_margin: float = 0.1
    new_tokens: int = 24
    # Full fidelity: the edge model, its options and one (context, question, answers) per
    # sample index; empty in profiled fidelity.
    model: str = ""
    edge_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    samples: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    # The agent's own address where it shares a namespace with others (a lab site).
    source_address: str | None = None
    # The experiment's token, presented to the cloud's port first on every connection.
    token: bytes | None = None

    @property
    def fidelity(self) -> str:
        return "full" if self.samples else "profiled"


def typical_demand(name: str, shapes: Mapping[int, RequestShape], arrivals: Sequence[Arrival],
                   quality: QualityProfile, deadline_s: float, policy: Policy,
                   arrival_rate_hz: float | None = None) -> Demand:
    """An agent's typical request (median context) in the modes its policy can send, its
    arrival rate and its policy's margin, as the simulator reports them: the allocator leaves
    room for the wait behind the agent's own requests (one at a time) and for the policy's
    reserve. Without ``arrival_rate_hz``: arrivals per second up to the last one."""
    tokens = sorted(a.context_tokens for a in arrivals) or sorted(shapes)
    shape = shapes[tokens[len(tokens) // 2]]
    if arrival_rate_hz is None:
        last = max((a.t_s for a in arrivals), default=0.0)
        arrival_rate_hz = len(arrivals) / last if last > 0 else 0.0
    return demand_for(name, shape.payload_bytes, quality, shape.latency, deadline_s,
                      arrival_rate_hz=arrival_rate_hz, safety_margin=policy.safety_margin,
                      modes=policy.choices,
                      guards_next_arrival=policy.guards_next_arrival)


@functools.lru_cache(maxsize=2)
def _loaded(source: str):
    """A model loaded once per process: an edge host keeps it from one trial to the next."""
    from ray_scout.core.llm.models import load_model

    return load_model(source)


def make_edge(config: AgentConfig) -> Edge:
    """The agent's edge stage: the real model in full fidelity, its profile otherwise."""
    if config.fidelity == "full":
        from ray_scout.core.evaluation.metrics import exact_match, f1
        from ray_scout.core.stages.full import EdgeOptions, EdgeStage, FullEdge

        stage = EdgeStage(_loaded(config.model), EdgeOptions(**config.edge_options),
                          cloud_model_id=config.cloud_model)
        return FullEdge(stage, config.shapes, config.samples,
                        lambda answer, gold: (f1(answer, gold), exact_match(answer, gold)))
    from ray_scout.core.stages.profiled import ProfiledEdge

    return ProfiledEdge(config.shapes, config.cloud_model, config.new_tokens, config.quality)


class EdgeAgent:
    """Runs ``config.arrivals`` against the cloud; ``set_grant`` comes from the allocator."""

    def __init__(self, config: AgentConfig, recorder: Any):
        from ray_scout.actors.metrics import AgentMetrics

        self.config = config
        self.recorder = recorder
        self.policy = make_policy(config.policy, config.quality, config.safety_margin)
        self.estimator = make_estimator(config.estimator, config.initial_bps)
        self.grant_bps = config.initial_bps
        self.metrics = AgentMetrics(config.name, config.policy, config.allocator)
        self.connection: Connection | None = None
        self.edge = make_edge(config)
        self.arrival_rate_hz = self.demand().arrival_rate_hz
        self.last_mode = "-"
        self.hits = 0
        self.answered = 0
        # Runs each finished request's log line and metrics: at once, or later from an edge
        # host's RowBatcher (see there: off the path of the answers arriving beside it).
        self.publish: Callable[[Callable[[], None]], None] = _now

    def __repr__(self) -> str:
        """The agent in a few words: Ray's Actors table shows it (taken as the actor starts:
        Ray 2.60 reads an actor's repr once), each request's line in the agent's log."""
        c = self.config
        return (f"{c.name} {c.model or '-'} {c.policy}/{c.allocator}: mode {self.last_mode}, "
                f"grant {self.grant_bps / 1e6:.1f} Mbit/s, hits {self.hits}/{self.answered}")

    # --- what the allocator asks and tells ---------------------------------------------
    def demand(self) -> Demand:
        """What the allocator plans this agent with (``typical_demand``)."""
        c = self.config
        return typical_demand(c.name, c.shapes, c.arrivals, c.quality, c.deadline_s,
                              self.policy, c.arrival_rate_hz)

    def set_grant(self, rate_bps: float) -> None:
        self.grant_bps = rate_bps
        if isinstance(self.estimator, GrantEstimator):
            self.estimator.set_grant(rate_bps)
        self.metrics.grant(rate_bps)

    # --- the loop ----------------------------------------------------------------------
    def run(self, t0_unix_s: float, recorded: frozenset[int] | None = None,
            rows: RowBatcher | None = None) -> int:
        """Serve the arrivals in order (late ones wait, as in a queue); returns rows recorded.

        Each finished row, its log line and its metrics go to ``rows`` (an edge host's
        ``RowBatcher``), or straight to the recorder, log and metrics where none is given.

        After a restart (Ray retries the host's task on a new process) ``recorded`` holds
        the request ids already on disk: an arrival whose time has passed and that has no
        row died with the old process, and gets a ``lost`` row (a miss), so the lost window
        counts instead of vanishing; only the arrivals still ahead are served.
        """
        if rows is None:
            return self._run(t0_unix_s, recorded,
                             functools.partial(self.recorder.add.remote, "requests"))
        self.publish = rows.later
        try:
            return self._run(t0_unix_s, recorded, rows.add)
        finally:
            self.publish = _now

    def _run(self, t0_unix_s: float, recorded: frozenset[int] | None,
             report: Callable[[dict], None]) -> int:
        now = time.time()
        if recorded is None:  # a first start: every arrival is this run's to serve
            todo, past = list(self.config.arrivals), []
        else:
            todo = [a for a in self.config.arrivals if t0_unix_s + a.t_s >= now - 1e-3]
            past = [a for a in self.config.arrivals if t0_unix_s + a.t_s < now - 1e-3]
        lost = [a for a in past if a.request_id not in recorded]
        if past:
            self.recorder.add.remote("events", {
                "wall_time_s": now, "source": self.config.name, "event": "restarted",
                "detail": f"{len(lost)} of {len(past)} past arrivals had no row: recorded "
                          "as lost"})
            for arrival in lost:
                row = self._blank_row(arrival, t0_unix_s + arrival.t_s, now)
                row.update(outcome="lost", error="the edge host restarted before this "
                                                 "request finished")
                report(self._finish(row, None))
        done = len(lost)
        if todo:
            self.connect()
        for arrival in todo:
            wait = t0_unix_s + arrival.t_s - time.time()
            if wait > 0:
                time.sleep(wait)
            report(self.serve(arrival, t0_unix_s))
            done += 1
        self.close()
        return done

    def connect(self) -> None:
        """Open the connection to the cloud before the first arrival, as a device keeps one
        open: a handshake inside a request would count as testbed overhead (and a thousand
        agents' first requests would all pay one). One that fails is retried by the first
        request, which records why it could not be sent."""
        if self.connection is not None:
            return
        try:
            self.connection = self._connection(5.0)
        except (TransportError, OSError):
            self.connection = None

    def _connection(self, connect_timeout_s: float) -> Connection:
        c = self.config
        # No transport body CRC: a full-fidelity payload carries the wire format's own crc32,
        # and the body CRC costs ~1 ms/MB per side (docs/TRANSPORT.md), which would count as
        # testbed overhead; the frame header stays checked.
        return Connection(c.cloud_address, source_netns=c.netns, source_address=c.source_address,
                          abort_on_close=True, connect_timeout_s=connect_timeout_s,
                          body_checksum=False, token=c.token)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def serve(self, arrival: Arrival, t0_unix_s: float) -> dict:
        """One request, top to bottom: edge stage (with the decision), send, score."""
        c = self.config
        arrived = t0_unix_s + arrival.t_s
        start = time.time()
        row = self._blank_row(arrival, arrived, start)

        def decide(sizes: Mapping[Mode, int], latency: LatencyModel) -> Decision | None:
            """The policy on the time left; the row records what it saw and chose."""
            now = time.time()
            estimate = self.estimator.estimate(now - t0_unix_s)
            budget = c.deadline_s - (now - arrived)
            # Time left of each request already waiting behind this one (the queue-aware
            # policy weighs them; the others ignore it).
            waiting = tuple(c.deadline_s - (now - t0_unix_s - a.t_s) for a in c.arrivals
                            if a.request_id > arrival.request_id and t0_unix_s + a.t_s <= now)
            decision = self.policy.decide(PolicyInput(
                estimate, max(budget, 0.0), sizes, latency, queue_deadlines_s=waiting,
                arrival_rate_hz=self.arrival_rate_hz, request_deadline_s=c.deadline_s))
            mode = decision.mode
            row.update(mode=mode.value, reason=decision.reason, bandwidth_estimate_bps=estimate,
                       payload_bytes=0 if mode == Mode.LOCAL else sizes[mode],
                       expected_latency_s=decision.expected_latency_s.get(mode, math.nan))
            return decision if budget > 0 else None

        outcome = self.edge.handle(arrival, decide)
        row.update(prefill_s=outcome.prefill_s, select_s=outcome.select_s,
                   encode_s=outcome.encode_s)
        mode = Mode(row["mode"])
        if outcome.decision is None:
            row.update(outcome="expired", error="deadline passed before the decision")
            return self._finish(row, mode)
        if outcome.error:
            row.update(error=outcome.error)
            return self._finish(row, mode)
        edge_done = time.time()
        row["edge_s"] = edge_done - start
        if outcome.body is None:  # answered at the edge
            row.update(answer=outcome.answer, latency_s=edge_done - arrived)
            row["overhead_s"] = row["latency_s"] - row["agent_queue_s"] - row["edge_s"]
            return self._score(row, mode, arrival)
        return self._send(row, mode, arrival, outcome, t0_unix_s)

    def _blank_row(self, arrival: Arrival, arrived: float, start: float) -> dict:
        """The request's row before anything happened: a miss until shown otherwise."""
        c = self.config
        return dict(
            request_id=arrival.request_id, agent=c.name, policy=c.policy, allocator=c.allocator,
            t_arrival_s=arrival.t_s, context_tokens=arrival.context_tokens, mode="",
            reason="", bandwidth_estimate_bps=math.nan, grant_bps=self.grant_bps,
            payload_bytes=0, expected_latency_s=math.nan,
            agent_queue_s=start - arrived, edge_s=math.nan, prefill_s=math.nan,
            select_s=math.nan, encode_s=math.nan, tx_s=math.nan, tx_send_s=math.nan,
            cloud_queue_s=math.nan, cloud_s=math.nan, rx_s=math.nan, latency_s=math.nan,
            overhead_s=math.nan, deadline_s=c.deadline_s, deadline_met=False, cancelled=False,
            outcome="miss", error="", quality=0.0, f1=math.nan, em=math.nan, answer="",
            measured_bps=math.nan, arrival_unix_s=arrived, tx_start_unix_s=math.nan,
            tx_end_unix_s=math.nan, tx_acked_unix_s=math.nan, answer_unix_s=math.nan,
            cloud_model=c.cloud_model)

    def _send(self, row: dict, mode: Mode, arrival: Arrival, outcome: EdgeOutcome,
              t0_unix_s: float) -> dict:
        """The payload over the agent's connection with the deadline's time left."""
        c = self.config
        body = outcome.body
        arrived = row["arrival_unix_s"]
        left = c.deadline_s - (time.time() - arrived)
        try:
            if left <= 0:
                raise DeadlineExceeded("deadline passed during edge compute")
            if self.connection is None:
                self.connection = self._connection(min(left, 5.0))
            response = self.connection.request(body, deadline_s=left)
        except DeadlineExceeded as exc:
            if exc.acked_bytes and exc.sending_s:
                # A transfer cut off at its deadline still measured the path until then:
                # dropping it would hide exactly the capacity drops that made it late.
                self.estimator.observe(exc.acked_bytes, exc.sending_s, time.time() - t0_unix_s)
            row.update(cancelled=True, error=str(exc))
            return self._finish(row, mode)
        except (ConnectionLost, RemoteError, TransportError, OSError) as exc:
            if isinstance(exc, (ConnectionLost, OSError)) and self.connection is not None:
                self.connection.close()
                self.connection = None
            row.update(outcome="error", error=f"{type(exc).__name__}: {exc}")
            return self._finish(row, mode)
        answer = json.loads(response.body)
        tl = response.timeline
        # The kernel's unacked count may not be seen at 0 before the answer arrives; then
        # the answer's first byte less the cloud's own time stands in (durations only, so
        # it holds across hosts whose clocks differ).
        acked = tl.tx_acked_unix_s if tl.tx_acked_unix_s is not None else (
            tl.rx_first_byte_unix_s - answer["cloud_queue_s"] - answer["cloud_compute_s"])
        tx_s = acked - tl.tx_start_unix_s
        measured = len(body) * 8 / tx_s if tx_s > 0 else math.nan
        if tx_s > 0:
            self.estimator.observe(len(body), tx_s, acked - t0_unix_s)
        latency_s = tl.rx_end_unix_s - arrived
        row.update(
            payload_bytes=len(body), tx_s=tx_s, tx_send_s=tl.tx_end_unix_s - tl.tx_start_unix_s,
            cloud_queue_s=answer["cloud_queue_s"], cloud_s=answer["cloud_compute_s"],
            rx_s=tl.rx_end_unix_s - tl.rx_first_byte_unix_s, latency_s=latency_s,
            measured_bps=measured, tx_start_unix_s=tl.tx_start_unix_s, answer=answer["text"],
            tx_end_unix_s=tl.tx_end_unix_s, tx_acked_unix_s=acked, answer_unix_s=tl.rx_end_unix_s,
            overhead_s=latency_s - row["agent_queue_s"] - row["edge_s"] - tx_s
            - answer["cloud_queue_s"] - answer["cloud_compute_s"])
        return self._score(row, mode, arrival)

    def _score(self, row: dict, mode: Mode, arrival: Arrival) -> dict:
        """The edge stage's worth of the answer (0 on a miss)."""
        met = bool(row["latency_s"] <= self.config.deadline_s)
        score = self.edge.score(arrival, mode, row["answer"])
        row.update(f1=score.f1, em=score.em, deadline_met=met, outcome="hit" if met else "miss",
                   quality=score.quality if met else 0.0)
        return self._finish(row, mode)

    def _finish(self, row: dict, mode: Mode | None) -> dict:
        row["done_unix_s"] = time.time()
        if mode is not None:
            self.last_mode = mode.value
            self.answered += 1
            self.hits += row["outcome"] == "hit"
            self.publish(functools.partial(self._publish, repr(self), mode, row))
        return row

    def _publish(self, line: str, mode: Mode, row: dict) -> None:
        """The request's log line (the actor's log: live on the dashboard, in run.log) and
        metrics; ``publish`` says when."""
        print(line, flush=True)
        self.metrics.request(mode, row["outcome"], row["payload_bytes"], row["latency_s"],
                             row["quality"], row["bandwidth_estimate_bps"],
                             None if math.isnan(row["measured_bps"]) else row["measured_bps"])


def _now(task: Callable[[], None]) -> None:
    task()


class RowBatcher:
    """An edge host's finished request rows (and their log lines and metrics), handed over a
    batch at a time by one thread.

    An edge host's agents take their answers in bursts: the members of a cloud batch arrive
    within a millisecond, and each agent's thread waits for the GIL behind the others'
    bookkeeping before it can read its answer (the more answers just before it, the later).
    A Ray actor call costs its caller about 45 us of CPU whatever it carries (20 rows in one:
    about 100 us), and one recorder call per row was the largest holder of an edge host's GIL
    (`bench/results/cell_overhead/`); a request's log line and metrics came next. So the
    agent's thread only queues them, and this thread sends every ``interval_s`` the rows
    finished since in one call, at times unrelated to the bursts. A host that dies loses at
    most that long of finished rows, which its restart records as ``lost``, as it does for
    the requests in flight.
    """

    def __init__(self, recorder: Any, table: str = "requests", interval_s: float = 0.2):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s!r}")
        self.recorder, self.table, self.interval_s = recorder, table, interval_s
        self._rows: list[dict] = []
        self._tasks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="row-batcher", daemon=True)
        self._thread.start()

    def add(self, row: dict) -> None:
        with self._lock:
            self._rows.append(row)

    def later(self, task: Callable[[], None]) -> None:
        """Run ``task`` (a request's log line and metrics) at the next flush."""
        with self._lock:
            self._tasks.append(task)

    def flush(self) -> None:
        with self._lock:
            rows, self._rows = self._rows, []
            tasks, self._tasks = self._tasks, []
        for task in tasks:
            task()
        if rows:
            self.recorder.add_many.remote(self.table, rows)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def close(self) -> None:
        """Stop the thread and hand over what is left."""
        self._stop.set()
        self._thread.join()
        self.flush()


class EdgeHost:
    """Many edge agents in one worker process, each on its own thread.

    A socket belongs to the namespace it was made in, so one process serves agents of many
    namespaces; the agents share nothing but the process (each its own arrivals, policy,
    estimator, grant and connection). Ray worker processes then grow with hosts, not with
    agents. The allocator asks and tells all of a host's agents in one call each.
    """

    def __init__(self, name: str, recorder: Any, agent_names: Sequence[str]):
        self.name = name
        self.recorder = recorder
        # Which agents every trial gives this host (the runner groups them once per run).
        self.agent_names = tuple(agent_names)
        self.agents: dict[str, EdgeAgent] = {}
        self.configs: Sequence[AgentConfig] = ()

    def __repr__(self) -> str:
        """The host in a few words. Ray's Actors table (and the prefix of the host's log
        lines) shows it as the actor starts: which agents it runs. Once a trial runs: how many
        answered in time and what they last sent; the host prints it as a trial ends, and each
        agent prints its own line as it finishes a request."""
        agents = list(self.agents.values())
        if not agents:
            names = self.agent_names
            which = (", ".join(names) if len(names) <= 3
                     else f"{names[0]} .. {names[-1]}")
            return f"{self.name}: {len(names)} agents ({which}), waiting for a trial"
        modes = collections.Counter(a.last_mode for a in agents)
        return (f"{self.name}: {len(agents)} agents, hits "
                f"{sum(a.hits for a in agents)}/{sum(a.answered for a in agents)}, last modes "
                + ", ".join(f"{m} {n}" for m, n in modes.most_common()))

    def prepare(self, configs: Sequence[AgentConfig]) -> dict[str, Demand]:
        """The agents of a trial (their policy, first grant, arrivals); returns their demands.

        Models stay loaded in this process from one trial to the next.
        """
        if not configs:
            raise ValueError(f"edge host {self.name} needs at least one agent")
        for agent in self.agents.values():
            agent.close()
        self.agents = {c.name: EdgeAgent(c, self.recorder) for c in configs}
        self.configs = configs
        return self.demands()

    def demands(self) -> dict[str, Demand]:
        return {name: agent.demand() for name, agent in self.agents.items()}

    def _recorded(self) -> frozenset[int]:
        import ray

        ids = self.recorder.recorded_request_ids.remote()
        return frozenset(ray.get(ids) if isinstance(ids, ray.ObjectRef) else ids)

    def set_grants(self, rates_bps: Mapping[str, float]) -> None:
        for name, rate in rates_bps.items():
            if name in self.agents:
                self.agents[name].set_grant(rate)

    def run(self, configs: Sequence[AgentConfig], t0_unix_s: float,
            restarted: bool | None = None) -> dict[str, int]:
        """Every agent's loop at once; rows per agent. An agent that fails records why.

        ``configs`` are the trial's, as ``prepare`` had them: a host restarted by Ray comes
        back empty and rebuilds its agents from them when the run is retried, and its agents
        then account for the requests that died with the old process. ``restarted`` None:
        the host has no agents yet, so this process is not the one ``prepare`` built them in.
        """
        if restarted is None:
            restarted = not self.agents
        if list(self.configs) != list(configs):
            self.prepare(configs)
        recorded = self._recorded() if restarted else None
        done: dict[str, int] = {}
        rows = RowBatcher(self.recorder)

        def loop(agent: EdgeAgent) -> None:
            try:
                done[agent.config.name] = agent.run(t0_unix_s, recorded, rows)
            except Exception as exc:  # noqa: BLE001 -- one agent's failure is its own row
                self.recorder.add.remote("events", {
                    "wall_time_s": time.time(), "source": agent.config.name,
                    "event": "agent_failed", "detail": f"{type(exc).__name__}: {exc}"[:500]})
                done[agent.config.name] = 0

        threads = [threading.Thread(target=loop, args=(agent,), name=f"agent-{name}",
                                    daemon=True) for name, agent in self.agents.items()]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            rows.close()
        print(repr(self), flush=True)  # the host's log: the trial's tally, in run.log
        return done
