"""Can a cell spec's cloud serve its agents' load? Its batching model replayed, no testbed.

The CloudActor's queue as modelled in profiled fidelity, run as a discrete-event replay of
the spec's own seeded arrivals with nothing else in the way (no box, no links, no TCP):
``slots`` compute threads, each taking the oldest waiting request, then collecting more for
``batch_window_s`` up to ``max_batch`` (only requests of the first one's model where the
service batches by model, as ``ProfiledService`` does), and sleeping
``ProfiledCloud.batch_service_s`` of the batch; a request whose deadline passed while it
waited is dropped, as the actor drops it. Every request goes to the cloud in ``--mode``
(scout by default: what the adaptive policy sends where rates are small, and the costlier
cloud mode: scout re-prefills the context), after its group's edge time for that mode.

``--mix-models`` replays the cloud as it was before it batched by model. It says whether
misses at scale belong to the modelled system (the cloud, given this spec,
cannot answer in time) or to the testbed, which should then be the only difference between
this replay and an emulated run. One JSON line per spec on standard output and in ``--out``.

    python3 bench/cell_cloud.py experiments/cell_1000.yaml --out bench/results/cell_cloud.jsonl
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray_scout import provenance  # noqa: E402
from ray_scout.core.modes import Mode  # noqa: E402
from ray_scout.core.stages.profiled import ProfiledRequest  # noqa: E402
from ray_scout.experiments.runner import cloud_service, request_shapes, workloads  # noqa: E402
from ray_scout.experiments.spec import load_spec  # noqa: E402


def replay(spec, mode: Mode, mix_models: bool = False) -> dict:
    """The cloud's queue over the spec's arrivals: time from a request's arrival at the
    cloud to its answer (p50/p99), what was dropped, and the share answered in time."""
    shapes, work = request_shapes(spec), workloads(spec)
    service = cloud_service(spec, {})
    groups = spec.groups_by_agent()
    jobs = []  # (time at the cloud, deadline, cloud model, request)
    for agent, arrivals in work.items():
        g = groups[agent]
        for a in arrivals:
            shape = shapes[g.name][a.context_tokens]
            edge_s = shape.edge_s[mode]
            jobs.append((a.t_s + edge_s, a.t_s + g.deadline_s, g.cloud_model,
                         ProfiledRequest(mode, g.cloud_model, a.context_tokens,
                                         shape.selected_tokens, g.new_tokens)))
    jobs.sort(key=lambda j: j[0])
    times = [j[0] for j in jobs]
    by_model = getattr(service, "batch_key", None) is not None and not mix_models
    pending: list[int] = []  # jobs at the cloud or on their way, not taken, oldest first
    slots = [0.0] * spec.cloud_slots
    admitted = 0  # jobs[:admitted] are in ``pending`` or were taken
    response, dropped, sizes, busy_s, in_time = [], 0, [], 0.0, 0

    def admit(until: float) -> None:
        nonlocal admitted
        end = bisect.bisect_right(times, until)
        pending.extend(range(admitted, max(admitted, end)))
        admitted = max(admitted, end)

    while True:
        free = heapq.heappop(slots)
        admit(free)
        if not pending or times[pending[0]] > free:
            if not pending and admitted == len(jobs):
                break
            if not pending:
                admit(times[admitted])
            start = max(free, times[pending[0]])
        else:
            start = free
        window_end = start + spec.cloud_batch_window_s
        admit(window_end)
        first = pending[0]
        batch = []
        for i in pending:
            if len(batch) == spec.cloud_max_batch or times[i] > window_end:
                break
            if not by_model or jobs[i][2] == jobs[first][2]:
                batch.append(i)
        # A full batch starts when its last member arrived; otherwise at the window's end.
        collected = (max(start, times[batch[-1]]) if len(batch) == spec.cloud_max_batch
                     else window_end)
        members = set(batch)
        pending[:] = [i for i in pending if i not in members]
        live = [i for i in batch if jobs[i][1] > collected]
        dropped += len(batch) - len(live)
        if not live:
            heapq.heappush(slots, collected)
            continue
        seconds = service.cloud.batch_service_s([jobs[i][3] for i in live])
        busy_s += seconds
        sizes.append(len(live))
        response += [collected + seconds - times[i] for i in live]
        in_time += sum(collected + seconds <= jobs[i][1] for i in live)
        heapq.heappush(slots, collected + seconds)
    total = len(jobs)
    horizon = max(times) if times else 1.0
    return {"spec": spec.name, "mode": mode.value, "requests": total,
            "offered_hz": round(total / spec.duration_s, 1), "slots": spec.cloud_slots,
            "max_batch": spec.cloud_max_batch, "batch_window_s": spec.cloud_batch_window_s,
            "batch_by_model": by_model, "dropped": dropped,
            "batch_mean": round(float(np.mean(sizes)), 2) if sizes else 0.0,
            "busy_slots_mean": round(busy_s / horizon, 1),
            "cloud_s_p50": round(float(np.median(response)), 3) if response else None,
            "cloud_s_p99": round(float(np.quantile(response, 0.99)), 3) if response else None,
            # Answered by the deadline, links and propagation not counted (dropped: not).
            "in_time": round(in_time / total, 3) if total else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("specs", nargs="+", type=Path)
    parser.add_argument("--mode", default="scout", help="the cloud mode of every request")
    parser.add_argument("--mix-models", action="store_true",
                        help="batches take any model's requests (the cloud before it batched "
                        "by model, at commit 9404696)")
    parser.add_argument("--out", type=Path, help="append one JSON line per spec here too")
    args = parser.parse_args()
    # Each appended line says which machine, commit and date it came from on its own.
    where = provenance.record()
    for path in args.specs:
        row = replay(load_spec(path, fidelity="profiled"), Mode.parse(args.mode),
                     args.mix_models)
        row = {**row, "spec_file": str(path), **where}
        print(json.dumps(row), flush=True)
        if args.out is not None:
            with open(args.out, "a") as out:
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
