"""How an answer's read at the edge and its send at the cloud grow with the answers before it.

Reads a run's requests with the timestamp patch's marks (``bench/overhead_breakdown.py``):
- edge: the median of ``edge_read`` (the edge kernel has the answer -> the agent has it),
  per edge host, by how many answers to the same host the kernel received in the 3 ms before
  this one (6 = six or more);
- cloud: the median of ``batch_reply`` (the batch's compute end -> this member's answer) by
  the member's place in its batch.

    python3 bench/results/cell_overhead/burst.py bench/results/cell_event_loop/breakdown_main_requests.parquet

Edge hosts take contiguous runs of the cell's agents (experiments/cell_1000.yaml: s0-s399,
m0-m349, l0-l249), two of 500 on this box (experiments.placement.edge_hosts).
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench.overhead_breakdown import breakdown  # noqa: E402

HOSTS, WINDOW_S, CAP = 2, 0.003, 6


def main(path: str) -> None:
    requests = pd.read_parquet(path)
    stages = breakdown(requests)
    r = requests.loc[stages.index].assign(edge_read_ms=1e3 * stages.edge_read,
                                          batch_reply_ms=1e3 * stages.batch_reply)
    names = [f"{g}{i}" for g, n in (("s", 400), ("m", 350), ("l", 250)) for i in range(n)]
    per_host = -(-len(names) // HOSTS)
    r["host"] = r.agent.map({n: i // per_host for i, n in enumerate(names)})
    r = r.sort_values("dbg_krx")
    for host, h in r.groupby("host"):
        k = h.dbg_krx.to_numpy()
        before = np.minimum([(k[:i] > k[i] - WINDOW_S).sum() for i in range(len(k))], CAP)
        table = h.assign(before=before).groupby("before").edge_read_ms.agg(["count", "median"])
        print(f"edge host {host}: edge_read ms by answers to it in the {WINDOW_S * 1e3:g} ms before")
        print(table.round(2).T.to_string())
    r["place"] = r.groupby("dbg_end_unix_s").dbg_reply_unix_s.rank(method="first").astype(int)
    print("cloud: batch_reply ms by the member's place in its batch")
    print(r.groupby("place").batch_reply_ms.agg(["count", "median"]).round(2).T.to_string())


if __name__ == "__main__":
    main(sys.argv[1])
