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

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ray_scout.actors.edge import AgentConfig, make_policy, typical_demand
from ray_scout.actors.recorder import read_table
from ray_scout.core.control.allocation import Allocation, allocate
from ray_scout.core.stages.profiled import (
    ProfiledService, latency_model, load_timing, profiled_payload_bytes, selected_tokens,
)
from ray_scout.core.stages.request import Arrival, RequestShape
from ray_scout.experiments.placement import Placement, alive_nodes, place
from ray_scout.experiments.spec import (
    REPO_ROOT, Spec, SpecError, arrivals, capacity_trace, check_allocators,
    quality_profile,
)
from ray_scout.net.profiles import load_profile
from ray_scout.net.topology import CLOUD_ADDRESS

CLOUD_PORT = 7300
TABLES = ("requests", "epochs", "rate_changes", "events")
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


# --- Ray --------------------------------------------------------------------------------
def start_ray(spec: Spec, address: str | None, dashboard: bool = True) -> bool:
    """Connect to ``address`` or start a local Ray with ``edge``/``cloud`` resources.

    Returns whether this call started Ray (and so must shut it down).
    """
    import ray

    if ray.is_initialized():
        return False
    if address:  # every node of a cluster runs the ray_scout its setup installed
        ray.init(address=address, log_to_driver=False)
        return True
    ray.init(resources={"edge": len(spec.agent_names), "cloud": 1},
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
             include_dashboard=dashboard, log_to_driver=False, configure_logging=False)
    return True


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
    cloud_addresses: list[tuple[str, int]]  # the cloud actor serves on each
    cloud_netns: str | None
    cloud_options: dict  # Ray placement of the cloud actor
    agent_route: dict[str, tuple[tuple[str, int], str | None]]  # agent -> cloud address, netns
    agent_options: dict[str, dict]  # agent -> its Ray placement


def lab_links(spec: Spec, names: list[str], run_id: str) -> TrialLinks:
    """One machine: a ``LinkManager`` builds the lab-in-a-box's namespaces and bottleneck."""
    import ray

    from ray_scout.actors.link_manager import LinkManager

    groups = spec.groups_by_agent()
    trace = capacity_trace(spec)
    manager = ray.remote(LinkManager).options(num_cpus=0, max_restarts=0).remote(
        {n: groups[n].access for n in names}, spec.bottleneck, trace.rate_at(0.0),
        run_id=run_id, impairment=spec.impairment, borrow=spec.borrow,
        access_rate_bps=spec.access_rate_bps)
    addresses = ray.get(manager.addresses.remote())
    cloud = (CLOUD_ADDRESS, CLOUD_PORT)
    return TrialLinks([manager], [cloud], addresses["cloud"][1], {"resources": {"cloud": 1}},
                      {n: (cloud, addresses[n][1]) for n in names},
                      {n: {"resources": {"edge": 1}} for n in names})


