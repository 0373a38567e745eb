"""Run a plan: every trial once, simulated ones as Ray tasks on every core, and resume.

What lives here: the driver of a sweep. Simulated trials run as Ray tasks (one CPU each, so
every core of every node works; ``serial`` runs them in this process, for comparison and
for machines without Ray). Profiled and full trials run one point x replication at a time
per lab through the runner's emulated path: on one machine one lab-in-a-box at a time, on a
cluster one point on each edge node at once (its agents on that node's real link). One progress bar with an
ETA counts trials over the whole sweep; the ``Ledger`` stores each finished trial, and a
rerun into the same directory skips them. Then the tidy tables (``trials``: one row per
trial; ``requests``: one per request; the point's keys as columns), the verdicts and the
curves. What it leaves to others: a trial's work (``runner``), statistics (``verdict``),
pictures (``curves``).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import pandas as pd

from ray_scout import provenance
from ray_scout.experiments import curves, verdict
from ray_scout.experiments.ledger import Ledger
from ray_scout.experiments.plan import Plan, Trial
from ray_scout.experiments.spec import SpecError

# Tasks in flight at once per CPU: enough to keep workers busy, few enough that finished
# results do not pile up in the object store.
IN_FLIGHT_PER_CPU = 4


def _simulate(spec, policy: str, allocator: str) -> tuple:
    """One simulated trial: (requests, epochs, wall seconds, where it ran)."""
    from ray_scout.experiments.runner import simulated_trial

    started = time.perf_counter()
    requests, epochs = simulated_trial(spec, policy, allocator)
    return requests, epochs, time.perf_counter() - started, _node()


def _node() -> str:
    import sys

    if "ray" in sys.modules:  # inside a Ray worker: the node's address
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    return platform.node()


def _facts(trial: Trial, requests: pd.DataFrame, wall_s: float, node: str) -> dict:
    hits = requests["deadline_met"].fillna(False).astype(bool)
    return {**trial.columns(), "n": len(requests), "hit_rate": float(hits.mean()),
            "quality": float(requests["quality"].mean()), "wall_s": wall_s, "node": node}


def _store(ledger: Ledger, trial: Trial, requests: pd.DataFrame, epochs: pd.DataFrame,
           wall_s: float, node: str) -> None:
    columns = trial.columns()
    ledger.record(trial.trial_id, requests.assign(**columns), epochs.assign(**columns),
                  _facts(trial, requests, wall_s, node))


def _run_serial(todo: list[Trial], ledger: Ledger, bar) -> None:
    for trial in todo:
        _store(ledger, trial, *_simulate(trial.point.spec, trial.policy, trial.allocator))
        bar.update(1)


def _run_on_ray(todo: list[Trial], ledger: Ledger, bar, address: str | None) -> None:
    import ray

    from ray_scout.experiments.runner import start_ray

    started = start_ray(todo[0].point.spec, address, dashboard=False)
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(_simulate)
        limit = IN_FLIGHT_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1)))
        pending, queue = {}, list(todo)
        while queue or pending:
            while queue and len(pending) < limit:
                trial = queue.pop(0)
                pending[task.remote(trial.point.spec, trial.policy, trial.allocator)] = trial
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                _store(ledger, pending.pop(ref), *ray.get(ref))
                bar.update(1)
    finally:
        if started:
            ray.shutdown()


def _arm(frame: pd.DataFrame, trial: Trial) -> pd.DataFrame:
    if frame.empty:
        return frame
    return frame[(frame["policy"] == trial.policy) & (frame["allocator"] == trial.allocator)]


def _run_emulated(plan: Plan, todo: list[Trial], ledger: Ledger, out: Path, bar,
                  address: str | None, show_progress: bool) -> None:
    """One point x replication at a time per lab, all its arms. On a cluster with several
    edge nodes, one point runs on each edge node at once (``placement.lanes``); a point
    that fits on no single node, and every point of a lab-in-a-box, runs alone."""
    import ray

    from ray_scout.experiments.placement import alive_nodes, lanes
    from ray_scout.experiments.runner import CLOUD_PORT, start_ray

    by_point: dict[tuple, list[Trial]] = {}
    for trial in todo:
        by_point.setdefault((trial.point.replication, trial.point.index), []).append(trial)
    # Replication-major: the points of one workload run one after another, so a drift of
    # the host's load over the sweep falls on every point of a paired comparison alike,
    # not on all replications of one point.
    points = [by_point[key] for key in sorted(by_point)]
    # One Ray for the sweep (run_emulated reuses a running one), sized for its largest point:
    # a local Ray's ``edge`` resources are one per agent.
    largest = max((t.point.spec for t in todo), key=lambda spec: len(spec.agent_names))
    started_ray = start_ray(largest, address, dashboard=False)
    try:
        spread, alone = lanes([len(p[0].point.spec.agent_names) for p in points],
                              alive_nodes(ray.nodes()), CLOUD_PORT)
        _run_lanes(spread, points, ledger, out, bar, address)
        for index in alone:
            _run_point(points[index], ledger, out, bar, address, show_progress)
    finally:
        if started_ray:
            ray.shutdown()


def _run_point(trials: list[Trial], ledger: Ledger, out: Path, bar, address: str | None,
               show_progress: bool, lane=None, cloud_share: float = 1.0) -> None:
    """Every arm of one point x replication on one lab: ``lane``'s node, or the whole
    cluster (the lab-in-a-box on one machine) without one."""
    from ray_scout.experiments.placement import alive_nodes, place
    from ray_scout.experiments.runner import run_emulated

    point = trials[0].point
    name = f"p{point.index:03d}-r{point.replication:02d}"
    where, prefix, node = None, None, "lab"
    if lane is not None:
        import ray

        cloud = next(n for n in alive_nodes(ray.nodes()) if n.cloud > 0)
        where = place(list(point.spec.groups_by_agent()), [cloud, lane.node], lane.first_port)
        prefix, node = f"{point.spec.name}/{name}/", lane.node.address
    here = out / "points" / name
    here.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    frames = run_emulated(point.spec, here, address, show_progress, dashboard=False,
                          where=where, prefix=prefix, cloud_share=cloud_share)
    wall_s = (time.perf_counter() - started) / len(trials)
    for trial in trials:
        _store(ledger, trial, _arm(frames["requests"], trial), _arm(frames["epochs"], trial),
               wall_s, node)
        bar.update(1)


def _run_lanes(spread: list, points: list[list[Trial]], ledger: Ledger, out: Path, bar,
               address: str | None) -> None:
    """Each lane's points one after another, the lanes at once (a thread each: the work is
    on the nodes). Ctrl-C, or a lane's failure, lets the running points finish (their trials
    are kept, so the sweep resumes after them) and starts no more; a second Ctrl-C abandons
    them."""
    if not spread:
        return
    import threading
    from concurrent.futures import ThreadPoolExecutor, wait

    stop = threading.Event()
    share = 1.0 / len(spread)

    def run_lane(lane) -> None:
        for index in lane.points:
            if stop.is_set():
                return
            _run_point(points[index], ledger, out, bar, address, False, lane, share)

    pool = ThreadPoolExecutor(max_workers=len(spread), thread_name_prefix="lane")
    futures = [pool.submit(run_lane, lane) for lane in spread]
    try:
        for future in futures:
            future.result()
    except BaseException as failure:
        # A lane's failure or Ctrl-C: the other lanes' running points end and tear their labs
        # down before this raises (and Ray, with their actors, is shut down).
        stop.set()
        if isinstance(failure, KeyboardInterrupt):
            print(f"interrupted: finishing the points running on {len(spread)} edge node(s); "
                  "Ctrl-C again to abandon them", flush=True)
        wait(futures)
        raise
    finally:
        pool.shutdown(wait=False)


def collect(plan: Plan, ledger: Ledger) -> dict[str, pd.DataFrame]:
    """The tidy tables of every finished trial of ``plan``."""
    trials, requests, epochs = [], [], []
    for trial in plan.trials():
        if not ledger.done(trial.trial_id):
            continue
        req, ep, facts = ledger.load(trial.trial_id)
        trials.append(facts)
        requests.append(req)
        epochs.append(ep)
    return {"trials": pd.DataFrame(trials),
            "requests": pd.concat(requests, ignore_index=True) if requests else pd.DataFrame(),
            "epochs": pd.concat(epochs, ignore_index=True) if epochs else pd.DataFrame()}


def report(plan: Plan, out: Path, frames: dict[str, pd.DataFrame], meta: dict,
           reference: Path | None = None) -> Path:
    """``verdicts.csv``, ``points.csv``, the curves and ``summary.md`` (verdicts first)."""
    keys = list(plan.keys)
    requests = frames["requests"]
    table = verdict.verdicts(requests, keys, plan.base.baseline)
    table.to_csv(out / "verdicts.csv", index=False)
    per_point = curves.points(requests, keys)
    per_point.to_csv(out / "points.csv", index=False)
    if keys:
        other = pd.read_csv(reference / "points.csv") if reference else None
        curves.plot(per_point, list(plan.axes), out, other,
                    (plan.base.fidelity, meta.get("reference_fidelity", "reference")))
    spec = plan.base
    text = [f"# {spec.name} ({spec.fidelity}): verdicts", "",
            (f"{len({p.index for p in plan.points})} point(s) x {plan.replications} "
             f"replication(s) x {len(spec.combinations())} arm(s) = {len(plan.trials())} "
             f"trials, {len(requests):,} requests. Paired on the same requests; hits: exact "
             "McNemar, quality (0 on a miss): paired bootstrap; 95%."), ""]
    text += verdict.headline(table, requests, keys)
    text += ["", (f"Run: {meta['command']} on {meta['machine']}, {meta['date']}, "
                  f"{meta['wall_s']:.1f} s wall ({meta['mode']}; {meta['ran']} trials run, "
                  f"{meta['skipped']} already done)."), "", "## Every verdict", ""]
    text.append(verdict.markdown(table, keys) if not table.empty else "none")
    text += ["", "## Every point (hits: Wilson 95%; quality: bootstrap 95%)", "",
             _markdown(per_point)]
    path = out / "summary.md"
    path.write_text("\n".join(text) + "\n")
    return path


def _markdown(frame: pd.DataFrame) -> str:
    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def run_sweep(plan: Plan, out: Path, *, address: str | None = None, serial: bool = False,
              show_progress: bool = True, command: str = "",
              reference: Path | None = None) -> dict[str, pd.DataFrame]:
    """Run every unfinished trial of ``plan`` into ``out``, then write tables and report
    (with ``reference``, another fidelity's run of the plan, on the same curves)."""
    if reference is not None and not (reference / "points.csv").exists():
        raise SpecError(f"--reference {reference}: no points.csv there; give a directory "
                        "a sweep of this spec wrote")
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out, plan.digest, plan.base.name)
    trials = plan.trials()
    todo = [t for t in trials if not ledger.done(t.trial_id)]
    bar = tqdm(total=len(trials), initial=len(trials) - len(todo), unit="trial",
               desc=plan.base.name, disable=not show_progress, smoothing=0.1)
    started = time.time()
    try:
        if todo and plan.base.fidelity != "simulated":
            _run_emulated(plan, todo, ledger, out, bar, address, show_progress)
        elif todo:
            (_run_serial(todo, ledger, bar) if serial
             else _run_on_ray(todo, ledger, bar, address))
    finally:
        bar.close()
    wall_s = time.time() - started
    frames = collect(plan, ledger)
    for name in ("trials", "requests"):
        frames[name].to_csv(out / f"{name}.csv", index=False)
        frames[name].to_parquet(out / f"{name}.parquet", index=False)
    if not frames["epochs"].empty:
        frames["epochs"].to_parquet(out / "epochs.parquet", index=False)
    meta = {"spec": plan.base.name, "fidelity": plan.base.fidelity, "digest": plan.digest,
            "trials": len(trials), "ran": len(todo), "skipped": len(trials) - len(todo),
            "wall_s": wall_s,
            "mode": ("lab, one point per lab at a time" if plan.base.fidelity != "simulated"
                     else "serial" if serial else "ray"),
            "machine": provenance.machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": command or f"scout run (sweep of {plan.base.name})"}
    if reference is not None:
        meta["reference"] = str(reference)
        meta["reference_fidelity"] = json.loads(
            (reference / "meta.json").read_text()).get("fidelity", "reference")
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    report(plan, out, frames, meta, reference)
    return frames


def run_companion(plan: Plan, out: Path, *, show_progress: bool = True,
                  command: str = "") -> Path:
    """Run a showcase's companion plan into ``out/companion`` and put its verdict at the top
    of ``out/summary.md``. A companion is a few hundred requests per arm, so it runs in this
    process: no Ray start-up to pay."""
    where = out / "companion"
    run_sweep(plan, where, serial=True, show_progress=show_progress,
              command=f"{command} (companion: {plan.base.fidelity}, "
                      f"{plan.replications} replications)")
    verdict_text = (where / "summary.md").read_text().split("\n## Every verdict")[0]
    summary = out / "summary.md"
    rest = summary.read_text() if summary.exists() else ""
    summary.write_text(verdict_text.rstrip() + "\n\nEvery verdict and point: "
                       "companion/summary.md; the showcase's own requests follow.\n\n" + rest)
    return summary


def rewrite_report(out: Path) -> Path:
    """``scout report`` of a sweep's directory: the summary, verdicts and curves again from
    its stored trials, with its run's facts (``meta.json``) kept."""
    from ray_scout.experiments.plan import load_plan

    meta = json.loads((out / "meta.json").read_text())
    plan = load_plan(out / "spec.yaml", meta["fidelity"])
    frames = collect(plan, Ledger(out, plan.digest, plan.base.name))
    reference = Path(meta["reference"]) if meta.get("reference") else None
    return report(plan, out, frames, meta, reference)
