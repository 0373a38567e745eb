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
              access_rate: 1gbit,      # optional: every access link at this rate
              site_size: 1}            # agents per edge namespace on one machine (default:
                                       # 1 up to 64 agents, else 250: a cell of hundreds)
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
    policies: [adaptive, adaptive:offload, adaptive:queue, static:bf16, static:int8,
               static:int4, static:scout]
    allocators: [equal, model_aware, greedy, quality_max, optimal]
    allocation_objective: expected_hits | mean_response   # docs/POLICY.md, Allocation
    closed_loop: hits | delivered_rate | off   # what the allocator corrects its plan from
                                  # between splits (docs/POLICY.md, Closed loop; default hits)
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

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

from ray_scout.core.control import capacity as cap
from ray_scout.core.control.allocation import (
    CLOSED_LOOPS, OBJECTIVES, AllocationError, allocate,
)
from ray_scout.core.modes import Mode
from ray_scout.core.control.policy import (
    ADAPTIVE_POLICIES, POLICY_NAMES_HINT, ProfileError, QualityProfile, paper_b_profile,
)
from ray_scout.net.errors import NetError
from ray_scout.net.profiles import parse_rate_bps
from ray_scout.net.topology import MAX_SITE_SIZE

FIDELITIES = ("full", "profiled", "simulated")
ESTIMATORS = ("grant", "last", "ewma", "robust")
STRATEGIES = ("equal", "model_aware", "greedy", "quality_max", "optimal")
REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL_LAB_AGENTS = 64

# Upper bounds, so a typo (count: 1000000000) is a one-line error before any work, not a
# machine swapping for a minute (issue 17). Each is far above what the project runs; raise
# one here if a real experiment needs it (docs/RELIABILITY.md lists them).
MAX_AGENTS = 100_000  # in all groups; the simulator's bound (emulation: placement's per node)
# Agents one machine holds: a thread in an edge host, an address and three HTB classes in
# the lab's sites, a connection in the cloud each (1,000 run on a 2-core box: TESTBED.md).
MAX_AGENTS_PER_NODE = 2_000
MAX_CONTEXT_TOKENS = 1 << 20  # the scout decoder's cap (core.llm.scout.MAX_CONTEXT_TOKENS)
MAX_DURATION_S = 7 * 24 * 3600.0
MAX_ARRIVALS = 10_000_000  # expected requests per trial: the workload is built up front
MAX_EPOCHS = 10_000_000  # allocator epochs per trial (duration_s / epoch_s)
MAX_NEW_TOKENS = 32_768


# The keys each section takes: parse_spec refuses others, and a sweep may set exactly these
# (``plan``). ``sweep``, ``replications`` and ``companion`` belong to the plan, not to one
# point.
TOP_KEYS = frozenset({"name", "description", "fidelity", "duration_s", "seed", "epoch_s",
                      "network", "capacity", "cloud", "agents", "policies", "allocators",
                      "safety_margin", "baseline", "sweep", "replications", "companion",
                      "allocation_objective", "closed_loop"})
NETWORK_KEYS = frozenset({"bottleneck", "impairment", "borrow", "access_rate", "site_size"})
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
    site_size: int = 1  # agents per edge namespace in the lab-in-a-box
    allocation_objective: str = "expected_hits"
    closed_loop: str = "hits"  # core.control.allocation.CLOSED_LOOPS
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


def _auto_site_size(agents: tuple[AgentGroup, ...]) -> int:
    """One namespace per agent for small runs (any impairment backend works); shared sites
    of up to ``MAX_SITE_SIZE`` for cells, where a namespace and veth per agent cost too much."""
    return 1 if sum(g.count for g in agents) <= SMALL_LAB_AGENTS else MAX_SITE_SIZE


_SHAPE_ERRORS = (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError)


@contextlib.contextmanager
def _about(where: str) -> Iterator[None]:
    """Turn what Python cannot do with a value of the wrong shape into a SpecError at ``where``."""
    try:
        yield
    except SpecError:
        raise
    except _SHAPE_ERRORS as exc:
        raise SpecError(f"{where}: a value has the wrong type or shape ({type(exc).__name__}: "
                        f"{exc}); see the schema at the top of ray_scout/experiments/spec.py") \
            from None


def _mapping(doc: dict, key: str, prefix: str = "", required: bool = False) -> dict:
    """``doc[key]`` as a mapping ({} when absent or empty, unless ``required``)."""
    value = _need(doc, key, prefix.rstrip(".") or "spec") if required else doc.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{prefix}{key}: must be a mapping of settings, not {value!r}")
    return dict(value)


def _list(doc: dict, key: str, default: list, prefix: str = "") -> list:
    value = doc.get(key, default)
    if not isinstance(value, list):
        raise SpecError(f"{prefix}{key}: must be a list, not {value!r}")
    return value


