"""How ray-scout scales with the number of agents in one cell on this machine.

Measurements written to ``--out`` as JSON lines as each is measured, after a first
line with the machine, date, commit and load average:

- ``full`` (with ``--full OUT``): the cell spec as it is, every allocator, into ``OUT`` as
  ``scout run`` writes it: requests, errors, hits per allocator, overhead p50/p99 of the
  requests the cloud answered, peak RSS, Ray workers, CPU, leftovers, wall time.
- ``topology``: the lab-in-a-box at N agents (sites of 250 above 64 agents, as specs do):
  build and teardown seconds, and one whole split applied in one netlink batch.
- ``runs``: ``experiments/cell_1000.yaml`` scaled to N agents (the same 3B/7B/14B mix and
  per-agent arrival rate), profiled fidelity on real links, one allocator: Ray worker
  processes and peak RSS of this run's processes (sampled every 0.5 s), the testbed's start
  (links, cloud, recorder, edge hosts: once per experiment), requests, hits,
  testbed overhead p50/p99 of requests the cloud answered, the allocator's decision and
  apply times, errors, leftovers, wall time; and where the time and the CPU went: each
  outcome's latency split (``split``), the cloud's counters, CPU seconds per process role
  and the whole box's CPU (other jobs and the kernel's network work included).
- ``simulated``: the same cell at N agents through the simulator (one allocator with the
  adaptive policy): wall time, requests, hits.
- ``decisions``: the allocators' decision time (CPU time of the calling thread) on the same
  cell's demands at larger N, as the simulator and the allocator actor call them
  (``allocate`` end to end), with the spec's allocation objective or ``--objective``.

Needs root (namespaces) for ``full`` (but simulated), ``topology`` and ``runs``. Run it alone on
the machine (under /work/team/quiet here).

    python3 bench/cell_scaling.py --full experiments/results/cell_1000 \\
        --agents 10 100 300 1000 --duration 20 --topology 100 1000 \\
        --simulate 1000 10000 100000 --decide 1000 10000 100000 --repeats 3 \\
        --out bench/results/cell_scaling.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray_scout.core.control.allocation import allocate  # noqa: E402
from ray_scout import provenance  # noqa: E402
from ray_scout.experiments.runner import (  # noqa: E402
    demands, request_shapes, run_experiment, simulated_agents, simulated_trial, workloads,
)
from ray_scout.experiments.spec import REPO_ROOT, parse_spec, spec_text_as_run  # noqa: E402
from ray_scout.net.cleanup import find_leftovers  # noqa: E402
from ray_scout.net.profiles import load_profile  # noqa: E402
from ray_scout.net.topology import LabTopology, pid_run_id  # noqa: E402

CELL = REPO_ROOT / "experiments" / "cell_1000.yaml"


def scaled_doc(agents: int, duration_s: float, allocators: list[str],
               cell: Path = CELL) -> dict:
    """The cell spec with its groups scaled to ``agents`` in all (each keeps >= 1)."""
    doc = yaml.safe_load(cell.read_text())
    total = sum(g["count"] for g in doc["agents"])
    counts = [max(1, round(g["count"] * agents / total)) for g in doc["agents"]]
    counts[0] += agents - sum(counts)
    for group, count in zip(doc["agents"], counts):
        group["count"] = count
    doc.update(name=f"cell_{agents}", duration_s=duration_s, allocators=allocators)
    return doc


def topology(agents: int) -> dict:
    """Build, one whole split, teardown of the lab at ``agents`` (rate-only links)."""
    access = load_profile("lab").with_rate(20_000_000)
    neck = load_profile("lab").with_rate(1_000_000_000)
    site_size = 1 if agents <= 64 else 250
    topo = LabTopology([access] * agents, neck, run_id=pid_run_id(), site_size=site_size)
    topo.build()
    try:
        shares = {e.name: 100_000 + 97 * i for i, e in enumerate(topo.edges)}
        start = time.perf_counter()
        topo.set_shares(shares)
        apply_s = time.perf_counter() - start
    finally:
        topo.teardown()
    return {"agents": agents, "site_size": site_size, "namespaces": len(topo.namespaces),
            "build_s": topo.build_s, "apply_all_s": apply_s, "teardown_s": topo.teardown_s}


# Who burns the box's CPU during a run: Ray's workers are retitled ``ray::<Class>``.
ROLES = ("EdgeHost", "CloudActor", "Recorder", "LinkManager", "Allocator")


def role(cmdline: str) -> str:
    for name in ROLES:
        if cmdline.startswith(f"ray::{name}"):
            return name
    if cmdline.startswith("ray::IDLE") or "default_worker.py" in cmdline:
        return "idle_worker"
    for name in ("raylet", "gcs_server", "log_monitor", "dashboard", "monitor.py"):
        if name in cmdline:
            return "ray_" + name.split(".")[0]
    return "other"


class Sampler:
    """Every 0.5 s: peak RSS of this process tree (Ray's included), peak Ray worker processes
    (those holding an actor and Ray's idle pool), each process's CPU seconds (summed by role
    at the end: the driver is ``driver``), and the whole box's CPU (``/proc/stat``: other
    jobs, and the kernel's network work in softirq, which no process is charged for)."""

    def __init__(self):
        self.workers = self.idle = self.rss = 0
        self.cpu_s: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            procs = [me] + me.children(recursive=True)
            rss, workers, idle = 0, 0, 0
            for proc in procs:
                try:
                    rss += proc.memory_info().rss
                    line = " ".join(proc.cmdline())  # an actor's worker retitles itself
                    times = proc.cpu_times()
                except psutil.Error:
                    continue
                who = "driver" if proc.pid == me.pid else role(line)
                self.cpu_s[proc.pid] = (who, times.user + times.system)
                if who == "idle_worker":
                    idle += 1
                elif line.startswith("ray::"):
                    workers += 1
            self.rss, self.workers = max(self.rss, rss), max(self.workers, workers)
            self.idle = max(self.idle, idle)
            self._stop.wait(0.5)

    def cpu_by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for who, seconds in self.cpu_s.values():
            out[who] = round(out.get(who, 0.0) + seconds, 2)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def __enter__(self) -> "Sampler":
        self._box = psutil.cpu_times()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        end = psutil.cpu_times()
        spent = {k: getattr(end, k) - getattr(self._box, k) for k in end._fields}
        total = sum(spent.values())
        # Share of the box's CPU time (all cores) that was busy, and the kernel parts of it.
        self.box = {"busy": round(1 - (spent["idle"] + spent["iowait"]) / total, 3),
                    "softirq": round(spent["softirq"] / total, 3),
                    "system": round(spent["system"] / total, 3),
                    "cpu_s": round(total, 1)}


def split(requests) -> dict:
    """Where a request's time went, by outcome: its count and the median and p99 of each
    term of its latency (seconds), and the cloud's queue as the cloud reported it."""
    out = {}
    for outcome, rows in requests.groupby("outcome"):
        terms = {"n": len(rows)}
        for column in ("agent_queue_s", "edge_s", "tx_s", "cloud_queue_s", "cloud_s",
                       "overhead_s", "latency_s"):
            values = rows[column].dropna()
            if len(values):
                terms[column] = [round(values.median(), 4), round(values.quantile(0.99), 4)]
        terms["modes"] = rows["mode"].value_counts().to_dict()
        terms["errors"] = rows["error"].str.slice(0, 60).value_counts().head(3).to_dict()
        out[outcome] = terms
    return out


def run(agents: int, duration_s: float, allocator: str, cell: Path = CELL,
        keep: Path | None = None) -> dict:
    spec = parse_spec(scaled_doc(agents, duration_s, [allocator], cell), base=REPO_ROOT)
    with tempfile.TemporaryDirectory() as tmp, Sampler() as sampler:
        start = time.time()
        frames = run_experiment(spec, Path(tmp), show_progress=False, dashboard=False)
        wall = time.time() - start
        trial = json.loads((Path(tmp) / "run.json").read_text())["trials"][0]
    r, epochs = frames["requests"], frames["epochs"]
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        r.to_parquet(keep / f"requests_{cell.stem}_{agents}.parquet", index=False)
    answered = r[r.answer.notna() & r.overhead_s.notna()]
    # The testbed's overhead is that of requests that went to the cloud and back: a local
    # answer's is 0 by construction (its latency is its queue and its edge time).
    q = answered[answered["mode"] != "local"].overhead_s.quantile
    return {"spec": cell.stem, "agents": agents, "site_size": spec.site_size,
            "requests": len(r),
            "hits": float(r.deadline_met.mean()), "errors": int((r.outcome == "error").sum()),
            "lost": int((r.outcome == "lost").sum()), "answered": len(answered),
            "answered_by_cloud": int((answered["mode"] != "local").sum()),
            "overhead_p50_ms": 1e3 * q(0.5), "overhead_p99_ms": 1e3 * q(0.99),
            "actor_workers_peak": sampler.workers, "idle_workers_peak": sampler.idle,
            "rss_peak_gib": sampler.rss / 2**30,
            "decide_p50_ms": 1e3 * epochs.decide_s.median(),
            "apply_p50_ms": 1e3 * epochs.apply_s[epochs.apply_s > 0].median(),
            "testbed_start_s": trial["testbed_start_s"], "trial_wall_s": trial["wall_s"],
            "wall_s": wall,
            "leftovers": int(not find_leftovers(f"rs-{os.getpid() % 0xFFFF:04x}").empty),
            "modes": r["mode"].value_counts(normalize=True).round(3).to_dict(),
            "cloud": trial["cloud"], "cpu_s": sampler.cpu_by_role(), "box_cpu": sampler.box,
            "split": split(r)}


def decisions(agents: int, strategies: list[str], repeats: int,
              objective: str | None, cell: Path = CELL) -> list[dict]:
    doc = scaled_doc(agents, 60, strategies, cell)
    doc["fidelity"] = "simulated"
    spec = parse_spec(doc, base=REPO_ROOT)
    objective = objective or spec.allocation_objective
    built = time.perf_counter()
    demand = demands(spec, request_shapes(spec), workloads(spec), "adaptive")
    build_s = time.perf_counter() - built
    rows = []
    for strategy in strategies:
        for capacity in (200e6, 800e6):
            allocate(strategy, demand, capacity, objective)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.thread_time()
                allocate(strategy, demand, capacity, objective)
                times.append(time.thread_time() - start)
            rows.append({"agents": agents, "strategy": strategy, "objective": objective,
                         "capacity_bps": capacity,
                         "cpu_ms_median": 1e3 * statistics.median(times),
                         "cpu_ms_max": 1e3 * max(times), "demands_build_s": build_s})
    return rows


def full_run(out: Path, cell: Path = CELL, fidelity: str | None = None) -> dict:
    """The cell spec as it is (every allocator, its duration) into ``out``, as ``scout run``
    writes it, with this script's samples: the goals of issue 13 in one row."""
    spec = parse_spec(yaml.safe_load(cell.read_text()), base=REPO_ROOT, fidelity=fidelity)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(spec_text_as_run(cell.read_text(), spec.fidelity))
    with Sampler() as sampler:
        start = time.time()
        frames = run_experiment(spec, out, show_progress=False, dashboard=False)
        wall = time.time() - start
    r = frames["requests"]
    row = {"spec": cell.stem, "fidelity": spec.fidelity, "agents": len(spec.agent_names),
           "requests": len(r),
           "hits": r.groupby("allocator").deadline_met.mean().round(4).to_dict(),
           "wall_s": wall, "box_cpu": sampler.box}
    if spec.fidelity != "simulated":  # the simulator has no errors, overhead or processes
        row.update(errors=int((r.outcome == "error").sum()),
                   lost=int((r.outcome == "lost").sum()))
        by_cloud = r[r.overhead_s.notna() & (r["mode"] != "local")]
        q = by_cloud.overhead_s.quantile
        row.update(answered_by_cloud=len(by_cloud), overhead_p50_ms=1e3 * q(0.5),
                   overhead_p99_ms=1e3 * q(0.99), rss_peak_gib=sampler.rss / 2**30,
                   actor_workers_peak=sampler.workers, idle_workers_peak=sampler.idle,
                   leftovers=int(not find_leftovers(f"rs-{os.getpid() % 0xFFFF:04x}").empty),
                   cpu_s=sampler.cpu_by_role())
    return row


def simulated(agents: int, duration_s: float, allocator: str, cell: Path = CELL) -> dict:
    """The cell at ``agents`` through the simulator (simulated fidelity, one allocator with
    the adaptive policy): wall time of building its agents and of the run, and the hits."""
    doc = scaled_doc(agents, duration_s, [allocator], cell)
    doc["fidelity"] = "simulated"
    spec = parse_spec(doc, base=REPO_ROOT)
    start = time.perf_counter()
    agents_ = simulated_agents(spec)
    built = time.perf_counter()
    requests, epochs = simulated_trial(spec, "adaptive", allocator, agents_)
    done = time.perf_counter()
    return {"spec": cell.stem, "agents": agents, "allocator": allocator,
            "duration_s": duration_s, "requests": len(requests),
            "hits": float(requests.deadline_met.mean()), "build_s": built - start,
            "sim_wall_s": done - built, "splits": int(epochs.t_s.nunique()),
            "modes": requests["mode"].value_counts(normalize=True).round(3).to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, nargs="*", default=[10, 100, 300, 1000])
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--allocator", default="quality_max")
    parser.add_argument("--cell", type=Path, default=CELL,
                        help="the cell spec the runs scale (default experiments/cell_1000.yaml)")
    parser.add_argument("--keep", type=Path,
                        help="a folder for each run's requests (Parquet), for a closer look")
    parser.add_argument("--topology", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--decide", type=int, nargs="*", default=[1000, 10000, 100000])
    parser.add_argument("--full", type=Path, metavar="OUT",
                        help="first run the cell spec as it is into OUT (every allocator)")
    parser.add_argument("--fidelity", help="the --full run's fidelity (default the spec's)")
    parser.add_argument("--simulate", type=int, nargs="*", default=[1000, 10000, 100000],
                        help="cell sizes the simulator runs (--duration of arrivals, "
                        "--allocator)")
    parser.add_argument("--strategies", nargs="+",
                        default=["equal", "model_aware", "greedy", "quality_max", "optimal"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--objective", choices=("expected_hits", "mean_response"),
                        help="the decisions' allocation objective (default: the cell spec's)")
    parser.add_argument("--out", type=Path, required=True,
                        help="JSON lines: the provenance first, then one line per result as "
                        "it is measured (an interrupted run keeps what it measured)")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as out:
        def emit(kind: str, row: dict) -> None:
            out.write(json.dumps({"kind": kind, **row}) + "\n")
            out.flush()
            print(json.dumps(row), flush=True)

        emit("provenance", {
            **provenance.record(),
            "command": "python3 bench/cell_scaling.py " + " ".join(sys.argv[1:])})
        if args.full is not None:
            emit("full", full_run(args.full, args.cell, args.fidelity)
                 | {"loadavg": os.getloadavg()})
        for n in args.topology:
            emit("topology", topology(n))
        for n in args.agents:
            emit("run", run(n, args.duration, args.allocator, args.cell, args.keep)
                 | {"loadavg": os.getloadavg()})
        for n in args.simulate:
            emit("simulated", simulated(n, args.duration, args.allocator, args.cell))
        for n in args.decide:
            for row in decisions(n, args.strategies, args.repeats, args.objective,
                                 args.cell):
                emit("decision", row)


if __name__ == "__main__":
    main()
