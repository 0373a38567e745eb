"""Run an experiment spec: every policy x allocator combination on the same seeded workload.

What lives here: turning a ``Spec`` into per-agent request shapes (exact payload bytes, the
policy's latency model, edge times), starting Ray (a local instance with the custom resources
``edge`` and ``cloud``, or an existing cluster), one trial per combination (link managers
-> CloudActor -> EdgeAgents -> Allocator, run, tear down; also on Ctrl-C), and gathering the
recorded rows into tidy tables. Where the actors go is ``placement``'s decision: on one
machine a ``LinkManager`` builds the lab-in-a-box; on a cluster the cloud actor runs on the
``cloud`` node and serves every agent on a port of its own, and one ``NodeLinkManager`` per
edge node shapes that node's real interface toward it. ``simulated`` fidelity maps the same spec onto
``experiments.simulate``. What it leaves to others: the actors' work, tables to text and
plots (``report``).

Output directory: ``requests``, ``epochs``, ``rate_changes`` and ``events`` as Parquet and CSV,
``links.csv`` (mechanism record per shaped direction), ``spec.yaml``, ``run.json`` (with each
trial's placement), and what
``report.write_report`` adds. Raw JSON-lines per trial stay under ``raw/`` (what a killed run
leaves behind).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pandas as pd

from ray_scout import provenance
from ray_scout.actors.by_name import ActorByName
from ray_scout.actors.edge import AgentConfig, typical_demand
from ray_scout.actors.link_manager import LinkChange
from ray_scout.actors.recorder import read_table
from ray_scout.core.control.allocation import allocate
from ray_scout.core.control.policy import make_policy
from ray_scout.core.stages.profiled import (
    ProfiledService, latency_model, load_timing, profiled_payload_bytes, selected_tokens,
)
from ray_scout.core.stages.request import Arrival, RequestShape
from ray_scout.experiments.placement import Placement, alive_nodes, edge_hosts, place
from ray_scout.experiments.spec import (
    FIDELITIES, REPO_ROOT, Spec, SpecError, arrivals, capacity_trace, check_allocators,
    check_placement, quality_profile, spec_path, spec_text_as_run,
)
from ray_scout.net.profiles import TCP_PAYLOAD_PER_FRAME, load_profile
from ray_scout.net.topology import CLOUD_ADDRESS

CLOUD_PORT = 7300
# One JSON line per finished trial, appended as each ends: what `--resume` skips.
FINISHED = "trials.jsonl"
TABLES = ("requests", "epochs", "rate_changes", "events")
# Header of a table no row reached (a simulated run changes no link and restarts nothing):
# a CSV without one is a 1-byte file that pandas cannot read.
EMPTY_COLUMNS = {
    "rate_changes": [f.name for f in dataclasses.fields(LinkChange)] + ["policy", "allocator"],
    "events": ["wall_time_s", "source", "event", "detail", "policy", "allocator"],
}
# How long after the last arrival a trial may take before the driver stops waiting: the
# longest deadline plus this slack (actor start-up, the last answer's way back).
DRAIN_SLACK_S = 20.0


def rtt_s(access: str, bottleneck: str) -> float:
    """Propagation round trip from the link profiles' delays (0 on rate-only links)."""
    a, b = load_profile(access), load_profile(bottleneck)
    return sum(d.impairment.delay_s for d in (a.up, a.down, b.up, b.down))


def request_shapes(spec: Spec) -> dict[str, dict[int, RequestShape]]:
    """Per agent group and context length: payload bytes, latency model and edge times."""
    from ray_scout.core.llm.models import facts_for  # torch comes with it: not at CLI start-up

    out = {}
    for g in spec.agents:
        facts = facts_for(g.model)
        edge = load_timing(g.edge_timing, spec.base)
        cloud = load_timing(spec.cloud_models[g.cloud_model], spec.base)
        rtt = rtt_s(g.access, spec.bottleneck)
        shapes = {}
        for tokens in g.context_tokens:
            selected = selected_tokens(tokens, g.scout_retention)
            lat = latency_model(edge, cloud, tokens, selected, g.new_tokens, rtt)
            sizes = profiled_payload_bytes(facts, tokens, protected_layers=g.protected_layers)
            shapes[tokens] = RequestShape(tokens, selected, sizes, lat, dict(lat.edge_s))
        out[g.name] = shapes
    return out


def workloads(spec: Spec) -> dict[str, tuple[Arrival, ...]]:
    """Each agent's arrivals, numbered globally so request ids are unique in a trial.

    ``sample_index`` is the arrival's place in the agent's schedule (its sample in full
    fidelity).
    """
    out, next_id = {}, 0
    for index, (name, g) in enumerate(spec.groups_by_agent().items()):
        rows = []
        for i, (t, tokens) in enumerate(arrivals(spec, index, g.context_tokens,
                                                 g.arrival_rate_hz)):
            rows.append(Arrival(next_id, t, tokens, i))
            next_id += 1
        out[name] = tuple(rows)
    return out


