"""Trial bookkeeping: which trials of a plan a results directory already holds.

What lives here: one file per finished trial under ``<out>/trials/`` (its requests as
Parquet, written last and atomically, so its presence means the trial finished; its epochs
and a JSON line of its facts beside it), and ``<out>/plan.json`` naming the plan's digest so
that a directory resumes only the plan that started it. What it leaves to others: running
trials (``sweep``) and deciding what a trial is (``plan``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from ray_scout.experiments.spec import SpecError


class Ledger:
    def __init__(self, out: Path, digest: str, name: str):
        self.dir = out / "trials"
        self.dir.mkdir(parents=True, exist_ok=True)
        marker = out / "plan.json"
        if marker.exists():
            held = json.loads(marker.read_text())
            if held.get("digest") != digest:
                raise SpecError(f"{out} holds trials of another plan ({held.get('name')}, "
                                f"digest {held.get('digest')}); the spec changed since, so "
                                "its trials are not this one's: give --out a new directory "
                                "or remove the old one")
        else:
            marker.write_text(json.dumps({"name": name, "digest": digest}))

    def _path(self, trial_id: str, kind: str) -> Path:
        return self.dir / f"{trial_id}.{kind}"

    def done(self, trial_id: str) -> bool:
        return self._path(trial_id, "requests.parquet").exists()

    def record(self, trial_id: str, requests: pd.DataFrame, epochs: pd.DataFrame,
               facts: dict) -> None:
        """Store a finished trial; the requests file goes last, as the mark that it is done."""
        if not epochs.empty:
            epochs.to_parquet(self._path(trial_id, "epochs.parquet"), index=False)
        self._path(trial_id, "json").write_text(json.dumps(facts, default=str))
        final = self._path(trial_id, "requests.parquet")
        partial = final.with_suffix(".partial")
        requests.to_parquet(partial, index=False)
        os.replace(partial, final)  # atomic: a killed run leaves no half-written mark

    def load(self, trial_id: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
        epochs = self._path(trial_id, "epochs.parquet")
        return (pd.read_parquet(self._path(trial_id, "requests.parquet")),
                pd.read_parquet(epochs) if epochs.exists() else pd.DataFrame(),
                json.loads(self._path(trial_id, "json").read_text()))