def cluster_links(spec: Spec, where: Placement, first: Allocation) -> TrialLinks:
    """A cluster: one ``NodeLinkManager`` per edge node shapes its interface to the cloud node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ray_scout.actors.link_manager import NodeLinkManager

    def on(node) -> dict:
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node.node_id, soft=False)}

    groups = spec.groups_by_agent()
    capacity = capacity_trace(spec).rate_at(0.0)
    cloud_ip = where.cloud.address
    managers = []
    for node in where.nodes():
        agents = where.agents_on(node)
        managers.append(ray.remote(NodeLinkManager).options(num_cpus=0, max_restarts=0,
                                                            **on(node)).remote(
            cloud_ip, {a: where.cloud_port[a] for a in agents},
            {a: groups[a].access for a in agents}, spec.bottleneck, capacity,
            dict(first.rate_bps), impairment=spec.impairment, borrow=spec.borrow,
            access_rate_bps=spec.access_rate_bps))
    ray.get([m.node.remote() for m in managers])  # built (or failed) before anything starts
    return TrialLinks(managers, [(cloud_ip, where.cloud_port[a]) for a in where.agent_node], None,
                      {"resources": {"cloud": 1}, **on(where.cloud)},
                      {a: ((cloud_ip, where.cloud_port[a]), None) for a in where.agent_node},
                      {a: {"resources": {"edge": 1}, **on(n)} for a, n in where.agent_node.items()})


def run_trial(spec: Spec, policy: str, allocator: str, index: int, out: Path,
              shapes: dict, work: dict, progress=None, texts: dict | None = None,
              where: Placement = Placement(cluster=False)) -> dict:
    """One combination end to end; returns its summary (rows, wall time, errors)."""
    import ray

    from ray_scout.actors.allocator import Allocator
    from ray_scout.actors.cloud import CloudActor
    from ray_scout.actors.edge import EdgeAgent
    from ray_scout.actors.recorder import Recorder

    texts = texts or {}
    raw = out / "raw" / f"{index:02d}_{policy.replace(':', '-')}_{allocator}"
    if raw.exists():
        for stale in raw.glob("*.jsonl"):
            stale.unlink()
    trace = capacity_trace(spec)
    groups = spec.groups_by_agent()
    names = list(groups)
    first = allocate(allocator, demands(spec, shapes, work, policy), trace.rate_at(0.0))
    run_id = f"{os.getpid() % 0xFFFF:04x}{index:02x}"
    prefix = f"{spec.name}/{index}/"  # actor names: tests and operators find them by these
    recorder = ray.remote(Recorder).options(num_cpus=0, name=prefix + "recorder").remote(
        str(raw))
    started = time.time()
    actors, cloud, links = [recorder], None, None
    try:
        links = (cluster_links(spec, where, first) if where.cluster
                 else lab_links(spec, names, run_id))
        actors += links.managers
        # The links start with guarantees that may borrow up to the link rate; the first
        # split is in force before the first arrival, not from the allocator's first tick.
        ray.get([m.apply.remote(trace.rate_at(0.0), dict(first.rate_bps))
                 for m in links.managers])
        if spec.fidelity == "full":
            from ray_scout.core.stages.full import FullService  # torch: only for full runs

            documents = sorted({text for rows in texts.values() for text, _, _ in rows})
            service = FullService({m: m for m in spec.cloud_models}, documents,
                                  max(g.new_tokens for g in spec.agents))
        else:
            service = ProfiledService({m: load_timing(t, spec.base)
                                       for m, t in spec.cloud_models.items()})
        cloud = ray.remote(CloudActor).options(
            num_cpus=0, num_gpus=min(1, _gpu_count()), max_restarts=2, max_concurrency=4,
            name=prefix + "cloud", **links.cloud_options).remote(
            "cloud0", links.cloud_addresses, links.cloud_netns, service,
            slots=spec.cloud_slots, connections=len(names) + 4,
            max_batch=spec.cloud_max_batch, batch_window_s=spec.cloud_batch_window_s)
        actors.append(cloud)
        ray.get(cloud.ready.remote())
        agents = {}
        for name in names:
            g = groups[name]
            cloud_address, netns = links.agent_route[name]
            cfg = AgentConfig(
                name=name, netns=netns, cloud_address=cloud_address,
                policy=policy, allocator=allocator, quality=quality_profile(spec, g),
                shapes=shapes[g.name], cloud_model=g.cloud_model, deadline_s=g.deadline_s,
                arrivals=work[name], estimator=g.estimator,
                initial_bps=max(first.rate_bps[name], 1.0), safety_margin=spec.safety_margin,
                new_tokens=g.new_tokens, model=g.model, arrival_rate_hz=g.arrival_rate_hz,
                edge_options=dict(scout_retention=g.scout_retention,
                                  protected_layers=tuple(g.protected_layers),
                                  max_new_tokens=g.new_tokens),
                samples=texts.get(name, ()))
            agents[name] = ray.remote(EdgeAgent).options(
                num_cpus=0, max_restarts=2, max_task_retries=2, max_concurrency=4,
                name=prefix + name, **links.agent_options[name]).remote(cfg, recorder)
        actors += agents.values()
        ray.get([a.demand.remote() for a in agents.values()])
        alloc = ray.remote(Allocator).options(num_cpus=0, max_concurrency=2).remote(
            allocator, trace, spec.epoch_s, spec.duration_s, agents, links.managers, recorder)
        actors.append(alloc)
        t0 = time.time() + 0.5
        refs = [alloc.run.remote(t0)] + [a.run.remote(t0) for a in agents.values()]
        limit = t0 + spec.duration_s + max(g.deadline_s for g in spec.agents) + DRAIN_SLACK_S
        errors, pending = [], list(refs)
        while pending and time.time() < limit:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as exc:  # a task that failed for good: noted, others go on
                    errors.append(f"{type(exc).__name__}: {exc}"[:500])
            if progress is not None:
                counts = ray.get(recorder.counts.remote())
                progress(counts.get("requests", 0))
        if pending:
            errors.append(f"{len(pending)} tasks still running at the drain limit; stopped")
        for message in errors:
            recorder.add.remote("events", {"wall_time_s": time.time(), "source": "driver",
                                           "event": "task_failed", "detail": message})
        links_rows = [row for rows in ray.get([m.shaping.remote() for m in links.managers])
                      for row in rows]
        changes = [row for rows in ray.get([m.changes.remote() for m in links.managers])
                   for row in rows]
        cloud_stats = ray.get(cloud.stats.remote())
        ray.get(recorder.add_many.remote("rate_changes", changes))
    finally:
        if cloud is not None:
            try:
                ray.get(cloud.close.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a dead cloud has nothing left to close
                pass
        if links is not None:
            ray.get([m.teardown.remote() for m in links.managers])
        ray.get(recorder.close.remote())
        for actor in actors:
            ray.kill(actor)
    return {"policy": policy, "allocator": allocator, "raw": str(raw), "links": links_rows,
            "placement": where.describe(), "cloud": cloud_stats, "errors": errors,
            "wall_s": time.time() - started}


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
        frame.to_csv(out / f"{name}.csv", index=False)
        if not frame.empty:
            frame.to_parquet(out / f"{name}.parquet", index=False)


def run_emulated(spec: Spec, out: Path, address: str | None = None,
                 show_progress: bool = True, dashboard: bool = True) -> dict[str, pd.DataFrame]:
    """``full`` or ``profiled``: real links, real TCP, actors under Ray.

    Without ``address`` the lab-in-a-box is built on this machine, which needs root here; on a
    cluster the link managers need it on their nodes (and say so if they lack it).
    """
    import ray
    from tqdm import tqdm

    from ray_scout.net.errors import require_root

    if address is None:
        require_root()
    shapes, work = request_shapes(spec), workloads(spec)
    texts = samples(spec, work) if spec.fidelity == "full" else {}
    for policy in spec.policies:
        check_allocators(spec, demands(spec, shapes, work, policy))
    total = sum(len(w) for w in work.values())
    started_ray = start_ray(spec, address, dashboard)
    trials = []
    try:
        where = placement(spec)
        for index, (policy, allocator) in enumerate(spec.combinations()):
            bar = tqdm(total=total, desc=f"{policy} / {allocator}", unit="req",
                       disable=not show_progress)

            def progress(n: int, bar=bar) -> None:
                bar.update(n - bar.n)

            trials.append(run_trial(spec, policy, allocator, index, out, shapes, work,
                                    progress, texts, where))
            bar.close()
    finally:
        if started_ray:
            ray.shutdown()
    frames = _collect(out, trials)
    links = [dict(row, policy=t["policy"], allocator=t["allocator"])
             for t in trials for row in t["links"]]
    pd.DataFrame(links).to_csv(out / "links.csv", index=False)
    (out / "run.json").write_text(json.dumps(
        {"trials": [{k: v for k, v in t.items() if k != "links"} for t in trials]},
        indent=2, default=str))
    return frames


def simulated_agents(spec: Spec) -> tuple:
    """The simulator's agents for ``spec`` (what every simulated trial of it shares)."""
    from ray_scout.experiments.simulate import AgentSpec

    estimators = {g.estimator for g in spec.agents}
    if len(estimators) != 1:
        raise SpecError(f"simulated fidelity runs one estimator for all agents; the spec has "
                        f"{sorted(estimators)}")
    shapes = request_shapes(spec)
    agents = []
    for name, g in spec.groups_by_agent().items():
        table = {t: s.payload_bytes for t, s in shapes[g.name].items()}
        median = sorted(g.context_tokens)[len(g.context_tokens) // 2]
        access = spec.access_rate_bps or load_profile(g.access).up.rate_bps
        agents.append(AgentSpec(name, g.arrival_rate_hz, g.deadline_s, table.__getitem__,
                                quality_profile(spec, g), shapes[g.name][median].latency,
                                g.context_tokens, access_rate_bps=access))
    return tuple(agents)


def simulated_trial(spec: Spec, policy: str, allocator: str,
                    agents: tuple | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One combination through the discrete-event simulator: (requests, epochs)."""
    from ray_scout.experiments.simulate import SimConfig, simulate

    agents = agents or simulated_agents(spec)
    pol = {name: make_policy(policy, quality_profile(spec, g), spec.safety_margin)
           for name, g in spec.groups_by_agent().items()}
    req, ep = simulate(SimConfig(agents, capacity_trace(spec), pol, allocator,
                                 spec.agents[0].estimator, epoch_s=spec.epoch_s,
                                 duration_s=spec.duration_s, seed=spec.seed))
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
                   show_progress: bool = True, dashboard: bool = True) -> dict[str, pd.DataFrame]:
    """Run ``spec`` at its fidelity, write tables, the summary and the plots to ``out``."""
    from ray_scout.experiments.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if spec.fidelity == "simulated":
        frames = run_simulated(spec, out)
    else:
        frames = run_emulated(spec, out, address, show_progress, dashboard)
    write_tables(out, frames)
    meta = {"spec": spec.name, "fidelity": spec.fidelity, "wall_s": time.time() - started,
            "finished_unix_s": time.time()}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    write_report(spec, out, frames)
    return frames


# --- CLI --------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("spec", type=Path, help="experiments/<name>.yaml")
    parser.add_argument("--fidelity", choices=("full", "profiled", "simulated"),
                        help="override the spec's fidelity")
    parser.add_argument("--address", help="an existing Ray cluster ('auto'); default: a "
                        "local Ray started for this run")
    parser.add_argument("--out", type=Path, help="results directory (default results/<name>)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--serial", action="store_true", help="a simulated sweep's trials "
                        "in this process, one after another (default: Ray tasks on every core)")
    parser.add_argument("--reference", type=Path, help="a sweep's results directory of the "
                        "same plan at another fidelity: drawn dashed on this sweep's curves")


def run(args) -> int:
    """``scout run``: exit 0 on success, 2 on a bad spec, 130 on Ctrl-C."""
    from ray_scout.experiments.plan import load_plan

    try:
        plan = load_plan(args.spec, args.fidelity)
    except SpecError as exc:
        print(f"scout run: {exc}", file=sys.stderr)
        return 2
    spec = plan.base
    out = args.out or REPO_ROOT / "results" / spec.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(args.spec.read_text())  # what `scout report` re-reads
    try:
        if plan.is_sweep:  # finished trials in ``out`` are kept, not rerun (``ledger``)
            from ray_scout.experiments.sweep import run_sweep

            run_sweep(plan, out, address=args.address, serial=args.serial,
                      show_progress=not args.no_progress,
                      command="scout " + " ".join(sys.argv[1:]), reference=args.reference)
        else:
            run_experiment(spec, out, args.address, not args.no_progress)
        if plan.companion is not None:  # its verdict heads the summary just written
            from ray_scout.experiments.sweep import run_companion

            run_companion(plan.companion, out, show_progress=not args.no_progress,
                          command="scout " + " ".join(sys.argv[1:]))
    except SpecError as exc:
        print(f"scout run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scout run: interrupted; links and actors were torn down", file=sys.stderr)
        return 130
    print(f"results in {out} (summary.md)")
    return 0
