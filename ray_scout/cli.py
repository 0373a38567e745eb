"""The one ``scout`` command: each subcommand lives beside the layer it drives.

Subcommands are registered by name in ``COMMANDS`` and imported only when chosen, so
``scout --help`` and ``scout run --help`` answer without importing torch, and a missing
optional dependency breaks only its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help); each module defines add_arguments(parser) and run(args) -> int,
# or, for "module:part", add_part_arguments(parser) and run_part(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "setup": ("ray_scout.setup_check", "convert the embedded model once and check the machine"),
    "quality": ("ray_scout.experiments.quality", "run a quality grid (selection x retention x mode) and summarize it"),
    "calibrate": ("ray_scout.experiments.calibrate", "measure a model pair's quality per mode and write its QualityProfile"),
    "cross-family": ("ray_scout.experiments.cross_family", "one model family's Q2C selection answered by another's: coverage, alignment, quality"),
    "net": ("ray_scout.net.cli", "links: probe the kernel, list profiles, clean up leftovers, hold a topology up"),
    "run": ("ray_scout.experiments.runner", "run an experiment spec (experiments/<name>.yaml) and report it"),
    "report": ("ray_scout.experiments.report", "rewrite summary.md and plots of a results directory"),
    "cluster": ("ray_scout.cluster", "the lab cluster: check a `ray up` YAML before any ssh"),
    "submit": ("ray_scout.jobs:submit", "run a spec on a Ray cluster as a Ray Job (Jobs tab)"),
    "stop": ("ray_scout.jobs:stop", "stop a submitted job: links and actors torn down"),
    "fetch": ("ray_scout.jobs:fetch", "bring a submitted job's results to this machine"),
}


def _entry(target: str, verb: str):
    """The function for ``verb`` ("add_arguments" or "run") of a COMMANDS target."""
    module, _, part = target.partition(":")
    if part:
        verb = f"run_{part}" if verb == "run" else f"add_{part}_arguments"
    return getattr(importlib.import_module(module), verb)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``only`` the arguments of that one subcommand (the others
    keep their name and help, so ``scout --help`` lists them without importing them)."""
    parser = argparse.ArgumentParser(prog="scout", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_target=module)
        if only is None or only == name:
            _entry(module, "add_arguments")(command)
    return parser


def _chosen(argv: list[str]) -> str:
    """The subcommand named in ``argv`` ("" when none is: ``scout --help``)."""
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(only=_chosen(argv)).parse_args(argv)
    return _entry(args._target, "run")(args)


if __name__ == "__main__":
    sys.exit(main())
