"""Do two quality runs of the same grid cells answer alike? (say, the CPU's and a GPU's rows)

Matches the rows of two results CSVs by ``core.evaluation.quality.row_key`` (models, task,
length, sample, cell) and counts, over the cells both hold, how many have the identical
prediction, the same ``contains`` and the same number of kept positions. Identical
predictions mean the two runs selected and decoded alike, so their tables can stand side by
side. Usage:

    python3 bench/quality_agreement.py A.csv B.csv [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_scout import provenance  # noqa: E402
from ray_scout.core.evaluation.quality import row_key  # noqa: E402
from ray_scout.experiments.quality import read_rows  # noqa: E402


def agreement(first: list[dict], second: list[dict]) -> dict:
    """Counts over the cells both runs hold, and the keys of those that differ."""
    by_key = {row_key(r): r for r in second}
    matched = [(r, by_key[row_key(r)]) for r in first if row_key(r) in by_key]
    differ = [a for a, b in matched if a["prediction"] != b["prediction"]]
    return {
        "rows_first": len(first), "rows_second": len(second), "matched": len(matched),
        "identical_predictions": len(matched) - len(differ),
        "same_contains": sum(a["contains"] == b["contains"] for a, b in matched),
        "same_kept_tokens": sum(a["kept_context_tokens"] == b["kept_context_tokens"]
                                for a, b in matched),
        "differing": [list(row_key(a)) for a in differ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--json", type=Path, help="write the counts here too")
    args = parser.parse_args(argv)
    result = agreement(read_rows(args.first), read_rows(args.second))
    result.update(first=str(args.first), second=str(args.second), **provenance.record())
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0 if result["matched"] else 1


if __name__ == "__main__":
    sys.exit(main())