def samples(spec: Spec, work: dict) -> dict[str, tuple]:
    """Full fidelity: one synthetic sample per arrival, at the arrival's context length.

    Seeded per agent, so every combination answers the same questions. Lengths follow the
    task generator's approximate token count (no tokenizer in the driver).
    """
    from ray_scout.core.evaluation.tasks import generate

    out = {}
    groups = spec.groups_by_agent()
    for index, (name, arrivals_) in enumerate(work.items()):
        g = groups[name]
        by_length: dict[int, list] = {}
        for tokens in sorted({a.context_tokens for a in arrivals_}):
            count = sum(a.context_tokens == tokens for a in arrivals_)
            by_length[tokens] = generate(g.task, count, context_tokens=tokens,
                                         seed=spec.seed * 1000 + index)
        rows = []
        for a in arrivals_:
            sample = by_length[a.context_tokens].pop(0)
            rows.append((sample.context, sample.question, tuple(sample.answers)))
        out[name] = tuple(rows)
    return out


def demands(spec: Spec, shapes: dict, work: dict, policy: str) -> list:
    """Every agent's demand under ``policy``, as its EdgeAgent will report it."""
    out = []
    for name, g in spec.groups_by_agent().items():
        quality = quality_profile(spec, g)
        out.append(typical_demand(name, shapes[g.name], work[name], quality, g.deadline_s,
                                  make_policy(policy, quality, spec.safety_margin),
                                  g.arrival_rate_hz))
    return out


def validate(spec: Spec, address: str | None) -> None:
    """Everything a run can check before it creates anything (output folder, Ray, links).

    Raises ``SpecError`` naming the key at fault, or ``CapabilityError`` when this machine
    must build links and the process is not root.
    """
    from ray_scout.core.stages.profiled import ComputeError
    from ray_scout.net.errors import require_root

    for g in spec.agents:
        _timing(g.edge_timing, spec, f"agents[{g.name}].edge_timing")
    for model, source in spec.cloud_models.items():
        _timing(source, spec, f"cloud.models.{model}.timing")
    try:
        shapes = request_shapes(spec)
    except ComputeError as exc:
        raise SpecError(f"agents: {exc}") from None
    if spec.fidelity == "simulated":
        simulated_estimator(spec)
        return
    if address is None:  # the lab-in-a-box: this machine holds every agent and builds links
        check_placement({"this machine": len(spec.agent_names)})
        require_root()
    work = workloads(spec)
    for policy in spec.policies:
        check_allocators(spec, demands(spec, shapes, work, policy))


def _timing(source: str, spec: Spec, key: str) -> None:
    from ray_scout.core.stages.profiled import ComputeError

    try:
        load_timing(source, spec.base)
    except ComputeError as exc:
        raise SpecError(f"{key}: {exc}") from None


def simulated_estimator(spec: Spec) -> str:
    """The one estimator simulated fidelity runs for every agent."""
    estimators = {g.estimator for g in spec.agents}
    if len(estimators) != 1:
        raise SpecError(f"agents[*].estimator: simulated fidelity runs one estimator for all "
                        f"agents; the spec has {sorted(estimators)}")
    return next(iter(estimators))


# --- Ray --------------------------------------------------------------------------------
# SIGTERM (``kill``, ``ray job stop``) ends a run as Ctrl-C does, links torn down. Ray's
# waits turn any interrupt into a plain KeyboardInterrupt, so the signal is noted here.
TERMINATED: list[int] = []


def _terminate(signum, frame) -> None:
    TERMINATED.append(signum)
    raise KeyboardInterrupt


def start_ray(spec: Spec, address: str | None, dashboard: bool = True) -> bool:
    """Connect to ``address`` or start a local Ray with ``edge``/``cloud`` resources.

    Returns whether this call started Ray (and so must shut it down). The actors' output
    comes to this driver (``log_to_driver``): ``scout run`` writes it to the run's log.
    """
    import ray
    from ray.job_config import JobConfig

    if ray.is_initialized():
        return False
    # What the dashboard's Jobs tab shows beside this driver.
    job = JobConfig(metadata={"job_name": spec.name, "ray_scout_spec": spec.name,
                              "fidelity": spec.fidelity})
    # On a cluster every node runs the ray_scout its setup installed, or a job's working_dir.
    if address:
        ray.init(address=address, job_config=job, configure_logging=False)
    else:
        ray.init(resources={"edge": len(spec.agent_names), "cloud": 1},
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
                 include_dashboard=dashboard, job_config=job, configure_logging=False)
    _take_signals_back()
    return True


def _take_signals_back() -> None:
    """Ray's core worker puts its own C-level SIGINT handler in place of Python's (ray 2.60:
    a driver waiting in ``ray.wait`` never sees KeyboardInterrupt, and the run goes on to
    its end), and makes SIGTERM a bare exit. Ctrl-C interrupts the run again, SIGTERM ends
    it the same way; both tear the links down."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _terminate)


def placement(spec: Spec) -> Placement:
    """Where this trial's actors go on the Ray that ``start_ray`` connected to."""
    import ray

    return place(list(spec.groups_by_agent()), alive_nodes(ray.nodes()), CLOUD_PORT)


def _gpu_count() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


@dataclass
class TrialLinks:
    """A trial's shaped links and how its actors reach each other over them."""

    managers: list  # link manager actors: the Allocator applies every split through all
    manager_names: list[str]  # their actor names, what the Allocator gets (``ActorByName``)
    cloud_addresses: list[tuple[str, int]]  # the cloud actor serves on each
    cloud_netns: str | None
    cloud_options: dict  # Ray placement of the cloud actor
    # agent -> (cloud address, its namespace, its own source address where it shares one)
    agent_route: dict[str, tuple[tuple[str, int], str | None, str | None]]
    agent_options: dict[str, dict]  # agent -> its Ray placement (one edge slot each)


