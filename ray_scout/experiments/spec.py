"""Experiment specs: YAML in, a validated ``Spec`` out, and the seeded workload it implies.

What lives here: the schema of ``experiments/*.yaml`` (agents, cloud models, network,
capacity trace, policies x allocators, duration, seed), its validation with errors that name
the offending key, the capacity trace a spec describes, and each agent's arrival schedule
(seeded per agent, so every policy/allocator combination replays the same workload). What it
leaves to others: running it (``runner``) and reading results (``report``).

Schema (units in the values: ``50mbit``; times in seconds)::

    name: demo                    # results go to results/<name> unless --out says otherwise
    fidelity: full | profiled | simulated
    duration_s: 60                # arrivals stop here; requests in flight drain
    seed: 0
    epoch_s: 0.1                  # allocator epoch (it also runs at every capacity change)
    network: {bottleneck: lab, impairment: auto | netem | tun | none, borrow: false,
              access_rate: 1gbit}      # optional: every access link at this rate
    capacity:                     # the bottleneck's uplink over time
      kind: constant | markov | segments | mahimahi | throughput_log | file
      rate: 50mbit                # constant
      states: [5mbit, 10mbit, ...]; step_s: 1.0     # markov (Paper B's states by default)
      segments: [[0, 50mbit], [5, 0kbit], [7, 50mbit]]   # segments
      path: traces/x.log          # mahimahi / throughput_log / file (CapacityTrace YAML/CSV)
    cloud: {slots: 1, models: {<cloud model>: {timing: paper_b | <latency profile path>}},
            max_batch: 1, batch_window_s: 0.0}   # micro-batching (1: one request at a time)
    agents:                       # groups; agent names are <name><i>
      - {name: a, count: 2, model: qwen2.5-7b, cloud_model: qwen2.5-7b,
         edge_timing: paper_b | <profile>, context_tokens: [1024], deadline_s: 1.0,
         arrival_rate_hz: 1.0, quality: paper_b:7b-14b | <profile path>,
         estimator: grant | last | ewma | robust, access: lab, new_tokens: 24,
         scout_retention: 0.5, protected_layers: [0],
         task: single_needle | multi_needle | multi_hop}   # full fidelity's samples
    policies: [adaptive, adaptive:offload, static:bf16, static:int8, static:int4, static:scout]
    allocators: [equal, model_aware, greedy, quality_max, optimal]
    safety_margin: 0.1
    baseline: static:int4         # optional: verdicts judge every policy against it too
    sweep:                        # optional (``plan``): dotted keys, one trial per point x
      grid: {capacity.rate: [5mbit, 50mbit], agents.a.count: [2, 8]}   # cartesian
      zip: {agents.a.deadline_s: [0.5, 1.0], duration_s: [30, 60]}     # side by side
    replications: 5               # seeds derived from ``seed``; replication 0 keeps it
    companion: {fidelity: simulated, replications: 20, policies: [...]}   # optional: the
                                  # same conditions again at another fidelity, more requests;
                                  # its verdict heads this run's summary (``plan``)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ray_scout.core.control import capacity as cap
from ray_scout.core.control.allocation import AllocationError, allocate
from ray_scout.core.modes import Mode
from ray_scout.core.control.policy import ProfileError, QualityProfile, paper_b_profile
from ray_scout.net.errors import NetError
from ray_scout.net.profiles import parse_rate_bps

FIDELITIES = ("full", "profiled", "simulated")
ESTIMATORS = ("grant", "last", "ewma", "robust")
STRATEGIES = ("equal", "model_aware", "greedy", "quality_max", "optimal")
REPO_ROOT = Path(__file__).resolve().parents[2]


# The keys each section takes: parse_spec refuses others, and a sweep may set exactly these
# (``plan``). ``sweep``, ``replications`` and ``companion`` belong to the plan, not to one
# point.
TOP_KEYS = frozenset({"name", "description", "fidelity", "duration_s", "seed", "epoch_s",
                      "network", "capacity", "cloud", "agents", "policies", "allocators",
                      "safety_margin", "baseline", "sweep", "replications", "companion"})
NETWORK_KEYS = frozenset({"bottleneck", "impairment", "borrow", "access_rate"})
CAPACITY_KEYS = frozenset({"kind", "rate", "states", "step_s", "segments", "path", "window_s",
                           "seed"})
CLOUD_KEYS = frozenset({"slots", "models", "max_batch", "batch_window_s"})


class SpecError(ValueError):
    """A spec that cannot run; the message names the key and what to write instead."""


@dataclasses.dataclass(frozen=True)
class AgentGroup:
    name: str
    count: int
    model: str
    cloud_model: str
    edge_timing: str
    context_tokens: tuple[int, ...]
    deadline_s: float
    arrival_rate_hz: float
    quality: str
    estimator: str = "grant"
    access: str = "lab"
    new_tokens: int = 24
    scout_retention: float = 0.5
    protected_layers: tuple[int, ...] = (0,)
    task: str = "single_needle"


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    fidelity: str
    duration_s: float
    seed: int
    epoch_s: float
    agents: tuple[AgentGroup, ...]
    cloud_models: dict[str, str]  # cloud model -> timing source
    cloud_slots: int
    bottleneck: str
    impairment: str
    borrow: bool
    capacity: dict
    access_rate_bps: float | None
    policies: tuple[str, ...]
    allocators: tuple[str, ...]
    safety_margin: float = 0.1
    base: Path = REPO_ROOT
    cloud_max_batch: int = 1
    cloud_batch_window_s: float = 0.0
    baseline: str | None = None  # the policy every other is judged against (besides the
    # best static arm); see ``verdict``

    @property
    def agent_names(self) -> list[str]:
        return [f"{g.name}{i}" for g in self.agents for i in range(g.count)]

    def groups_by_agent(self) -> dict[str, AgentGroup]:
        return {f"{g.name}{i}": g for g in self.agents for i in range(g.count)}

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.base / p

    def combinations(self) -> list[tuple[str, str]]:
        return [(p, a) for p in self.policies for a in self.allocators]


def _need(doc: dict, key: str, where: str) -> Any:
    if key not in doc:
        raise SpecError(f"{where}: missing key {key!r}")
    return doc[key]


def _number(value: Any, where: str, integer: bool) -> float:
    try:
        return int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise SpecError(f"{where}: {value!r} is not a number") from None


def _positive(value: Any, where: str, integer: bool = False) -> float:
    number = _number(value, where, integer)
    if not number > 0:
        raise SpecError(f"{where}: must be > 0, not {value!r}")
    return number


def _non_negative(value: Any, where: str) -> float:
    number = _number(value, where, False)
    if not number >= 0:
        raise SpecError(f"{where}: must be >= 0, not {value!r}")
    return number


def _known(value: str, known: tuple[str, ...], where: str) -> str:
    if value not in known:
        raise SpecError(f"{where}: {value!r} is not one of {', '.join(known)}")
    return value


def _agent(doc: dict, i: int) -> AgentGroup:
    where = f"agents[{i}]"
    if not isinstance(doc, dict):
        raise SpecError(f"{where}: must be a mapping of agent settings")
    model = str(_need(doc, "model", where))
    tokens = doc.get("context_tokens", [1024])
    tokens = tuple(int(_positive(t, f"{where}.context_tokens", True))
                   for t in (tokens if isinstance(tokens, list) else [tokens]))
    retention = float(doc.get("scout_retention", 0.5))
    if not 0 < retention <= 1:
        raise SpecError(f"{where}.scout_retention: must lie in (0, 1], not {retention}")
    unknown = set(doc) - {f.name for f in dataclasses.fields(AgentGroup)}
    if unknown:
        raise SpecError(f"{where}: unknown keys {sorted(unknown)}")
    return AgentGroup(
        name=str(doc.get("name", f"a{i}_")), count=int(_positive(doc.get("count", 1),
                                                                 f"{where}.count", True)),
        model=model, cloud_model=str(doc.get("cloud_model", model)),
        edge_timing=str(doc.get("edge_timing", "paper_b")), context_tokens=tokens,
        deadline_s=_positive(_need(doc, "deadline_s", where), f"{where}.deadline_s"),
        arrival_rate_hz=_positive(_need(doc, "arrival_rate_hz", where),
                                  f"{where}.arrival_rate_hz"),
        quality=str(doc.get("quality", "paper_b:7b-14b")),
        estimator=_known(str(doc.get("estimator", "grant")), ESTIMATORS, f"{where}.estimator"),
        access=str(doc.get("access", "lab")),
        new_tokens=int(_positive(doc.get("new_tokens", 24), f"{where}.new_tokens", True)),
        scout_retention=retention,
        protected_layers=tuple(int(x) for x in doc.get("protected_layers", [0])),
        task=str(doc.get("task", "single_needle")))


def _policy(name: str, where: str) -> str:
    if name in ("adaptive", "adaptive:offload"):
        return name
    if name.startswith("static:"):
        try:
            mode = Mode.parse(name.split(":", 1)[1])
        except ValueError as exc:
            raise SpecError(f"{where}: {exc}") from None
        return f"static:{mode.value}"
    raise SpecError(f"{where}: {name!r} is not a policy; use adaptive, adaptive:offload "
                    "or static:<mode>")


def parse_spec(doc: Any, *, base: Path = REPO_ROOT, fidelity: str | None = None) -> Spec:
    """A validated spec from a YAML document; ``fidelity`` overrides the file's."""
    if not isinstance(doc, dict):
        raise SpecError("a spec is a YAML mapping (name, agents, capacity, policies, ...)")
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise SpecError(f"unknown top-level keys {sorted(unknown)}; known: {sorted(TOP_KEYS)}")
    agents_doc = _need(doc, "agents", "spec")
    if not isinstance(agents_doc, list) or not agents_doc:
        raise SpecError("agents: give a list of at least one agent group")
    agents = tuple(_agent(a, i) for i, a in enumerate(agents_doc))
    names = [g.name for g in agents]
    if len(set(names)) != len(names):
        raise SpecError(f"agents: group names must be unique, got {names}")
    network = doc.get("network", {}) or {}
    unknown = set(network) - NETWORK_KEYS
    if unknown:
        raise SpecError(f"network: unknown keys {sorted(unknown)}; known: access_rate, "
                        "borrow, bottleneck, impairment (access profiles are per agent group)")
    cloud = doc.get("cloud", {}) or {}
    unknown = set(cloud) - CLOUD_KEYS
    if unknown:
        raise SpecError(f"cloud: unknown keys {sorted(unknown)}; known: {sorted(CLOUD_KEYS)}")
    models = cloud.get("models") or {g.cloud_model: {"timing": "paper_b"} for g in agents}
    cloud_models = {str(m): str((v or {}).get("timing", "paper_b")) for m, v in models.items()}
    for g in agents:
        if g.cloud_model not in cloud_models:
            raise SpecError(f"agents[{g.name}].cloud_model: {g.cloud_model!r} is not hosted; "
                            f"cloud.models has {sorted(cloud_models)}")
    policies = tuple(_policy(str(p), f"policies[{i}]")
                     for i, p in enumerate(doc.get("policies", ["adaptive"])))
    allocators = tuple(_known(str(a), STRATEGIES, f"allocators[{i}]")
                       for i, a in enumerate(doc.get("allocators", ["equal"])))
    if not policies or not allocators:
        raise SpecError("policies and allocators: give at least one of each")
    baseline = doc.get("baseline")
    if baseline is not None:
        baseline = _policy(str(baseline), "baseline")
        if baseline not in policies:
            raise SpecError(f"baseline: {baseline!r} is not among the policies "
                            f"{list(policies)}; add it there or name one of them")
    spec = Spec(
        name=str(_need(doc, "name", "spec")),
        fidelity=_known(fidelity or str(doc.get("fidelity", "profiled")), FIDELITIES,
                        "fidelity"),
        duration_s=_positive(_need(doc, "duration_s", "spec"), "duration_s"),
        seed=int(doc.get("seed", 0)),
        epoch_s=_positive(doc.get("epoch_s", 0.1), "epoch_s"),
        agents=agents, cloud_models=cloud_models,
        cloud_slots=int(_positive(cloud.get("slots", 1), "cloud.slots", True)),
        bottleneck=str(network.get("bottleneck", "lab")),
        impairment=_known(str(network.get("impairment", "auto")),
                          ("auto", "netem", "tun", "none"), "network.impairment"),
        borrow=bool(network.get("borrow", False)),
        capacity=dict(_need(doc, "capacity", "spec")),
        access_rate_bps=(_rate(network["access_rate"], "network.access_rate")
                         if "access_rate" in network else None), policies=policies,
        allocators=allocators, safety_margin=float(doc.get("safety_margin", 0.1)), base=base,
        cloud_max_batch=int(_positive(cloud.get("max_batch", 1), "cloud.max_batch", True)),
        cloud_batch_window_s=_non_negative(cloud.get("batch_window_s", 0.0),
                                           "cloud.batch_window_s"),
        baseline=baseline)
    capacity_trace(spec)  # validates the capacity section now, not mid-run
    if spec.fidelity == "full":
        from ray_scout.core.evaluation.tasks import TASKS

        for g in agents:
            _known(g.task, tuple(sorted(TASKS)), f"agents[{g.name}].task")
    for g in agents:
        quality_profile(spec, g)
    return spec