def _need(doc: dict, key: str, where: str) -> Any:
    if key not in doc:
        raise SpecError(f"{where}: missing key {key!r}")
    return doc[key]


def _number(value: Any, where: str, integer: bool) -> float:
    try:
        return int(value) if integer else float(value)
    except (TypeError, ValueError, OverflowError):
        raise SpecError(f"{where}: {value!r} is not a number") from None


def _positive(value: Any, where: str, integer: bool = False,
              at_most: float | None = None) -> float:
    number = _number(value, where, integer)
    if not number > 0:
        raise SpecError(f"{where}: must be > 0, not {value!r}")
    if at_most is not None and not number <= at_most:
        raise SpecError(f"{where}: {value!r} is over the limit of {at_most:g}; a typo? "
                        "(limits: ray_scout/experiments/spec.py, docs/RELIABILITY.md)")
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


def _only_known(doc: dict, known: set[str], where: str, note: str = "") -> None:
    unknown = set(doc) - known
    if unknown:
        raise SpecError(f"{where}: unknown keys {sorted(unknown)}; known: "
                        f"{', '.join(sorted(known))}{note}")


def _agent(doc: dict, i: int) -> AgentGroup:
    with _about(f"agents[{i}]"):
        return _agent_group(doc, i)


def _agent_group(doc: dict, i: int) -> AgentGroup:
    where = f"agents[{i}]"
    if not isinstance(doc, dict):
        raise SpecError(f"{where}: must be a mapping of agent settings")
    model = str(_need(doc, "model", where))
    tokens = doc.get("context_tokens", [1024])
    tokens = tuple(int(_positive(t, f"{where}.context_tokens", True, MAX_CONTEXT_TOKENS))
                   for t in (tokens if isinstance(tokens, list) else [tokens]))
    retention = _number(doc.get("scout_retention", 0.5), f"{where}.scout_retention", False)
    if not 0 < retention <= 1:
        raise SpecError(f"{where}.scout_retention: must lie in (0, 1], not {retention}")
    _only_known(doc, {f.name for f in dataclasses.fields(AgentGroup)}, where)
    return AgentGroup(
        name=str(doc.get("name", f"a{i}_")),
        count=int(_positive(doc.get("count", 1), f"{where}.count", True, MAX_AGENTS)),
        model=model, cloud_model=str(doc.get("cloud_model", model)),
        edge_timing=str(doc.get("edge_timing", "paper_b")), context_tokens=tokens,
        deadline_s=_positive(_need(doc, "deadline_s", where), f"{where}.deadline_s",
                             at_most=MAX_DURATION_S),
        arrival_rate_hz=_positive(_need(doc, "arrival_rate_hz", where),
                                  f"{where}.arrival_rate_hz", at_most=MAX_ARRIVALS),
        quality=str(doc.get("quality", "paper_b:7b-14b")),
        estimator=_known(str(doc.get("estimator", "grant")), ESTIMATORS, f"{where}.estimator"),
        access=str(doc.get("access", "lab")),
        new_tokens=int(_positive(doc.get("new_tokens", 24), f"{where}.new_tokens", True,
                                 MAX_NEW_TOKENS)),
        scout_retention=retention,
        protected_layers=tuple(int(_non_negative(x, f"{where}.protected_layers"))
                               for x in _list(doc, "protected_layers", [0], f"{where}.")),
        task=str(doc.get("task", "single_needle")))


def _policy(name: str, where: str) -> str:
    if name in ADAPTIVE_POLICIES:
        return name
    if name.startswith("static:"):
        try:
            mode = Mode.parse(name.split(":", 1)[1])
        except ValueError as exc:
            raise SpecError(f"{where}: {exc}") from None
        return f"static:{mode.value}"
    raise SpecError(f"{where}: {name!r} is not a policy; use {POLICY_NAMES_HINT}")


def parse_spec(doc: Any, *, base: Path = REPO_ROOT, fidelity: str | None = None) -> Spec:
    """A validated spec from a YAML document; ``fidelity`` overrides the file's.

    Every failure is a ``SpecError``: the checks below name the key at fault; a value of a
    shape no check foresaw (a list where a number belongs, a null section) still ends as a
    ``SpecError`` saying what Python could not do with it, never as a bare TypeError.
    """
    with _about("spec"):
        return _parse_spec(doc, base, fidelity)