def lab_links(spec: Spec, names: list[str], run_id: str, prefix: str) -> TrialLinks:
    """One machine: a ``LinkManager`` builds the lab-in-a-box's namespaces and bottleneck.
    ``prefix`` starts its actor's name (``<prefix>links``)."""
    import ray

    from ray_scout.actors.link_manager import LinkManager

    groups = spec.groups_by_agent()
    manager = ray.remote(LinkManager).options(num_cpus=0, max_restarts=0, name=f"{prefix}links").remote(
        {n: groups[n].access for n in names}, spec.bottleneck, capacity_trace(spec).rate_at(0.0),
        run_id=run_id, impairment=spec.impairment, borrow=spec.borrow, access_rate_bps=spec.access_rate_bps,
        site_size=spec.site_size)
    addresses = ray.get(manager.addresses.remote())
    cloud = (CLOUD_ADDRESS, CLOUD_PORT)
    shared = spec.site_size > 1
    return TrialLinks([manager], [f"{prefix}links"], [cloud], addresses["cloud"][1],
                      {"resources": {"cloud": 1}},
                      {n: (cloud, addresses[n][1], addresses[n][0] if shared else None)
                       for n in names},
                      {n: {"resources": {"edge": 1}} for n in names})


def cluster_links(spec: Spec, where: Placement, rates_bps: dict[str, float], prefix: str,
                  cloud_share: float = 1.0) -> TrialLinks:
    """A cluster: one ``NodeLinkManager`` per edge node shapes its interface to the cloud node
    (actor ``<prefix>links@<node address>``).
    ``cloud_share`` of the ``cloud`` resource goes to this trial's cloud actor (a sweep spread
    over M edge nodes runs M clouds at once on the cloud node, 1/M each)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ray_scout.actors.link_manager import NodeLinkManager

    def on(node) -> dict:
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node.node_id, soft=False)}

    groups = spec.groups_by_agent()
    capacity = capacity_trace(spec).rate_at(0.0)
    cloud_ip = where.cloud.address
    managers, names = [], []
    for node in where.nodes():
        agents = where.agents_on(node)
        names.append(f"{prefix}links@{node.address}")
        managers.append(ray.remote(NodeLinkManager).options(
            num_cpus=0, max_restarts=0, name=names[-1], **on(node)).remote(
            cloud_ip, {a: where.cloud_port[a] for a in agents},
            {a: groups[a].access for a in agents}, spec.bottleneck, capacity,
            dict(rates_bps), impairment=spec.impairment, borrow=spec.borrow,
            access_rate_bps=spec.access_rate_bps))
    ray.get([m.node.remote() for m in managers])  # built (or failed) before anything starts
    return TrialLinks(managers, names,
                      [(cloud_ip, where.cloud_port[a]) for a in where.agent_node], None,
                      {"resources": {"cloud": cloud_share}, **on(where.cloud)},
                      {a: ((cloud_ip, where.cloud_port[a]), None, None) for a in where.agent_node},
                      {a: {"resources": {"edge": 1}, **on(n)} for a, n in where.agent_node.items()})


def edge_host_groups(spec: Spec, links: TrialLinks, cores: int) -> list[tuple[list[str], dict]]:
    """Agents grouped into edge hosts, per node at most ``cores`` of them, with their Ray
    options: a host takes one ``edge`` slot per agent, on the node its agents were placed on."""
    by_node: dict[str, list[str]] = {}
    for name in spec.agent_names:
        by_node.setdefault(repr(links.agent_options[name]), []).append(name)
    groups = []
    for members in by_node.values():
        for group in edge_hosts(members, max(1, cores // len(by_node)),
                                one_per_agent=spec.fidelity == "full"):
            options = dict(links.agent_options[group[0]])
            options["resources"] = {**options.get("resources", {}), "edge": len(group)}
            groups.append((group, options))
    return groups


def trial_dir(out: Path, index: int, policy: str, allocator: str) -> Path:
    """Where a trial's recorder appends its rows (JSON lines, one per finished row)."""
    return out / "raw" / f"{index:02d}_{policy.replace(':', '-')}_{allocator}"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during an emulated run, after teardown: the rows recorded until then ride along."""

    def __init__(self, frames: dict[str, pd.DataFrame], trials: list[dict], detail: str):
        super().__init__(detail)
        self.frames = frames
        self.trials = trials
        self.detail = detail


def finished_trials(out: Path) -> dict[int, dict]:
    """The trials a run in ``out`` finished (``FINISHED``, one JSON line each, by index)."""
    path = out / FINISHED
    if not path.exists():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        if line.strip():
            trial = json.loads(line)
            done[trial["index"]] = trial
    return done


class Testbed:
    """One experiment's links, cloud, recorder and edge hosts: started once, reused by every
    trial (policy x allocator), which only resets them. ``close`` tears all of it down.

    A trial brings its own allocator actor and the agents' configuration (policy, first
    grant); the hosts rebuild their agents from it (models stay loaded in their processes).
    """

    def __init__(self, spec: Spec, where: Placement, texts: dict, prefix: str | None = None,
                 cloud_share: float = 1.0):
        import ray

        from ray_scout.actors.cloud import CloudActor
        from ray_scout.actors.edge import EdgeHost
        from ray_scout.actors.recorder import Recorder

        self.spec, self.where = spec, where
        # Actor names: tests and operators find them by these (a sweep's points running at
        # once each have their own).
        self.prefix = prefix or f"{spec.name}/"
        self.actors: list = []
        self.links: TrialLinks | None = None
        self.cloud = None
        self.started = time.time()
        try:
            self.recorder = ray.remote(Recorder).options(
                num_cpus=0, name=self.prefix + "recorder").remote(None)
            self.actors.append(self.recorder)
            trace = capacity_trace(spec)
            names = spec.agent_names
            equal = {n: trace.rate_at(0.0) / len(names) for n in names}
            self.run_id = f"{os.getpid() % 0xFFFF:04x}00"
            # Who may use the cloud's port: the actors this experiment hands it to through
            # Ray (the port itself is reachable from the lab network on a cluster).
            self.token = secrets.token_bytes(32)
            self.links = (cluster_links(spec, where, equal, self.prefix, cloud_share)
                          if where.cluster else lab_links(spec, names, self.run_id, self.prefix))
            self.actors += self.links.managers
            self.cloud = ray.remote(CloudActor).options(
                num_cpus=0, num_gpus=min(1, _gpu_count()) * cloud_share, max_restarts=2,
                max_concurrency=4,
                name=self.prefix + "cloud", **self.links.cloud_options).remote(
                "cloud0", self.links.cloud_addresses, self.links.cloud_netns,
                cloud_service(spec, texts), slots=spec.cloud_slots, connections=len(names) + 4,
                max_batch=spec.cloud_max_batch, batch_window_s=spec.cloud_batch_window_s,
                token=self.token)
            self.actors.append(self.cloud)
            ray.get(self.cloud.ready.remote())
            cores = int(ray.cluster_resources().get("CPU", 1))
            self.hosts = []
            self.host_names: list[str] = []
            for group, options in edge_host_groups(spec, self.links, cores):
                name = f"host{len(self.hosts)}"
                self.host_names.append(self.prefix + name)
                self.hosts.append((group, ray.remote(EdgeHost).options(
                    num_cpus=0, max_restarts=2, max_task_retries=2, max_concurrency=4,
                    name=self.prefix + name, **options).remote(
                    name, ActorByName(self.prefix + "recorder"), group)))
            self.actors += [h for _, h in self.hosts]
        except BaseException:
            self.close()
            raise
        self.start_s = time.time() - self.started

    def close(self) -> list[Exception]:
        """Stop the cloud, remove the links, close the recorder, kill every actor; every
        step is tried, and what failed is returned rather than raised."""
        problems = _tear_down(self.cloud, self.links, self.recorder, self.actors)
        self.cloud, self.links, self.actors = None, None, []
        return problems

    def trial(self, policy: str, allocator: str, index: int, out: Path, shapes: dict,
              work: dict, progress=None, texts: dict | None = None) -> dict:
        """One combination on the running testbed; returns its summary."""
        import ray

        from ray_scout.actors.allocator import Allocator

        spec, links = self.spec, self.links
        texts = texts or {}
        raw = trial_dir(out, index, policy, allocator)
        if raw.exists():
            for stale in raw.glob("*.jsonl"):
                stale.unlink()
        ray.get(self.recorder.open.remote(str(raw)))
        trace = capacity_trace(spec)
        groups = spec.groups_by_agent()
        first = allocate(allocator, demands(spec, shapes, work, policy), trace.rate_at(0.0),
                         spec.allocation_objective)
        started = time.time()
        cloud_before = ray.get(self.cloud.stats.remote())
        # The links start with guarantees that may borrow up to the link rate; the first
        # split is in force before the first arrival, not from the allocator's first tick.
        ray.get([m.apply.remote(trace.rate_at(0.0), dict(first.rate_bps))
                 for m in links.managers])
        ray.get([m.changes.remote() for m in links.managers])  # the last trial's log
        configs = {}
        for name in spec.agent_names:
            g = groups[name]
            cloud_address, netns, source = links.agent_route[name]
            configs[name] = AgentConfig(
                name=name, netns=netns, cloud_address=cloud_address, source_address=source,
                policy=policy, allocator=allocator, quality=quality_profile(spec, g),
                shapes=shapes[g.name], cloud_model=g.cloud_model, deadline_s=g.deadline_s,
                arrivals=work[name], estimator=g.estimator,
                initial_bps=max(first.rate_bps[name], 1.0), safety_margin=spec.safety_margin,
                new_tokens=g.new_tokens, model=g.model, arrival_rate_hz=g.arrival_rate_hz,
                edge_options=dict(scout_retention=g.scout_retention,
                                  protected_layers=tuple(g.protected_layers),
                                  max_new_tokens=g.new_tokens),
                samples=texts.get(name, ()), token=self.token)
        hosts = [(ray.put([configs[a] for a in group]), host) for group, host in self.hosts]
        ray.get([host.prepare.remote(ref) for ref, host in hosts])  # models loaded before t0
        # Restarted like the hosts: a dead allocator would freeze every link at its last
        # split (zero, if it died in an outage) for the rest of the trial.
        alloc = ray.remote(Allocator).options(
            num_cpus=0, max_concurrency=2, max_restarts=2, max_task_retries=2,
            name=f"{self.prefix}allocator{index}").remote(
            # Names, not handles: an actor with restarts given handles draws Ray's #53727
            # warning, and its restart may not find them (actors/by_name.py).
            allocator, trace, spec.epoch_s, spec.duration_s,
            [ActorByName(n) for n in self.host_names],
            [ActorByName(n) for n in links.manager_names],
            ActorByName(self.prefix + "recorder"), objective=spec.allocation_objective,
            closed_loop=spec.closed_loop)
        ray.get(alloc.__ray_ready__.remote())  # its process is up before the clock starts
        errors = []
        try:
            t0 = time.time() + 0.5
            refs = [alloc.run.remote(t0)] + [host.run.remote(ref, t0) for ref, host in hosts]
            limit = t0 + spec.duration_s + max(g.deadline_s for g in spec.agents) + DRAIN_SLACK_S
            pending = list(refs)
            while pending and time.time() < limit:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
                for ref in done:
                    try:
                        ray.get(ref)
                    except Exception as exc:  # a task that failed for good: noted, others go on
                        errors.append(f"{type(exc).__name__}: {exc}"[:500])
                if progress is not None:
                    counts = ray.get(self.recorder.counts.remote())
                    progress(counts.get("requests", 0))
            if pending:
                errors.append(f"{len(pending)} tasks still running at the drain limit; stopped")
                for ref in pending:
                    ray.cancel(ref, force=False)
            lost = _account_for_every_request(self.recorder, work, spec, policy, allocator)
        finally:
            ray.kill(alloc)
        for message in errors:
            self.recorder.add.remote("events", {"wall_time_s": time.time(), "source": "driver",
                                                "event": "task_failed", "detail": message})
        links_rows = [row for rows in ray.get([m.shaping.remote() for m in links.managers])
                      for row in rows]
        changes = [row for rows in ray.get([m.changes.remote() for m in links.managers])
                   for row in rows]
        cloud_after = ray.get(self.cloud.stats.remote())
        cloud_stats = {k: v - cloud_before.get(k, 0) if k != "queued" else v
                       for k, v in cloud_after.items()}
        ray.get(self.recorder.add_many.remote("rate_changes", changes))
        ray.get(self.recorder.close.remote())
        return {"policy": policy, "allocator": allocator, "raw": str(raw), "links": links_rows,
                "requests_issued": sum(len(w) for w in work.values()), "requests_lost": lost,
                "placement": self.where.describe(), "cloud": cloud_stats, "errors": errors,
                "wall_s": time.time() - started, "testbed_start_s": self.start_s}


def cloud_service(spec: Spec, texts: dict):
    """The cloud's service for the spec's fidelity: real models, or their profiles."""
    if spec.fidelity == "full":
        from ray_scout.core.stages.full import FullService  # torch: only for full runs

        documents = sorted({text for rows in texts.values() for text, _, _ in rows})
        return FullService({m: m for m in spec.cloud_models}, documents,
                           max(g.new_tokens for g in spec.agents))
    return ProfiledService({m: load_timing(t, spec.base) for m, t in spec.cloud_models.items()})


# How long the driver waits for rows still on their way to the recorder (sent by agents
# whose run has returned) before it counts a request as lost.
SETTLE_S = 2.0


def _account_for_every_request(recorder, work: dict, spec: Spec, policy: str,
                               allocator: str) -> int:
    """Record an error row for every arrival of the workload that has no row: a request
    whose agent was killed mid-request (its state died with the process), skipped after a
    restart, or still running at the drain limit. Returns how many there were, so that
    requests issued always equal rows recorded."""
    import ray

    counts, settle_end = None, time.monotonic() + SETTLE_S
    while time.monotonic() < settle_end:  # until the recorder's count stops moving
        now = ray.get(recorder.counts.remote()).get("requests", 0)
        if now == counts:
            break
        counts = now
        time.sleep(0.2)
    recorded = ray.get(recorder.recorded_request_ids.remote())
    groups = spec.groups_by_agent()
    lost = [dict(request_id=a.request_id, agent=agent, policy=policy, allocator=allocator,
                 t_arrival_s=a.t_s, context_tokens=a.context_tokens,
                 deadline_s=groups[agent].deadline_s,
                 deadline_met=False, cancelled=False, outcome="error", quality=0.0,
                 error="lost: no row was recorded for this request (its agent was killed or "
                       "restarted before it finished, or it ran past the drain limit)")
            for agent, arrivals_ in work.items() for a in arrivals_ if a.request_id not in recorded]
    if lost:
        ray.get(recorder.add_many.remote("requests", lost))
    return len(lost)


def _tear_down(cloud, links: TrialLinks | None, recorder, actors: list) -> list[Exception]:
    """Close the cloud, remove the links, flush the recorder, kill every actor; every step is
    tried, and what failed is returned rather than raised."""
    import ray

    problems: list[Exception] = []
    if cloud is not None:
        try:
            ray.get(cloud.close.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a dead cloud has nothing left to close
            pass
    steps = []
    if links is not None:
        steps.append(lambda: ray.get([m.teardown.remote() for m in links.managers]))
    steps.append(lambda: ray.get(recorder.close.remote()))
    steps += [lambda actor=actor: ray.kill(actor) for actor in actors]
    for step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - returned to the caller, which reports it
            problems.append(exc)
    return problems


def _collect(out: Path, trials: list[dict]) -> dict[str, pd.DataFrame]:
    tables = {t: [] for t in TABLES}
    for trial in trials:
        for table in TABLES:
            rows = read_table(trial["raw"], table)
            for row in rows:
                row.setdefault("policy", trial["policy"])
                row.setdefault("allocator", trial["allocator"])
            tables[table] += rows
    frames = {t: pd.DataFrame(rows) for t, rows in tables.items()}
    if not frames["requests"].empty:
        frames["requests"] = frames["requests"].sort_values(
            ["policy", "allocator", "request_id"], ignore_index=True)
    return frames


def write_tables(out: Path, frames: dict[str, pd.DataFrame]) -> None:
    for name, frame in frames.items():
        if frame.columns.empty and name in EMPTY_COLUMNS:
            frame = pd.DataFrame(columns=EMPTY_COLUMNS[name])
        frame.to_csv(out / f"{name}.csv", index=False)
        if not frame.empty:
            frame.to_parquet(out / f"{name}.parquet", index=False)


def run_emulated(spec: Spec, out: Path, address: str | None = None,
                 show_progress: bool = True, dashboard: bool = True,
                 resume: bool = False, progress_file: TextIO | None = None,
                 where: Placement | None = None, prefix: str | None = None,
                 cloud_share: float = 1.0) -> dict[str, pd.DataFrame]:
    """``full`` or ``profiled``: real links, real TCP, actors under Ray. Progress bars go to
    ``progress_file`` (default: standard error).

    Without ``address`` the lab-in-a-box is built on this machine, which needs root here; on a
    cluster the link managers need it on their nodes (and say so if they lack it). Each trial
    that ends is appended to ``FINISHED``; ``resume`` skips the ones already there. Ctrl-C
    tears the current trial down, stops the Ray this call started and raises ``Interrupted``
    with the rows recorded so far (the unfinished trial's included).

    ``where`` overrides the placement over the whole cluster, ``prefix`` the actors' names and
    ``cloud_share`` the cloud actor's share of the cloud node: a sweep running several points
    at once, one per edge node, passes all three (``sweep._run_emulated``).
    """
    import ray
    from tqdm import tqdm

    shapes, work = request_shapes(spec), workloads(spec)
    texts = samples(spec, work) if spec.fidelity == "full" else {}
    total = sum(len(w) for w in work.values())
    done = finished_trials(out) if resume else {}
    if not resume:
        (out / FINISHED).unlink(missing_ok=True)
    trials, current, testbed = [], None, None
    started_ray = False
    try:
        started_ray = start_ray(spec, address, dashboard)
        where = where or placement(spec)
        if where.cluster:
            per_node: dict[str, int] = {}
            for node in where.agent_node.values():
                per_node[node.address] = per_node.get(node.address, 0) + 1
            check_placement(per_node)
        elif address is None:  # the lab-in-a-box on this machine, as root (``validate``)
            _remove_stale_links(progress_file)
        testbed = Testbed(spec, where, texts, prefix, cloud_share)
        for index, (policy, allocator) in enumerate(spec.combinations()):
            previous = done.get(index)
            if previous is not None and (previous["policy"],
                                         previous["allocator"]) == (policy, allocator):
                trials.append(previous)
                continue
            current = (index, policy, allocator)
            bar = tqdm(total=total, desc=f"{policy} / {allocator}", unit="req",
                       disable=not show_progress, file=progress_file)

            def progress(n: int, bar=bar) -> None:
                bar.update(n - bar.n)

            try:
                trial = testbed.trial(policy, allocator, index, out, shapes, work, progress,
                                      texts)
            finally:  # closed on the way out too: a bar left open redraws after the exit line
                bar.close()
            trial["index"] = index
            with open(out / FINISHED, "a") as finished:
                finished.write(json.dumps(trial, default=str) + "\n")
            trials.append(trial)
            current = None
    except KeyboardInterrupt:
        partial = []
        if current is not None:
            index, policy, allocator = current
            partial = [{"index": index, "policy": policy, "allocator": allocator,
                        "raw": str(trial_dir(out, index, policy, allocator)), "links": [],
                        "unfinished": True}]
        detail = (f"interrupted (Ctrl-C) during trial {current[0] + 1} of "
                  f"{len(spec.combinations())} ({current[1]} / {current[2]})" if current
                  else "interrupted (Ctrl-C) between trials")
        raise Interrupted(_collect(out, trials + partial), trials + partial, detail) from None
    except BaseException as failure:
        # The run's own failure is what the user must see; a teardown that fails as well is
        # added to it as a note, never raised in its place.
        if testbed is not None:
            for problem in testbed.close():
                failure.add_note(f"tearing the testbed down also failed: {problem}")
            testbed = None
        raise
    finally:
        problems = testbed.close() if testbed is not None else []
        if started_ray:
            ray.shutdown()
    if problems:
        raise problems[0]
    _write_run_record(out, trials)
    return _collect(out, trials)


def _remove_stale_links(report_to: TextIO | None) -> None:
    """Namespaces of earlier runs on this machine whose process died (a SIGKILLed driver takes
    its link manager with it, and nothing tears their links down): removed before this run
    builds its own. Live runs' and other tools' are never touched (``net.owner``)."""
    from ray_scout.net.cleanup import remove_stale

    try:
        removed = remove_stale()
    except Exception as exc:  # noqa: BLE001 - another run's leftovers must not stop this one
        print(f"scout run: could not remove what a dead run left ({type(exc).__name__}: {exc}); "
              "`scout net cleanup --stale` tries again", file=report_to or sys.stderr)
        return
    for prefix, found in removed.items():
        print(f"scout run: removed {len(found.namespaces)} namespaces that a dead run left "
              f"({prefix}*)", file=report_to or sys.stderr)


def _write_run_record(out: Path, trials: list[dict]) -> None:
    links = [dict(row, policy=t["policy"], allocator=t["allocator"])
             for t in trials for row in t["links"]]
    pd.DataFrame(links).to_csv(out / "links.csv", index=False)
    (out / "run.json").write_text(json.dumps(
        {"trials": [{k: v for k, v in t.items() if k != "links"} for t in trials]},
        indent=2, default=str))


def simulated_agents(spec: Spec) -> tuple:
    """The simulator's agents for ``spec`` (what every simulated trial of it shares),
    replaying the testbed's seeded arrival schedule, so its rows pair with an emulated run's."""
    from ray_scout.experiments.simulate import AgentSpec

    simulated_estimator(spec)
    shapes = request_shapes(spec)
    work = workloads(spec)
    agents = []
    for name, g in spec.groups_by_agent().items():
        table = {t: s.payload_bytes for t, s in shapes[g.name].items()}
        median = sorted(g.context_tokens)[len(g.context_tokens) // 2]
        profile = load_profile(g.access)
        agents.append(AgentSpec(name, g.arrival_rate_hz, g.deadline_s, table.__getitem__,
                                quality_profile(spec, g), shapes[g.name][median].latency,
                                g.context_tokens,
                                access_rate_bps=spec.access_rate_bps or profile.up.rate_bps,
                                schedule=tuple((a.t_s, a.context_tokens) for a in work[name]),
                                # A smaller MTU: every shaper counts more header per payload.
                                link_share=profile.payload_share))
    return tuple(agents)


def simulated_trial(spec: Spec, policy: str, allocator: str,
                    agents: tuple | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One combination through the discrete-event simulator: (requests, epochs)."""
    from ray_scout.experiments.simulate import SimConfig, simulate

    agents = agents or simulated_agents(spec)
    pol = {name: make_policy(policy, quality_profile(spec, g), spec.safety_margin)
           for name, g in spec.groups_by_agent().items()}
    req, ep = simulate(SimConfig(agents, capacity_trace(spec), pol, allocator,
                                 simulated_estimator(spec), epoch_s=spec.epoch_s,
                                 duration_s=spec.duration_s, seed=spec.seed,
                                 objective=spec.allocation_objective,
                                 closed_loop=spec.closed_loop,
                                 # A spec's rates are the lab's: HTB rates of whole frames.
                                 delivered_ratio=TCP_PAYLOAD_PER_FRAME))
    return (req.assign(policy=policy, allocator=allocator),
            ep.assign(policy=policy, allocator=allocator))


def run_simulated(spec: Spec, out: Path) -> dict[str, pd.DataFrame]:
    """The same spec through the discrete-event simulator (network and compute modelled)."""
    agents = simulated_agents(spec)
    trials = [simulated_trial(spec, policy, allocator, agents)
              for policy, allocator in spec.combinations()]
    return {"requests": pd.concat([r for r, _ in trials], ignore_index=True),
            "epochs": pd.concat([e for _, e in trials], ignore_index=True),
            "rate_changes": pd.DataFrame(), "events": pd.DataFrame()}


def run_experiment(spec: Spec, out: Path, address: str | None = None,
                   show_progress: bool = True, dashboard: bool = True,
                   resume: bool = False,
                   progress_file: TextIO | None = None) -> dict[str, pd.DataFrame]:
    """Run ``spec`` at its fidelity, write tables, the summary and the plots to ``out``.

    Everything that can be checked is checked (``validate``) before ``out`` is created. On
    Ctrl-C the rows recorded so far are written all the same, ``meta.json`` and the summary
    say the run is incomplete, and ``KeyboardInterrupt`` (``Interrupted``) is raised.
    """
    from ray_scout.experiments.report import write_report

    validate(spec, address)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    interrupted = None
    if spec.fidelity == "simulated":
        frames = run_simulated(spec, out)
    else:
        try:
            frames = run_emulated(spec, out, address, show_progress, dashboard, resume,
                                  progress_file)
        except Interrupted as stop:
            interrupted, frames = stop, stop.frames
            _write_run_record(out, stop.trials)
    write_tables(out, frames)
    meta = {"spec": spec.name, "fidelity": spec.fidelity, "wall_s": time.time() - started,
            "finished_unix_s": time.time(), "complete": interrupted is None,
            **provenance.record()}
    if interrupted is not None:
        meta["interrupted"] = interrupted.detail
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    write_report(spec, out, frames)
    if interrupted is not None:
        raise interrupted
    return frames


# --- CLI --------------------------------------------------------------------------------
FIDELITY_HELP = """fidelities (one spec, three ways to run it):
  full       real models in the actors (edge prefill, Q2C, codecs; the cloud answers),
             real payloads over real shaped links; answers scored against the task
  profiled   compute slept from measured or published stage times, real payload bytes of
             the exact size over real shaped links; quality from the spec's quality profile
  simulated  network and compute both modelled (Paper B's method): no root, no Ray, seconds
full and profiled need root (network namespaces) unless --address names a cluster."""


def add_arguments(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = FIDELITY_HELP
    parser.add_argument("spec", nargs="?",
                        help="a spec file, or a shipped spec's name in experiments/ (demo, "
                        "adaptive_vs_static, allocation_congestion, ...); not with --resume")
    parser.add_argument("--resume", type=Path, metavar="OUT",
                        help="continue the interrupted run in OUT, skipping its finished trials")
    parser.add_argument("--fidelity", choices=FIDELITIES,
                        help="run at this fidelity instead of the spec's (see below)")
    parser.add_argument("--address", help="an existing Ray cluster ('auto'); default: a "
                        "local Ray started for this run")
    parser.add_argument("--out", type=Path, help="results directory (default results/<name>)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (for logs)")
    parser.add_argument("--no-dashboard", action="store_true",
                        help="start the local Ray without its dashboard (one process less to "
                        "start: the netem lab's guest, which no browser reaches, runs this way)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Ray's and the actors' output on the terminal (by default "
                        "it goes to <out>/run.log)")
    parser.add_argument("--serial", action="store_true", help="a simulated sweep's trials "
                        "in this process, one after another (default: Ray tasks on every core)")
    parser.add_argument("--reference", type=Path, help="a sweep's results directory of the "
                        "same plan at another fidelity: drawn dashed on this sweep's curves")


def run(args) -> int:
    """``scout run``: exit 0 on success, 2 on a bad spec, 77 without a needed privilege, 130
    on Ctrl-C, 143 on SIGTERM. Nothing is created (no output folder, no Ray) until the spec,
    its profiles and the privileges it needs have been checked."""
    from ray_scout.experiments.console import loud, quiet
    from ray_scout.experiments.plan import load_plan
    from ray_scout.net.cli import EXIT_NO_PRIVILEGE
    from ray_scout.net.errors import CapabilityError

    if (args.spec is None) == (args.resume is None):
        print("scout run: give a spec, or --resume OUT (a folder an earlier run wrote)",
              file=sys.stderr)
        return 2
    if args.resume is not None:
        args.spec, args.out = args.resume / "spec.yaml", args.resume
        if args.fidelity is None and (args.resume / "meta.json").exists():
            args.fidelity = json.loads((args.resume / "meta.json").read_text()).get("fidelity")
    try:
        path = spec_path(args.spec)
        plan = load_plan(path, args.fidelity)
        spec = plan.base
        if not plan.is_sweep:  # a sweep checks each of its points as it plans them
            validate(spec, args.address)
    except SpecError as exc:
        print(f"scout run: {exc}", file=sys.stderr)
        return 2
    except CapabilityError:
        print(f"scout run: --fidelity {spec.fidelity} builds network namespaces and qdiscs on this "
              "machine, which needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN); run `sudo scout run "
              f"{args.spec}`, or `scout run {args.spec} --fidelity simulated`, which needs neither",
              file=sys.stderr)
        return EXIT_NO_PRIVILEGE
    out = args.out or REPO_ROOT / "results" / spec.name
    out.mkdir(parents=True, exist_ok=True)
    if args.resume is None:
        # What `scout report` re-reads, and the record of what ran: --fidelity written in.
        (out / "spec.yaml").write_text(spec_text_as_run(path.read_text(), spec.fidelity))
    console = loud() if args.verbose else quiet(out)
    try:
        if plan.is_sweep:  # finished trials in ``out`` are kept, not rerun (``ledger``)
            from ray_scout.experiments.sweep import run_sweep

            run_sweep(plan, out, address=args.address, serial=args.serial,
                      show_progress=not args.no_progress,
                      command="scout " + " ".join(sys.argv[1:]), reference=args.reference)
        else:
            run_experiment(spec, out, args.address, not args.no_progress,
                           dashboard=not args.no_dashboard, resume=args.resume is not None, progress_file=console.err)
        if plan.companion is not None:  # its verdict heads the summary just written
            from ray_scout.experiments.sweep import run_companion

            run_companion(plan.companion, out, show_progress=not args.no_progress,
                          command="scout " + " ".join(sys.argv[1:]))
    except SpecError as exc:
        print(f"scout run: {exc}", file=console.err)
        return 2
    except KeyboardInterrupt:
        why = "stopped (SIGTERM)" if TERMINATED else "interrupted"
        print(f"scout run: {why}; links and actors were torn down, the rows of finished "
              f"requests are in {out}; `scout run --resume {out}` continues", file=console.err)
        return 143 if TERMINATED else 130
    except Exception as exc:  # the traceback goes where Ray's messages go; a line here
        traceback.print_exc()
        where = f"; the traceback is in {console.log}" if console.log else ""
        print(f"scout run: failed: {type(exc).__name__}: {exc}"[:2000] + where,
              file=console.err)
        return 1
    print(f"results in {out} (summary.md)", file=console.out)
    return 0