def read_document(path: str | Path) -> Any:
    """The YAML document of a spec file (``parse_spec`` or ``plan.parse_plan`` reads it)."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"spec {path} not found; the shipped ones are in experiments/*.yaml")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({exc})") from None


def load_spec(path: str | Path, fidelity: str | None = None) -> Spec:
    return parse_spec(read_document(path), base=REPO_ROOT, fidelity=fidelity)


def _rate(value: Any, where: str) -> float:
    """A rate with a unit; zero (an outage, ``0kbit``) is allowed in a capacity trace."""
    text = str(value).strip().lower()
    if text[:1] == "0" and text.rstrip("kmgbit/s").strip(". ") in ("", "0"):
        return 0.0
    try:
        return float(parse_rate_bps(value))
    except (NetError, ValueError) as exc:
        raise SpecError(f"{where}: {exc}") from None


def capacity_trace(spec: Spec) -> cap.CapacityTrace:
    """The bottleneck capacity over the run, from the spec's ``capacity`` section."""
    doc, where = spec.capacity, "capacity"
    kind = _known(str(doc.get("kind", "constant")),
                  ("constant", "markov", "segments", "mahimahi", "throughput_log", "file"),
                  f"{where}.kind")
    try:
        if kind == "constant":
            return cap.CapacityTrace.constant(_rate(_need(doc, "rate", where), f"{where}.rate"),
                                              spec.duration_s)
        if kind == "markov":
            states = tuple(_rate(s, f"{where}.states") for s in doc.get("states", [])) \
                or cap.PAPER_B_STATES_BPS
            return cap.markov_chain(states, step_s=float(doc.get("step_s", 1.0)),
                                    duration_s=spec.duration_s,
                                    seed=int(doc.get("seed", spec.seed)))
        if kind == "segments":
            segs = [(float(t), _rate(r, f"{where}.segments")) for t, r in
                    _need(doc, "segments", where)]
            return cap.CapacityTrace(tuple(segs), max(spec.duration_s, segs[-1][0] + 1e-3))
        path = spec.path(str(_need(doc, "path", where)))
        if not path.exists():
            raise SpecError(f"{where}.path: {path} not found")
        if kind == "mahimahi":
            return cap.load_mahimahi(path, float(doc.get("window_s", 0.1)))
        if kind == "throughput_log":
            return cap.load_throughput_log(path)
        return cap.CapacityTrace.load(path)
    except cap.TraceError as exc:
        raise SpecError(f"{where}: {exc}") from None