def _parse_spec(doc: Any, base: Path, fidelity: str | None) -> Spec:
    if not isinstance(doc, dict):
        raise SpecError("a spec is a YAML mapping (name, agents, capacity, policies, ...)")
    _only_known(doc, TOP_KEYS, "spec (top level)")
    agents_doc = _need(doc, "agents", "spec")
    if not isinstance(agents_doc, list) or not agents_doc:
        raise SpecError("agents: give a list of at least one agent group")
    agents = tuple(_agent(a, i) for i, a in enumerate(agents_doc))
    names = [g.name for g in agents]
    if len(set(names)) != len(names):
        raise SpecError(f"agents: group names must be unique, got {names}")
    network = _mapping(doc, "network")
    _only_known(network, NETWORK_KEYS, "network", " (access profiles are per agent group)")
    cloud = _mapping(doc, "cloud")
    _only_known(cloud, CLOUD_KEYS, "cloud")
    models = _mapping(cloud, "models", "cloud.") or {g.cloud_model: {"timing": "paper_b"}
                                                     for g in agents}
    for m in models:
        _only_known(_mapping(models, m, "cloud.models."), {"timing"}, f"cloud.models.{m}")
    cloud_models = {str(m): str(_mapping(models, m, "cloud.models.").get("timing", "paper_b"))
                    for m in models}
    _only_known(_mapping(doc, "capacity", required=True), CAPACITY_KEYS, "capacity")
    for g in agents:
        if g.cloud_model not in cloud_models:
            raise SpecError(f"agents[{g.name}].cloud_model: {g.cloud_model!r} is not hosted; "
                            f"cloud.models has {sorted(cloud_models)}")
    policies = tuple(_policy(str(p), f"policies[{i}]")
                     for i, p in enumerate(_list(doc, "policies", ["adaptive"])))
    allocators = tuple(_known(str(a), STRATEGIES, f"allocators[{i}]")
                       for i, a in enumerate(_list(doc, "allocators", ["equal"])))
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
        duration_s=_positive(_need(doc, "duration_s", "spec"), "duration_s",
                             at_most=MAX_DURATION_S),
        seed=int(_number(doc.get("seed", 0), "seed", True)),
        epoch_s=_positive(doc.get("epoch_s", 0.1), "epoch_s"),
        agents=agents, cloud_models=cloud_models,
        cloud_slots=int(_positive(cloud.get("slots", 1), "cloud.slots", True)),
        bottleneck=str(network.get("bottleneck", "lab")),
        impairment=_known(str(network.get("impairment", "auto")),
                          ("auto", "netem", "tun", "none"), "network.impairment"),
        borrow=bool(network.get("borrow", False)),
        capacity=_mapping(doc, "capacity", required=True),
        access_rate_bps=(_rate(network["access_rate"], "network.access_rate")
                         if "access_rate" in network else None), policies=policies,
        allocators=allocators, safety_margin=_non_negative(doc.get("safety_margin", 0.1),
                                                           "safety_margin"), base=base,
        cloud_max_batch=int(_positive(cloud.get("max_batch", 1), "cloud.max_batch", True)),
        cloud_batch_window_s=_non_negative(cloud.get("batch_window_s", 0.0),
                                           "cloud.batch_window_s"),
        site_size=int(_positive(network.get("site_size", _auto_site_size(agents)),
                                "network.site_size", True)),
        allocation_objective=_known(str(doc.get("allocation_objective", "expected_hits")),
                                    OBJECTIVES, "allocation_objective"),
        closed_loop=_known(str(doc.get("closed_loop", "hits")), CLOSED_LOOPS, "closed_loop"),
        baseline=baseline)
    if spec.site_size > MAX_SITE_SIZE:
        raise SpecError(f"network.site_size: at most {MAX_SITE_SIZE} agents share a site, "
                        f"not {spec.site_size}")
    _check_totals(spec)
    with _about("capacity"):
        capacity_trace(spec, first_step_only=True)  # the section is checked now, not mid-run
    if spec.fidelity == "full":
        from ray_scout.core.evaluation.tasks import TASKS

        for g in agents:
            _known(g.task, tuple(sorted(TASKS)), f"agents[{g.name}].task")
    for g in agents:
        quality_profile(spec, g)
    return spec


