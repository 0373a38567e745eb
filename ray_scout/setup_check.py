"""``scout setup``: make the machine ready and say what it can do.

Converts the embedded model to its cached checkpoint (once) and reports torch's build,
the GPU, and the cache location. Kernel capabilities are reported by ``net`` once present.
"""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-model", action="store_true",
                        help="do not convert the embedded model")


def run(args: argparse.Namespace) -> int:
    import torch

    from ray_scout.core.llm import models

    print(f"torch {torch.__version__}; GPU: "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    print(f"cache: {models.cache_dir()}")
    if not args.skip_model:
        start = time.perf_counter()
        path = models.embedded_checkpoint()
        print(f"embedded model: {path} ({time.perf_counter() - start:.1f} s)")
    return 0
