"""Where a cell's testbed overhead goes, stage by stage, from a run with extra timestamps.

``overhead_s`` (docs/TESTBED.md, columns of ``requests``) is latency less the agent queue, the
edge, the wire (tx start to acked), the cloud's queue and its compute. On one box every clock
is the same, so with five more marks per request it splits exactly into:

- ``presend``: edge compute done -> the body's first byte handed to the kernel (the agent's
  decision bookkeeping, framing);
- ``ack_to_cloud_kernel``: the edge's tx acked -> the cloud kernel's receive stamp of the
  body's last segment (negative: the ACK leaves the cloud after the segment arrives);
- ``cloud_read``: that kernel stamp -> the cloud's reader thread has the last byte (the
  wake-up of the connection's thread; ``cloud_queue_s`` starts here);
- ``batch_reply``: the batch's compute end -> this member's answer completed (a batch's
  members are answered one after another by its compute thread);
- ``cloud_send``: this member's answer completed -> the edge kernel's receive stamp of the
  answer's first segment (JSON, framing, the send, the link);
- ``edge_read``: that kernel stamp -> the edge has the answer's last byte (the wake-up of the
  agent's thread or loop and the read).

The marks come from ``bench/results/cell_event_loop/breakdown_timestamps.diff``: applied to a
checkout, it adds them to the rows (``dbg_*`` columns) without changing what is recorded
otherwise. Reads the Parquet that ``bench/cell_scaling.py --keep DIR`` writes.

    python3 bench/overhead_breakdown.py DIR/requests_cell_1000_1000.parquet [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_scout.provenance import record  # noqa: E402

STAGES = ("presend", "ack_to_cloud_kernel", "cloud_read", "batch_reply", "cloud_send",
          "edge_read")


def breakdown(requests: pd.DataFrame) -> pd.DataFrame:
    """One column per stage (seconds) for the requests the cloud answered; they sum to
    ``overhead_s`` (checked)."""
    need = ["dbg_end_unix_s", "dbg_reply_unix_s", "dbg_klast", "dbg_krx"]
    missing = [c for c in need if c not in requests]
    if missing:
        raise SystemExit(f"no {missing} columns: the run needs the timestamps of "
                         "bench/results/cell_event_loop/breakdown_timestamps.diff")
    r = requests[requests.overhead_s.notna() & (requests["mode"] != "local")].dropna(subset=need)
    edge_done = r.arrival_unix_s + r.agent_queue_s + r.edge_s
    cloud_last_byte = r.dbg_end_unix_s - r.cloud_s - r.cloud_queue_s
    out = pd.DataFrame({
        "presend": r.tx_start_unix_s - edge_done,
        "ack_to_cloud_kernel": r.dbg_klast - r.tx_acked_unix_s,
        "cloud_read": cloud_last_byte - r.dbg_klast,
        "batch_reply": r.dbg_reply_unix_s - r.dbg_end_unix_s,
        "cloud_send": r.dbg_krx - r.dbg_reply_unix_s,
        "edge_read": r.answer_unix_s - r.dbg_krx,
        "overhead_s": r.overhead_s})
    gap = (out[list(STAGES)].sum(axis=1) - out.overhead_s).abs().max()
    if gap > 1e-6:
        raise SystemExit(f"the stages miss the overhead by up to {gap:.2e} s: not this table")
    return out


def summary(stages: pd.DataFrame) -> dict:
    """Median, p90, p99 and mean of each stage, in ms."""
    return {c: {k: round(1e3 * v, 3) for k, v in (
        ("p50", stages[c].median()), ("p90", stages[c].quantile(0.9)),
        ("p99", stages[c].quantile(0.99)), ("mean", stages[c].mean()))}
        for c in (*STAGES, "overhead_s")} | {"n": len(stages)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parquet", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, help="write the summaries here (JSON lines)")
    args = parser.parse_args()
    rows = []
    where = record()  # this analysis's machine and commit; the run's are in its own rows
    for path in args.parquet:
        row = {"source": str(path), **summary(breakdown(pd.read_parquet(path))),
               "provenance": where}
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