def spec_path(name_or_path: str | Path) -> Path:
    """The spec file a user means: a path as given, else ``experiments/<name>.yaml`` for a
    bare name such as ``adaptive_vs_static``."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = REPO_ROOT / "experiments" / (path.name if path.suffix else f"{path.name}.yaml")
    if len(path.parts) == 1 and shipped.exists():
        return shipped
    names = ", ".join(sorted(p.stem for p in (REPO_ROOT / "experiments").glob("*.yaml")))
    raise SpecError(f"spec {name_or_path} not found; give a YAML path or a shipped spec's "
                    f"name: {names}")


def _check_totals(spec: Spec) -> None:
    """Bounds on what the spec adds up to: agents, requests and epochs of one trial."""
    total = sum(g.count for g in spec.agents)
    if total > MAX_AGENTS:
        raise SpecError(f"agents: {total} agents in all groups, over the limit of {MAX_AGENTS}; "
                        "lower agents[*].count")
    arrivals_ = sum(g.count * g.arrival_rate_hz for g in spec.agents) * spec.duration_s
    if arrivals_ > MAX_ARRIVALS:
        raise SpecError(f"agents[*].count x arrival_rate_hz x duration_s: about {arrivals_:.3g} "
                        f"requests per trial, over the limit of {MAX_ARRIVALS:g}; lower one of them")
    if spec.duration_s / spec.epoch_s > MAX_EPOCHS:
        raise SpecError(f"epoch_s: {spec.epoch_s:g} s over duration_s={spec.duration_s:g} makes "
                        f"over {MAX_EPOCHS:g} allocator epochs; raise epoch_s")


def check_placement(agents_per_node: dict[str, int]) -> None:
    """Raise unless every node can hold the agents placed on it (emulated fidelities)."""
    for node, count in agents_per_node.items():
        if count > MAX_AGENTS_PER_NODE:
            raise SpecError(f"agents[*].count: {count} agents on {node}, over the limit of "
                            f"{MAX_AGENTS_PER_NODE} per machine (a thread, an address and its "
                            "classes, a cloud connection each); add edge nodes or use "
                            "--fidelity simulated")


# A spec is a page of YAML; anything this long is not one (and YAML's aliases make a
# short file expand, so the text is bounded before it is parsed).
MAX_SPEC_BYTES = 1 << 20


def read_document(path: str | Path) -> Any:
    """The YAML document of a spec file, by path or by a shipped spec's name (``parse_spec``
    or ``plan.parse_plan`` reads it)."""
    path = spec_path(path)
    if path.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: {path.stat().st_size} bytes, over the limit of {MAX_SPEC_BYTES} "
                        "for a spec; is this the right file?")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot be read as text ({exc})") from None
    return _yaml(text, str(path))


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{where}: not valid YAML ({exc})") from None


def parse_spec_text(text: str, where: str = "spec", fidelity: str | None = None) -> Spec:
    """A validated spec from YAML text; ``SpecError`` for anything else."""
    return parse_spec(_yaml(text, where), base=REPO_ROOT, fidelity=fidelity)


def load_spec(path: str | Path, fidelity: str | None = None) -> Spec:
    return parse_spec(read_document(path), base=REPO_ROOT, fidelity=fidelity)


def spec_text_as_run(text: str, fidelity: str) -> str:
    """The spec file's text with ``fidelity`` set to the one that ran (``--fidelity``), its
    comments kept, so the results folder's ``spec.yaml`` is what ran."""
    line = f"fidelity: {fidelity}  # as run (scout run --fidelity)"
    lines = text.splitlines()
    at = [i for i, raw in enumerate(lines) if raw.startswith("fidelity:")]
    if at:
        if yaml.safe_load(lines[at[0]])["fidelity"] == fidelity:
            return text
        lines[at[0]] = line
    else:
        lines.append(line)
    edited = "\n".join(lines) + "\n"
    if (yaml.safe_load(edited) or {}).get("fidelity") != fidelity:  # a flow-style document
        doc = dict(yaml.safe_load(text), fidelity=fidelity)
        edited = yaml.safe_dump(doc, sort_keys=False)
    return edited


def _rate(value: Any, where: str) -> float:
    """A rate with a unit; zero (an outage, ``0kbit``) is allowed in a capacity trace."""
    text = str(value).strip().lower()
    if text[:1] == "0" and text.rstrip("kmgbit/s").strip(". ") in ("", "0"):
        return 0.0
    try:  # bounded there to what HTB can shape
        return float(parse_rate_bps(value))
    except (NetError, ValueError) as exc:
        raise SpecError(f"{where}: {exc}") from None


def capacity_trace(spec: Spec, *, first_step_only: bool = False) -> cap.CapacityTrace:
    """The bottleneck capacity over the run, from the spec's ``capacity`` section.

    ``first_step_only`` checks a Markov section by drawing its first step alone: a week at
    1 s steps takes seconds to draw, and every check it could fail is made on the first.
    """
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
            step_s = _positive(doc.get("step_s", 1.0), f"{where}.step_s")
            if spec.duration_s / step_s > MAX_EPOCHS:
                raise SpecError(f"{where}.step_s: {step_s:g} s over duration_s={spec.duration_s:g} "
                                f"makes over {MAX_EPOCHS:g} capacity steps; raise step_s")
            return cap.markov_chain(states, step_s=step_s,
                                    duration_s=min(step_s, spec.duration_s) if first_step_only
                                    else spec.duration_s,
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
            allocate(strategy, demands, first, spec.allocation_objective)
        except AllocationError as exc:
            raise SpecError(f"allocators: {strategy} cannot split {first:.0f} bit/s: {exc}") \
                from None
