"""Result rows in a CSV that grows as they are measured, so an interrupted run resumes.

What lives here: a typed table of one kind of row (its columns, which are integers and which
floats), read back with its numbers typed, refusing a file whose columns differ, and appended
to as rows come, flushed a row or a sample at a time. Used by ``scout quality`` /
``scout calibrate`` and ``scout cross-family``; what a row means stays with them.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RowStore:
    """One CSV layout. ``flush_by``: flush when this column's value changes (a sample's rows
    land together), or after every row when None."""

    fields: Sequence[str]
    ints: Sequence[str]
    floats: Sequence[str]
    error: type[Exception]
    flush_by: str | None = None

    def read(self, path: Path) -> list[dict]:
        """The rows on file with numbers typed (none when the file does not exist)."""
        if not path.exists():
            return []
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if list(reader.fieldnames or []) != list(self.fields):
                raise self.error(f"{path} has columns {reader.fieldnames}, expected "
                                 f"{list(self.fields)}; write to a new file")
            rows = list(reader)
        for row in rows:
            row.update({k: int(row[k]) for k in self.ints})
            row.update({k: float(row[k]) for k in self.floats})
        return rows

    def append(self, path: Path, rows: Iterable[dict]) -> int:
        """Append rows as they come; a stop loses at most the group being written."""
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        count = 0
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.fields))
            if new:
                writer.writeheader()
            pending: list[dict] = []
            for row in rows:
                if pending and (self.flush_by is None
                                or row[self.flush_by] != pending[0][self.flush_by]):
                    writer.writerows(pending)
                    handle.flush()
                    count += len(pending)
                    pending = []
                pending.append({k: row[k] for k in self.fields})
            writer.writerows(pending)
            count += len(pending)
        return count
