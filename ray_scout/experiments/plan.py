"""Sweeps and replications: one spec file, many points, each a ``Spec`` of its own.

What lives here: the ``sweep`` and ``replications`` keys of a spec (see ``spec``'s schema),
expanded into points (a grid is cartesian over its keys, a zip walks its lists side by side
as one axis, crossed with the grid), each point replicated with a seed derived from the
spec's; every point x replication x policy x allocator is one ``Trial``. Every arm of a
point x replication shares one ``Spec`` and so one seed: the same arrivals, context lengths,
documents and questions, which makes their comparison paired. What it knows: the spec's
keys, to say which swept key is wrong. What it leaves to others: running trials (``sweep``),
judging them (``verdict``).

Dotted keys address the YAML: ``capacity.rate``, ``network.access_rate``, ``cloud.slots``,
``agents.<group name or index>.deadline_s``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from ray_scout.experiments.spec import (
    CAPACITY_KEYS,
    CLOUD_KEYS,
    NETWORK_KEYS,
    REPO_ROOT,
    TOP_KEYS,
    AgentGroup,
    Spec,
    SpecError,
    parse_spec,
    read_document,
)

_SECTION_KEYS = {"network": NETWORK_KEYS, "capacity": CAPACITY_KEYS, "cloud": CLOUD_KEYS}
_AGENT_KEYS = frozenset(f.name for f in dataclasses.fields(AgentGroup))
_PLAN_KEYS = ("sweep", "replications", "companion")
_COMPANION_KEYS = frozenset({"fidelity", "replications", "policies", "epoch_s"})


def replication_seed(seed: int, replication: int) -> int:
    """The seed of ``replication``: the spec's own for 0 (a one-replication run is today's
    run), else a hash of (seed, replication) that no nearby seed or replication shares."""
    if replication == 0:
        return seed
    state = np.random.SeedSequence([seed, replication]).generate_state(1)[0]
    return int(state) & 0x7FFF_FFFF


@dataclasses.dataclass(frozen=True)
class Point:
    """One point of the sweep at one replication: the swept values and the spec they make."""

    index: int
    values: dict[str, Any]  # swept key -> the value as written in the YAML
    replication: int
    spec: Spec


@dataclasses.dataclass(frozen=True)
class Trial:
    """One arm of one point at one replication: the unit that runs, is recorded and resumed."""

    point: Point
    policy: str
    allocator: str

    @property
    def trial_id(self) -> str:
        return (f"p{self.point.index:03d}-r{self.point.replication:02d}-"
                f"{self.policy.replace(':', '-')}-{self.allocator}")

    def columns(self) -> dict[str, Any]:
        """What every row of this trial carries: the point's keys, replication, arm."""
        return {"trial_id": self.trial_id, "point": self.point.index, **self.point.values,
                "replication": self.point.replication, "seed": self.point.spec.seed,
                "policy": self.policy, "allocator": self.allocator}


@dataclasses.dataclass(frozen=True)
class Plan:
    base: Spec  # the spec as written, nothing swept (what names the run)
    keys: tuple[str, ...]  # swept keys, grid's first, then zip's
    axes: tuple[tuple[str, ...], ...]  # keys that move together: one per grid key, the zip
    points: tuple[Point, ...]  # every point x replication, point-major
    replications: int
    digest: str  # of the document: a results directory resumes only the same plan
    companion: Plan | None = None  # the same conditions at another fidelity (``companion``)

    @property
    def is_sweep(self) -> bool:
        return bool(self.keys) or self.replications > 1

    def trials(self) -> list[Trial]:
        return [Trial(p, policy, allocator) for p in self.points
                for policy, allocator in p.spec.combinations()]


def _child(node: Any, segment: str, where: str) -> Any:
    if isinstance(node, list):  # agent groups: by name, else by index
        for group in node:
            if isinstance(group, dict) and str(group.get("name")) == segment:
                return group
        if segment.isdigit() and int(segment) < len(node):
            return node[int(segment)]
        names = [str(g.get("name")) for g in node if isinstance(g, dict)]
        raise SpecError(f"sweep key {where!r}: no agent group {segment!r}; groups: {names} "
                        f"(or an index below {len(node)})")
    if not isinstance(node, dict) or segment not in node:
        have = sorted(node) if isinstance(node, dict) else []
        raise SpecError(f"sweep key {where!r}: {segment!r} is not in the spec here "
                        f"(it has {have})")
    return node[segment]


