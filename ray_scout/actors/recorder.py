"""Recorder: takes every finished row the moment it exists and appends it to disk.

What lives here: one JSON-lines file per table (``requests``, ``epochs``, ``events``) under a
run directory, flushed per row, so a killed agent or cloud loses nothing it has reported and
a killed driver leaves readable partial results. What it leaves to others: turning the lines
into Parquet/CSV (``experiments.runner``) and what a row holds (the actors).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _clean(value):
    # JSON has no NaN/inf; None reads back as NaN in pandas.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Recorder:
    """Appends rows to ``<directory>/<table>.jsonl``; ``counts()`` feeds the progress bar.

    ``open`` points it at another directory (a testbed's next trial); ``close`` ends one.
    """

    def __init__(self, directory: str | None):
        self.files: dict = {}
        self.count: dict[str, int] = {}
        self.rows: dict[str, list[dict]] = {}  # what ``since`` hands the allocator
        self.directory: Path | None = None
        if directory is not None:
            self.open(directory)

    def open(self, directory: str) -> None:
        self.close()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.count = {}
        self.rows = {}

    def add(self, table: str, row: dict) -> None:
        if self.directory is None:
            raise RuntimeError("Recorder.open(directory) comes before the first row")
        handle = self.files.get(table)
        if handle is None:
            handle = self.files[table] = open(self.directory / f"{table}.jsonl", "a")
        handle.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        handle.flush()
        self.count[table] = self.count.get(table, 0) + 1
        self.rows.setdefault(table, []).append(row)

    def add_many(self, table: str, rows: list[dict]) -> None:
        for row in rows:
            self.add(table, row)

    def counts(self) -> dict[str, int]:
        return dict(self.count)

    def recorded_request_ids(self) -> set[int]:
        """Ids of the request rows recorded so far: the driver accounts for the others."""
        return {row["request_id"] for row in self.rows.get("requests", [])}

    def since(self, table: str, start: int) -> list[dict]:
        """Rows of ``table`` from the ``start``-th on (the allocator's closed loop)."""
        return self.rows.get(table, [])[start:]

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()
        self.files.clear()


def read_table(directory: str | Path, table: str) -> list[dict]:
    path = Path(directory) / f"{table}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
