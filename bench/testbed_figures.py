"""Testbed figures: payload transfer time on shaped links, per-request overhead, scale, and
the per-group and per-estimator tables of a run's results.

    python3 bench/testbed_figures.py transfer --out bench/results/testbed_transfer.json
    python3 bench/testbed_figures.py overhead --results experiments/results/allocation_congestion
    python3 bench/testbed_figures.py scale --agents 32 --out bench/results/testbed_scale.json
    python3 bench/testbed_figures.py groups --results experiments/results/allocation_congestion
    python3 bench/testbed_figures.py estimators --results experiments/results/estimators
    python3 bench/testbed_figures.py paired --results experiments/results/queue_pressure
    python3 bench/testbed_figures.py fidelity --results experiments/results/allocation_congestion
    python3 bench/testbed_figures.py paired --results experiments/results/closed_loop_slow_link \
        --arm closed_loop hits off [--agent slow0]

``transfer``: one edge, one cloud, the access link at each rate (bottleneck 1 Gbit/s), one
persistent connection; each payload is sent 5 times; the wire time (first byte handed to the
kernel until the kernel's unacked count is 0) and the round trip are compared with
bytes x 8 / rate + RTT, where RTT is the idle ping-pong time of a 1-byte request.
``overhead``: the ``overhead_s`` column of a run's answered requests (latency minus agent
queue, edge compute, wire time, cloud queue and cloud compute); its resolution is the 2 ms
step of the wire-time poll, so medians below it (and negative values) are that poll's noise.
``scale``: a profiled run of N agents (small payloads, Paper B timings) on this box; reports
wall time, requests, hit rate and overhead.
``groups``: per (policy, allocator) and agent group (the spec's group names, from the run's
``spec.yaml``), deadline hits, and how the misses happened: ``local`` (no mode fitted the
time left), ``expired`` (waited past the deadline), ``cancelled`` (sent, not answered in
time); ``--requests`` picks another table of the same run (the simulated one).
``estimators``: per estimator of the spec's groups, requests, deadline hits and quality
with bootstrap 95% intervals, the median estimate / grant, and the median measured
throughput / grant of payloads over 1 MB.
``paired``: per allocator, policy ``--a`` minus policy ``--b`` (default adaptive:queue minus
adaptive), or with ``--allocators A B`` per policy allocator A minus allocator B, or with
``--arm COLUMN A B`` per policy and allocator a swept column's value A minus value B
(``--agent``: one agent's requests), on the same
requests (same request ids, and replication in a replicated run: every combination replays
one workload):
mean difference of quality and of deadline hits with a paired bootstrap 95% interval and
the sign-flip permutation p-value (``core.evaluation.metrics.paired_test``).
``fidelity``: per (policy, allocator), the emulated hit rate (Wilson 95%) and quality
(bootstrap 95%) beside the simulated point estimates of the same spec
(``requests_simulated.csv``, or ``--simulated``, a simulated sweep's ``requests.parquet``;
``--by``: per value of swept columns too; ``--agent``: one agent's requests), and whether each
simulated figure lies inside the emulated interval.

Every result file records ``machine`` (read from /proc: for ``overhead``, ``groups`` and
``estimators`` the machine that read the results, not the one that ran the experiment, which
the doc beside the figure names), ``commit`` and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray_scout import provenance  # noqa: E402
from ray_scout.experiments.runner import run_experiment  # noqa: E402
from ray_scout.experiments.spec import parse_spec  # noqa: E402
from ray_scout.net.profiles import load_profile  # noqa: E402
from ray_scout.net.topology import CLOUD_ADDRESS, LabTopology, pid_run_id  # noqa: E402
from ray_scout.transport.client import Connection  # noqa: E402
from ray_scout.transport.server import Server  # noqa: E402


def transfer(rates_mbit: list[float], sizes_mb: list[float], repeats: int) -> list[dict]:
    import dataclasses

    lab = load_profile("lab")
    rows = []
    for rate in rates_mbit:
        access = dataclasses.replace(lab, up=dataclasses.replace(lab.up, rate_bps=int(rate * 1e6)))
        neck = dataclasses.replace(lab, up=dataclasses.replace(lab.up, rate_bps=1_000_000_000),
                                   down=dataclasses.replace(lab.down, rate_bps=1_000_000_000))
        with LabTopology([access], neck, run_id=pid_run_id()) as topo, \
                Server(lambda r: b"ok", host=CLOUD_ADDRESS, port=7301,
                       netns=topo.cloud_netns, workers=2) as server, \
                Connection(server.address, source_netns=topo.edges[0].netns,
                           body_checksum=False) as conn:
            idle = [conn.request(b"x", deadline_s=5).timeline.round_trip_s for _ in range(20)]
            rtt = statistics.median(idle)
            for size_mb in sizes_mb:
                body = bytes(int(size_mb * 1e6))
                for _ in range(repeats):
                    tl = conn.request(body, deadline_s=120).timeline
                    ideal = len(body) * 8 / (rate * 1e6)
                    # The handler answers at once, so the answer may beat the zero-unacked
                    # poll; its first byte is then the end of the wire time (+ RTT/2).
                    acked = tl.tx_acked_unix_s or tl.rx_first_byte_unix_s
                    wire = acked - tl.tx_start_unix_s
                    rows.append(dict(rate_mbit=rate, size_bytes=len(body), rtt_s=rtt,
                                     ideal_s=ideal + rtt, wire_s=wire,
                                     round_trip_s=tl.round_trip_s,
                                     wire_over_ideal=wire / (ideal + rtt),
                                     round_trip_over_ideal=tl.round_trip_s / (ideal + rtt)))
                    print(json.dumps(rows[-1]), flush=True)
    return rows


# The wire time ends when the sender's unacked-byte count is seen at 0, polled with a back-off
# of 50 us to 2 ms (transport.client): overhead_s, the rest of the latency, is no finer.
OVERHEAD_RESOLUTION_MS = 2.0


def overhead(results: Path) -> dict:
    r = pd.read_csv(results / "requests.csv")
    answered = r[r.overhead_s.notna() & (r["mode"] != "local")]
    o = answered.overhead_s * 1e3
    return {"results": str(results), "n": int(len(o)), "median_ms": float(o.median()),
            "p95_ms": float(o.quantile(0.95)), "max_ms": float(o.max()),
            "resolution_ms": OVERHEAD_RESOLUTION_MS,
            "negative_share": float((o < 0).mean()),
            "by_mode_median_ms": answered.assign(o=o).groupby("mode").o.median().to_dict()}


def scale(agents: int, duration_s: float) -> dict:
    doc = {"name": f"scale{agents}", "fidelity": "profiled", "duration_s": duration_s,
           "seed": 0, "capacity": {"kind": "constant", "rate": "200mbit"},
           "cloud": {"slots": 8, "models": {"qwen2.5-3b": {"timing": "paper_b"}}},
           "agents": [{"name": "a", "count": agents, "model": "qwen2.5-3b",
                       "context_tokens": [32], "deadline_s": 2.0, "arrival_rate_hz": 0.5,
                       "quality": "paper_b:3b-7b"}],
           "policies": ["adaptive"], "allocators": ["equal"]}
    spec = parse_spec(doc)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        load_start = os.getloadavg()[0]
        frames = run_experiment(spec, Path(tmp), show_progress=False)
        wall = time.time() - start
        r = frames["requests"]
        o = r.overhead_s.dropna() * 1e3
        return {"agents": agents, "duration_s": duration_s, "wall_s": wall,
                "requests": int(len(r)),
                "hit_rate": float(r.deadline_met.mean()),
                "errors": int((r.outcome == "error").sum()),
                "overhead_median_ms": float(o.median()), "overhead_p95_ms": float(o.quantile(0.95)),
                "agent_queue_p95_s": float(r.agent_queue_s.quantile(0.95)),
                "modes": r["mode"].value_counts().to_dict(),
                "load_before": load_start, "load_after": os.getloadavg()[0]}


def _groups_of(results: Path) -> dict:
    from ray_scout.experiments.spec import load_spec

    return load_spec(results / "spec.yaml").groups_by_agent()


def groups(results: Path, requests: Path | None) -> list[dict]:
    r = pd.read_csv(requests or results / "requests.csv")
    r["group"] = r.agent.map({a: g.name for a, g in _groups_of(results).items()})
    rows = []
    for (policy, allocator, group), g in r.groupby(["policy", "allocator", "group"], sort=True):
        miss = g[~g.deadline_met.astype(bool)]
        expired = miss.agent_queue_s >= miss.deadline_s
        rows.append(dict(
            policy=policy, allocator=allocator, group=group, n=int(len(g)),
            hit_rate=float(g.deadline_met.mean()), quality=float(g.quality.mean()),
            agent_queue_p95_s=float(g.agent_queue_s.quantile(0.95)),
            miss_local=int(((miss["mode"] == "local") & ~expired).sum()),
            miss_expired=int(expired.sum()),
            miss_cancelled=int((miss.cancelled.astype(bool) & ~expired).sum()),
            modes=g["mode"].value_counts().to_dict()))
    return rows


def estimators(results: Path) -> list[dict]:
    from ray_scout.core.evaluation.metrics import bootstrap_ci

    r = pd.read_csv(results / "requests.csv")
    r["estimator"] = r.agent.map({a: g.estimator for a, g in _groups_of(results).items()})
    rows = []
    for name, g in r.groupby("estimator", sort=True):
        big = g[(g.payload_bytes > 1e6) & g.measured_bps.notna()]
        hits, quality = (bootstrap_ci(g[c].astype(float).to_numpy())
                         for c in ("deadline_met", "quality"))
        rows.append(dict(
            estimator=name, n=int(len(g)), hit_rate=list(hits), quality=list(quality),
            estimate_over_grant_median=float((g.bandwidth_estimate_bps / g.grant_bps).median()),
            measured_over_grant_over_1mb_median=float((big.measured_bps / big.grant_bps).median()),
            n_over_1mb=int(len(big)), modes=g["mode"].value_counts().to_dict()))
    return rows


def _requests(results: Path, requests: Path | None) -> pd.DataFrame:
    """``--requests``, else the run's ``requests.csv``, else its ``requests.parquet`` (a
    replicated run commits only the parquet)."""
    path = requests or results / "requests.csv"
    if requests is None and not path.exists():
        path = results / "requests.parquet"
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def paired(results: Path, requests: Path | None, a: str, b: str,
           allocators: list[str] | None = None, arm: list[str] | None = None,
           agent: str | None = None) -> list[dict]:
    from ray_scout.core.evaluation.metrics import paired_test

    r = _requests(results, requests)
    if agent is not None:
        r = r[r.agent == agent]
    # A replicated run (a sweep's requests) repeats request ids per replication.
    keys = [k for k in ("replication", "request_id") if k in r.columns]
    # Policy a minus policy b per allocator, allocator a minus allocator b per policy, or
    # value a minus value b of a swept column per policy and allocator.
    if arm:
        (column, a, b), within = arm, ["policy", "allocator"]
        r = r.assign(**{column: r[column].astype(str)})
    elif allocators:
        (a, b), column, within = allocators, "allocator", ["policy"]
    else:
        column, within = "policy", ["allocator"]
    rows = []
    for name, g in r.groupby(within, sort=True):
        left = g[g[column] == a].set_index(keys)
        right = g[g[column] == b].set_index(keys)
        ids = left.index.intersection(right.index)
        if ids.empty:
            continue
        row = {**dict(zip(within, name)), "a": a, "b": b, "n": int(len(ids))}
        if arm:
            row["column"] = column
        if agent is not None:
            row["agent"] = agent
        for metric in ("quality", "deadline_met"):
            x, y = (t.loc[ids, metric].astype(float).to_numpy() for t in (left, right))
            test = paired_test(x, y)
            row[metric] = dict(a=float(x.mean()), b=float(y.mean()), diff=test.mean_diff,
                               ci=[test.low, test.high], p_value=test.p_value)
        rows.append(row)
    return rows


def fidelity(results: Path, simulated: Path | None = None, by: list[str] | None = None,
             agent: str | None = None) -> list[dict]:
    from ray_scout.core.evaluation.metrics import bootstrap_ci
    from ray_scout.experiments.report import wilson_ci

    emulated = _requests(results, None)
    simulated = _requests(results, simulated or results / "requests_simulated.csv")
    if agent is not None:
        emulated, simulated = (t[t.agent == agent] for t in (emulated, simulated))
    columns = ["policy", "allocator", *(by or [])]
    rows = []
    for name, g in emulated.groupby(columns, sort=True):
        s = simulated
        for column, value in zip(columns, name):
            s = s[s[column].astype(str) == str(value)]
        hits = g.deadline_met.astype(bool)
        lo, hi = wilson_ci(int(hits.sum()), len(g))
        q, qlo, qhi = bootstrap_ci(g.quality.astype(float).to_numpy())
        sim_hits, sim_q = float(s.deadline_met.astype(bool).mean()), float(s.quality.mean())
        rows.append(dict(**dict(zip(columns, name)), **({"agent": agent} if agent else {}),
                         n=int(len(g)), n_sim=int(len(s)),
                         hits=float(hits.mean()), hits_ci=[lo, hi], quality=q,
                         quality_ci=[qlo, qhi], sim_hits=sim_hits, sim_quality=sim_q,
                         hits_inside=bool(lo <= sim_hits <= hi),
                         quality_inside=bool(qlo <= sim_q <= qhi)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("transfer")
    t.add_argument("--rates-mbit", type=float, nargs="+", default=[10, 50, 100])
    t.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 4, 16])
    t.add_argument("--repeats", type=int, default=5)
    o = sub.add_parser("overhead")
    o.add_argument("--results", type=Path, required=True)
    s = sub.add_parser("scale")
    s.add_argument("--agents", type=int, default=32)
    s.add_argument("--duration-s", type=float, default=30)
    gr = sub.add_parser("groups")
    gr.add_argument("--results", type=Path, required=True)
    gr.add_argument("--requests", type=Path, help="default: <results>/requests.csv")
    e = sub.add_parser("estimators")
    e.add_argument("--results", type=Path, required=True)
    pa = sub.add_parser("paired")
    pa.add_argument("--results", type=Path, required=True)
    pa.add_argument("--requests", type=Path, help="default: <results>/requests.csv")
    pa.add_argument("--a", default="adaptive:queue")
    pa.add_argument("--b", default="adaptive")
    pa.add_argument("--allocators", nargs=2, metavar=("A", "B"),
                    help="allocator A minus allocator B per policy, instead of --a minus --b")
    pa.add_argument("--arm", nargs=3, metavar=("COLUMN", "A", "B"),
                    help="a swept column's value A minus value B per policy and allocator "
                         "(e.g. closed_loop hits off), instead of --a minus --b")
    fi = sub.add_parser("fidelity")
    fi.add_argument("--results", type=Path, required=True)
    fi.add_argument("--simulated", type=Path,
                    help="the simulated requests (default: <results>/requests_simulated.csv)")
    fi.add_argument("--by", nargs="+", default=[],
                    help="swept columns to compare per value as well (e.g. closed_loop)")
    for p in (pa, fi):
        p.add_argument("--agent", help="this agent's requests only")
    for p in (t, o, s, gr, e, pa, fi):
        p.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.what == "transfer":
        result = {"rows": transfer(args.rates_mbit, args.sizes_mb, args.repeats)}
        frame = pd.DataFrame(result["rows"])
        result["summary"] = frame.groupby(["rate_mbit", "size_bytes"])[
            ["wire_over_ideal", "round_trip_over_ideal"]].median().reset_index().to_dict("records")
    elif args.what == "overhead":
        result = overhead(args.results)
    elif args.what == "groups":
        result = {"rows": groups(args.results, args.requests)}
    elif args.what == "estimators":
        result = {"rows": estimators(args.results)}
    elif args.what == "paired":
        result = {"rows": paired(args.results, args.requests, args.a, args.b,
                                 args.allocators, args.arm, args.agent)}
    elif args.what == "fidelity":
        result = {"rows": fidelity(args.results, args.simulated, args.by, args.agent)}
    else:
        result = scale(args.agents, args.duration_s)
    result.update(provenance.record())  # the machine as measured, the commit, the load
    result["command"] = "python3 bench/testbed_figures.py " + " ".join(sys.argv[1:])
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
