"""How ray-scout scales with the number of agents in one cell on this machine.

Three measurements, written to ``--out`` as JSON lines as each is measured, after a first
line with the machine, date, commit and load average:

- ``topology``: the lab-in-a-box at N agents (sites of 250 above 64 agents, as specs do):
  build and teardown seconds, and one whole split applied in one netlink batch.
- ``runs``: ``experiments/cell_1000.yaml`` scaled to N agents (the same 3B/7B/14B mix and
  per-agent arrival rate), profiled fidelity on real links, one allocator: Ray worker
  processes and peak RSS of this run's processes (sampled every 0.5 s), requests, hits,
  testbed overhead p50/p99 of answered requests, the allocator's decision and apply times,
  errors, leftovers, wall time.
- ``decisions``: the allocators' decision time (CPU time of the calling thread) on the same
  cell's demands at larger N, as the simulator and the allocator actor call them
  (``allocate`` end to end), with the spec's allocation objective or ``--objective``.

Needs root (namespaces) for the first two. Run it alone on the machine.

    python3 bench/cell_scaling.py --agents 10 100 300 1000 --duration 30 \\
        --decide 1000 10000 100000 --out bench/results/cell_scaling.jsonl
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
    demands, request_shapes, run_experiment, workloads,
)
from ray_scout.experiments.spec import REPO_ROOT, parse_spec  # noqa: E402
from ray_scout.net.cleanup import find_leftovers  # noqa: E402
from ray_scout.net.profiles import load_profile  # noqa: E402
from ray_scout.net.topology import LabTopology, pid_run_id  # noqa: E402

CELL = REPO_ROOT / "experiments" / "cell_1000.yaml"


def scaled_doc(agents: int, duration_s: float, allocators: list[str]) -> dict:
    """The cell spec with its groups scaled to ``agents`` in all (each keeps >= 1)."""
    doc = yaml.safe_load(CELL.read_text())
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


class Sampler:
    """Peak RSS of this process tree (Ray's included) and peak Ray worker processes: those
    holding an actor (retitled ``ray::<Class>``) and Ray's idle pool."""

    def __init__(self):
        self.workers = self.idle = self.rss = 0
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
                except psutil.Error:
                    continue
                if line.startswith("ray::IDLE") or "default_worker.py" in line:
                    idle += 1
                elif line.startswith("ray::"):
                    workers += 1
            self.rss, self.workers = max(self.rss, rss), max(self.workers, workers)
            self.idle = max(self.idle, idle)
            self._stop.wait(0.5)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run(agents: int, duration_s: float, allocator: str) -> dict:
    spec = parse_spec(scaled_doc(agents, duration_s, [allocator]), base=REPO_ROOT)
    with tempfile.TemporaryDirectory() as tmp, Sampler() as sampler:
        start = time.time()
        frames = run_experiment(spec, Path(tmp), show_progress=False, dashboard=False)
        wall = time.time() - start
        trial = json.loads((Path(tmp) / "run.json").read_text())["trials"][0]
    r, epochs = frames["requests"], frames["epochs"]
    answered = r[r.answer.notna() & r.overhead_s.notna()]
    q = answered.overhead_s.quantile
    return {"agents": agents, "site_size": spec.site_size, "requests": len(r),
            "hits": float(r.deadline_met.mean()), "errors": int((r.outcome == "error").sum()),
            "lost": int((r.outcome == "lost").sum()), "answered": len(answered),
            "overhead_p50_ms": 1e3 * q(0.5), "overhead_p99_ms": 1e3 * q(0.99),
            "actor_workers_peak": sampler.workers, "idle_workers_peak": sampler.idle,
            "rss_peak_gib": sampler.rss / 2**30,
            "decide_p50_ms": 1e3 * epochs.decide_s.median(),
            "apply_p50_ms": 1e3 * epochs.apply_s[epochs.apply_s > 0].median(),
            "trial_wall_s": trial["wall_s"], "wall_s": wall,
            "leftovers": int(not find_leftovers(f"rs-{os.getpid() % 0xFFFF:04x}").empty),
            "modes": r["mode"].value_counts(normalize=True).round(3).to_dict()}


def decisions(agents: int, strategies: list[str], repeats: int,
              objective: str | None) -> list[dict]:
    doc = scaled_doc(agents, 60, strategies)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, nargs="*", default=[10, 100, 300, 1000])
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--allocator", default="quality_max")
    parser.add_argument("--topology", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--decide", type=int, nargs="*", default=[1000, 10000, 100000])
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
        for n in args.topology:
            emit("topology", topology(n))
        for n in args.agents:
            emit("run", run(n, args.duration, args.allocator) | {"loadavg": os.getloadavg()})
        for n in args.decide:
            for row in decisions(n, args.strategies, args.repeats, args.objective):
                emit("decision", row)


if __name__ == "__main__":
    main()