def set_key(doc: dict, key: str, value: Any) -> None:
    """Set the dotted ``key`` of a spec document in place; a key the spec cannot take is an
    error that names it and what the section takes."""
    parts = key.split(".")
    if not all(parts):
        raise SpecError(f"sweep key {key!r}: empty part; write e.g. capacity.rate")
    if parts[0] in _PLAN_KEYS:
        raise SpecError(f"sweep key {key!r}: sweeps and replications cannot be swept")
    if len(parts) == 1:
        allowed, node = TOP_KEYS, doc
    elif parts[0] in _SECTION_KEYS and len(parts) == 2:
        allowed, node = _SECTION_KEYS[parts[0]], doc.setdefault(parts[0], {})
    elif parts[0] == "agents" and len(parts) == 3:
        allowed, node = _AGENT_KEYS, _child(_child(doc, "agents", key), parts[1], key)
    else:  # deeper (cloud.models.<m>.timing): only keys the spec already has
        node = doc
        for part in parts[:-1]:
            node = _child(node, part, key)
        allowed = frozenset(node) if isinstance(node, dict) else frozenset()
    if parts[-1] not in allowed:
        raise SpecError(f"sweep key {key!r}: {parts[-1]!r} is not a key there; known: "
                        f"{sorted(allowed)}")
    node[parts[-1]] = copy.deepcopy(value)


def _axes(sweep: Any) -> tuple[list[str], list[list[tuple]]]:
    """Swept keys and the axes of the product: one per grid key, one for all zipped keys."""
    if sweep is None:
        return [], []
    if not isinstance(sweep, dict) or not sweep or set(sweep) - {"grid", "zip"}:
        raise SpecError("sweep: give grid: {key: [values]} and/or zip: {key: [values]} "
                        "(zipped lists of equal length)")
    keys, axes = [], []
    for kind in ("grid", "zip"):
        block = sweep.get(kind) or {}
        if not isinstance(block, dict):
            raise SpecError(f"sweep.{kind}: a mapping of dotted keys to lists of values")
        for key, values in block.items():
            if not isinstance(values, list) or not values:
                raise SpecError(f"sweep.{kind}.{key}: give a non-empty list of values")
            if key in keys:
                raise SpecError(f"sweep: {key!r} is swept twice (grid and zip)")
            keys.append(str(key))
        if kind == "grid":
            axes += [[(v,) for v in values] for values in block.values()]
        elif block:
            lengths = {k: len(v) for k, v in block.items()}
            if len(set(lengths.values())) != 1:
                raise SpecError(f"sweep.zip: lists of unequal length {lengths}; zipped keys "
                                "move together, so give each the same number of values")
            axes.append(list(zip(*block.values())))
    return keys, axes


def parse_plan(doc: Any, *, base: Path = REPO_ROOT, fidelity: str | None = None) -> Plan:
    """The plan of a spec document: a spec without ``sweep`` or ``replications`` is one
    point with one replication, exactly as ``parse_spec`` reads it."""
    if not isinstance(doc, dict):
        raise SpecError("a spec is a YAML mapping (name, agents, capacity, policies, ...)")
    replications = doc.get("replications", 1)
    if not isinstance(replications, int) or isinstance(replications, bool) or replications < 1:
        raise SpecError(f"replications: a whole number >= 1, not {replications!r}")
    keys, axes = _axes(doc.get("sweep"))
    plain = {k: v for k, v in doc.items() if k not in _PLAN_KEYS}
    base_spec = parse_spec(plain, base=base, fidelity=fidelity)
    points = []
    for index, combo in enumerate(itertools.product(*axes)):
        values = dict(zip(keys, itertools.chain.from_iterable(combo)))
        point_doc = copy.deepcopy(plain)
        for key, value in values.items():
            set_key(point_doc, key, value)
        for replication in range(replications):
            point_doc["seed"] = replication_seed(base_spec.seed, replication)
            try:
                spec = parse_spec(point_doc, base=base, fidelity=fidelity)
            except SpecError as exc:
                raise SpecError(f"sweep point {values}: {exc}") from None
            points.append(Point(index, values, replication, spec))
    text = json.dumps(doc, sort_keys=True, default=str) + f"|{base_spec.fidelity}"
    zipped = tuple(k for k in keys if k in (doc.get("sweep") or {}).get("zip", {}) or {})
    axes = tuple((k,) for k in keys if k not in zipped) + ((zipped,) if zipped else ())
    return Plan(base_spec, tuple(keys), axes, tuple(points), replications,
                hashlib.sha256(text.encode()).hexdigest()[:16],
                _companion(doc, base) if "companion" in doc else None)


def _companion(doc: dict, base: Path) -> Plan:
    """The plan of ``companion``: the document with its fidelity, replications, policies and
    epoch in place of the spec's (a showcase's verdict at the same conditions)."""
    block = doc["companion"]
    if not isinstance(block, dict) or set(block) - _COMPANION_KEYS or "fidelity" not in block:
        raise SpecError(f"companion: give fidelity and optionally replications, policies, epoch_s "
                        f"({sorted(_COMPANION_KEYS)}), e.g. {{fidelity: simulated, "
                        "replications: 20}")
    other = {k: v for k, v in doc.items() if k != "companion"}
    other.update({k: v for k, v in block.items() if k != "fidelity"})
    try:
        return parse_plan(other, base=base, fidelity=str(block["fidelity"]))
    except SpecError as exc:
        raise SpecError(f"companion: {exc}") from None


def load_plan(path: str | Path, fidelity: str | None = None) -> Plan:
    return parse_plan(read_document(path), base=REPO_ROOT, fidelity=fidelity)