def quality_profile(spec: Spec, group: AgentGroup) -> QualityProfile:
    source = group.quality
    try:
        if source.startswith("paper_b:"):
            return paper_b_profile(source.split(":", 1)[1])
        path = spec.path(source)
        if not path.exists():
            raise SpecError(f"agents[{group.name}].quality: {path} not found; run `scout "
                            "calibrate` for the model pair or use paper_b:<pair>")
        return QualityProfile.load(path)
    except ProfileError as exc:
        raise SpecError(f"agents[{group.name}].quality: {exc}") from None


def arrivals(spec: Spec, agent_index: int, context_tokens: tuple[int, ...],
             rate_hz: float) -> list[tuple[float, int]]:
    """Poisson arrival times (and each one's context length) of one agent, seeded per agent.

    The same (seed, agent index) gives the same schedule for every combination of a spec.
    """
    rng = np.random.default_rng([spec.seed, agent_index])
    out, t = [], rng.exponential(1 / rate_hz)
    while t < spec.duration_s:
        out.append((float(t), int(rng.choice(context_tokens))))
        t += rng.exponential(1 / rate_hz)
    return out


def check_allocators(spec: Spec, demands: list) -> None:
    """Run every allocator once on the first capacity so a bad demand fails before any link."""
    first = capacity_trace(spec).rate_at(0.0)
    for strategy in spec.allocators:
        try:
            allocate(strategy, demands, first)
        except AllocationError as exc:
            raise SpecError(f"allocators: {strategy} cannot split {first:.0f} bit/s: {exc}") \
                from None
