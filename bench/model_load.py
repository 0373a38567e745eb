"""Embedded model start-up: GGUF conversion (first start) vs the cached checkpoint (later starts).

    python3 bench/model_load.py [--repeats 3] [--model gemma3-270m] [--out bench/results/model_load.json]

Each measurement runs in a fresh Python process, so peak RSS is that of one start alone.
Prints a table: path, wall seconds (median), peak RSS (MiB).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_scout import provenance  # noqa: E402

CHILD = """
import json, resource, sys, time
start = time.perf_counter()
import torch
from ray_scout.core.llm import models
imported = time.perf_counter()
if sys.argv[1] == "convert":
    models.embedded_checkpoint(sys.argv[3], root=__import__("pathlib").Path(sys.argv[2]))
else:
    models.load_model(models.EMBEDDED_PREFIX + sys.argv[3])
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": done - imported,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(kind: str, root: str, model: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, root, model], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="cached loads to time")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="an embedded model name (ray_scout.core.llm.models.EMBEDDED_MODELS)")
    parser.add_argument("--out", type=Path, help="write every sample as JSON here")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        rows["GGUF conversion (first start)"] = [run("convert", root, args.model)]
    rows["cached safetensors load"] = [run("load", "", args.model)
                                       for _ in range(args.repeats)]
    print(f"{'path':32} {'n':>2} {'load s':>8} {'import s':>9} {'peak RSS MiB':>13}")
    for name, samples in rows.items():
        med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
        print(f"{name:32} {len(samples):2d} {med['load_s']:8.2f} {med['import_s']:9.2f} "
              f"{med['peak_rss_mib']:13.0f}")
    if args.out:
        args.out.write_text(json.dumps(
            {"samples": rows, **provenance.record(),
             "command": "python3 bench/model_load.py " + " ".join(sys.argv[1:])}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
