"""The adaptive transport policy: which mode an edge agent uses for one request.

What lives here: quality profiles (expected quality per mode for a model pair), the latency
model of one request per mode (edge compute, bytes on the wire, RTT, TCP slow start, cloud
queue and compute, including scout's cloud re-prefill), the adaptive policy of Paper B and
static baselines behind one ``decide`` interface. What it knows: numbers handed to it.
What it leaves to others: payload sizes (``kvcodec`` computes them, the caller passes them
in), bandwidth estimates (``estimators``), and measuring quality (``scout calibrate``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping, Protocol

import yaml

from ray_scout.core.modes import CLOUD_MODES, Mode


class ProfileError(ValueError):
    """A quality profile or latency model that cannot be used."""


@dataclasses.dataclass(frozen=True)
class ModeQuality:
    """Expected quality of one mode: a mean, with sample count and 95% CI where measured."""

    mean: float
    n: int | None = None
    ci_low: float | None = None
    ci_high: float | None = None


@dataclasses.dataclass(frozen=True)
class QualityProfile:
    """Expected quality per mode for one (edge model, cloud model, task) combination.

    ``metric`` says what the numbers are: ``relative_f1`` (F1 over the cloud model's own
    full-KV F1, so BF16 is 1.0) or ``f1`` (absolute). A mode absent from ``modes`` has no
    known quality; the policy never picks it except ``local`` as the last resort.
    """

    name: str
    edge_model: str
    cloud_model: str
    metric: str
    modes: Mapping[Mode, ModeQuality]
    source: str = ""

    def __post_init__(self) -> None:
        if self.metric not in ("relative_f1", "f1"):
            raise ProfileError(f"metric must be 'relative_f1' or 'f1', not {self.metric!r}")
        object.__setattr__(self, "modes", {Mode.parse(m) if isinstance(m, str) else m: q
                                           for m, q in self.modes.items()})

    def quality(self, mode: Mode) -> float | None:
        q = self.modes.get(mode)
        return None if q is None else q.mean

    def to_dict(self) -> dict:
        return {
            "name": self.name, "edge_model": self.edge_model, "cloud_model": self.cloud_model,
            "metric": self.metric, "source": self.source,
            "modes": {m.value: {k: v for k, v in dataclasses.asdict(q).items() if v is not None}
                      for m, q in self.modes.items()},
        }

    @classmethod
    def from_dict(cls, doc: Mapping) -> "QualityProfile":
        try:
            modes = {Mode.parse(m): ModeQuality(**q) for m, q in doc["modes"].items()}
            return cls(doc["name"], doc["edge_model"], doc["cloud_model"], doc["metric"],
                       modes, doc.get("source", ""))
        except (KeyError, TypeError) as exc:
            raise ProfileError(f"a quality profile needs name, edge_model, cloud_model, "
                               f"metric and modes of {{mean, n, ci_low, ci_high}} ({exc})") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2))
        elif path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            raise ProfileError(f"cannot save a profile as {path.suffix!r}; use .yaml or .json")

    @classmethod
    def load(cls, path: str | Path) -> "QualityProfile":
        path = Path(path)
        if path.suffix == ".json":
            return cls.from_dict(json.loads(path.read_text()))
        if path.suffix in (".yaml", ".yml"):
            return cls.from_dict(yaml.safe_load(path.read_text()))
        raise ProfileError(f"cannot load a profile from {path.suffix!r}; use .yaml or .json")


# Paper B, scout cross-model transfer at 75% retention: scout F1 / cloud's own F1.
_PAPER_B_SCOUT = {
    "3b-7b": ("qwen2.5-3b", "qwen2.5-7b", 0.490 / 0.603),
    "3b-14b": ("qwen2.5-3b", "qwen2.5-14b", 0.541 / 0.648),
    "7b-14b": ("qwen2.5-7b", "qwen2.5-14b", 0.714 / 0.648),
}


def paper_b_profile(pair: str = "7b-14b") -> QualityProfile:
    """Paper B's published relative quality, for comparison with calibrated profiles.

    KV modes from its modes table (Qwen2.5-7B, SQuAD v2): BF16 100%, INT8 99.6%, INT4 96.2%,
    mixed INT4 107%; scout from its cross-model table for ``pair`` (3b-7b 81%, 3b-14b 83%,
    7b-14b 110%). ``local`` is absent: the paper does not report the edge model alone.
    """
    try:
        edge, cloud, scout = _PAPER_B_SCOUT[pair]
    except KeyError:
        raise ProfileError(f"unknown Paper B pair {pair!r}; known: "
                           f"{', '.join(_PAPER_B_SCOUT)}") from None
    modes = {Mode.BF16: 1.0, Mode.INT8: 0.996, Mode.INT4: 0.962, Mode.MIXED_INT4: 1.07,
             Mode.SCOUT: round(scout, 3)}
    return QualityProfile(f"paper_b_{pair}", edge, cloud, "relative_f1",
                          {m: ModeQuality(q, n=50) for m, q in modes.items()},
                          source="Paper B (Cheng & Liao 2026), modes and scout tables, n=50")


@dataclasses.dataclass(frozen=True)
class LatencyBreakdown:
    edge_s: float
    tx_s: float
    rtt_s: float
    cloud_queue_s: float
    cloud_s: float

    @property
    def total_s(self) -> float:
        return self.edge_s + self.tx_s + self.rtt_s + self.cloud_queue_s + self.cloud_s


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    """Expected latency of one request per mode, every term in seconds.

    ``edge_s[mode]``: edge prefill + selection + encode (for ``local``: the whole edge answer).
    ``cloud_s[mode]``: decode + rebuild for KV modes; for ``scout`` it must include the cloud
    re-prefill of the context, which Paper B called negligible (review, critique 2.3).
    ``rtt_s`` is paid once (request out, answer back). With ``slow_start`` on, a transfer on a
    fresh TCP window spends ACK-clocked rounds of ``rtt_s`` while its window (starting at
    ``initial_window_segments`` x ``mss_bytes`` and doubling) is below the bandwidth-delay
    product; this ignores loss, so it is a lower bound on TCP's time, not a TCP model.
    """

    edge_s: Mapping[Mode, float]
    cloud_s: Mapping[Mode, float]
    rtt_s: float = 0.0
    cloud_queue_s: float = 0.0
    slow_start: bool = False
    mss_bytes: int = 1448
    initial_window_segments: int = 10

    def __post_init__(self) -> None:
        terms = list(self.edge_s.values()) + list(self.cloud_s.values())
        if min(terms + [self.rtt_s, self.cloud_queue_s], default=0) < 0:
            raise ProfileError("latency terms must be >= 0 s")

    def transfer_s(self, payload_bytes: int, rate_bps: float) -> float:
        if payload_bytes == 0:
            return 0.0
        if rate_bps <= 0:
            return math.inf
        if not self.slow_start or self.rtt_s == 0:
            return payload_bytes * 8 / rate_bps
        bdp_bytes = rate_bps * self.rtt_s / 8
        window = self.initial_window_segments * self.mss_bytes
        sent, t = 0, 0.0
        while window < bdp_bytes and sent + window < payload_bytes:
            sent += window
            t += self.rtt_s
            window *= 2
        return t + (payload_bytes - sent) * 8 / rate_bps

    def breakdown(self, mode: Mode, payload_bytes: int, rate_bps: float) -> LatencyBreakdown:
        if mode == Mode.LOCAL:
            return LatencyBreakdown(self._term(self.edge_s, mode, "edge_s"), 0.0, 0.0, 0.0, 0.0)
        return LatencyBreakdown(
            self._term(self.edge_s, mode, "edge_s"), self.transfer_s(payload_bytes, rate_bps),
            self.rtt_s, self.cloud_queue_s, self._term(self.cloud_s, mode, "cloud_s"))

    def latency_s(self, mode: Mode, payload_bytes: int, rate_bps: float) -> float:
        return self.breakdown(mode, payload_bytes, rate_bps).total_s

    def fixed_s(self, mode: Mode) -> float:
        """Everything but the bytes on the wire (what an allocator subtracts from a deadline)."""
        return self.breakdown(mode, 0, 0.0).total_s

    @staticmethod
    def _term(terms: Mapping[Mode, float], mode: Mode, what: str) -> float:
        try:
            return terms[mode]
        except KeyError:
            raise ProfileError(f"latency model has no {what} for mode {mode.value}; add it "
                               "(measure it with the latency profiler)") from None


def paper_b_latency(rtt_s: float = 0.0) -> LatencyModel:
    """Paper A/B's published per-stage times for Qwen2.5-7B edge and a 14B cloud.

    Edge: prefill 18 ms + compress 3 ms (scout: prefill and selection, no compression;
    selection cost unpublished, so only prefill). Cloud: decompress 1 ms + decode 500 ms
    (the paper's lower bound); scout adds the 14B re-prefill of 57 ms (review, 2.3).
    ``local`` has no published edge-only answer time and is left out.
    """
    edge = {m: 0.018 + 0.003 for m in (Mode.BF16, Mode.INT8, Mode.INT4, Mode.MIXED_INT4)}
    edge[Mode.SCOUT] = 0.018
    cloud = {m: 0.001 + 0.5 for m in (Mode.BF16, Mode.INT8, Mode.INT4, Mode.MIXED_INT4)}
    cloud[Mode.SCOUT] = 0.057 + 0.5
    return LatencyModel(edge, cloud, rtt_s=rtt_s)


# Expected hits closer than this count as equal (``QueueAwarePolicy``): float noise, not a
# request more in time.
HIT_TOLERANCE = 1e-9

# Paper B modes table (Qwen2.5-7B context): payload bytes per mode.
PAPER_B_PAYLOAD_BYTES = {Mode.BF16: 9_700_000, Mode.INT8: 4_700_000, Mode.INT4: 2_300_000,
                         Mode.MIXED_INT4: 2_600_000, Mode.SCOUT: 336}


@dataclasses.dataclass(frozen=True)
class PolicyInput:
    """What an agent knows when it takes a request from its queue.

    ``queue_deadlines_s``: the time left (from now) of each request waiting behind this one,
    in the order the agent will serve them; ``arrival_rate_hz``: the agent's mean request
    rate; ``request_deadline_s``: the whole deadline a new request gets (None: this one's
    time left). The myopic policies ignore them; ``QueueAwarePolicy`` plans with them.
    """

    bandwidth_bps: float
    deadline_s: float  # time left for this request, from now
    payload_bytes: Mapping[Mode, int]
    latency: LatencyModel
    queue_deadlines_s: tuple[float, ...] = ()
    arrival_rate_hz: float = 0.0
    request_deadline_s: float | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    mode: Mode
    reason: str
    expected_latency_s: Mapping[Mode, float]  # at the planning (margin-discounted) rate
    expected_quality: Mapping[Mode, float | None]
    feasible: tuple[Mode, ...]
    planning_rate_bps: float


class Policy(Protocol):
    name: str
    # Every mode ``decide`` may return, a fallback included: what an agent's demand offers
    # the allocator, so no agent is planned on a mode it would never send.
    choices: tuple[Mode, ...]
    # The fraction of the bandwidth estimate kept in reserve when planning; an allocator
    # sizes the agent's rate with it (``allocation.demand_for``).
    safety_margin: float
    # Whether it sends a mode other than its fastest only when a request arriving during
    # the transfer could still be served in time (``QueueAwarePolicy``); the allocator's
    # model of an adaptive agent follows it.
    guards_next_arrival: bool

    def decide(self, request: PolicyInput) -> Decision: ...


def _expected(request: PolicyInput, rate_bps: float, modes) -> dict[Mode, float]:
    out = {}
    for m in modes:
        if m not in request.payload_bytes and m != Mode.LOCAL:
            continue
        if m == Mode.LOCAL and m not in request.latency.edge_s:
            continue
        out[m] = request.latency.latency_s(m, request.payload_bytes.get(m, 0), rate_bps)
    return out


class AdaptivePolicy:
    """Highest expected quality among modes that meet the deadline at a discounted rate.

    The rate planned for is ``bandwidth_bps * (1 - safety_margin)``: the margin absorbs
    estimation error on the quantity that varies most. Ties in quality go to the smaller
    payload. ``local`` competes like any mode when the profile knows its quality and the
    latency model its time; with the link down or nothing feasible it is the answer anyway.
    """

    guards_next_arrival = False

    def __init__(self, profile: QualityProfile, safety_margin: float = 0.1,
                 modes: tuple[Mode, ...] = CLOUD_MODES + (Mode.LOCAL,)):
        if not 0 <= safety_margin < 1:
            raise ProfileError(f"safety_margin must lie in [0, 1), not {safety_margin}")
        self.profile = profile
        self.safety_margin = safety_margin
        self.modes = tuple(m for m in modes if profile.quality(m) is not None)
        if not self.modes:
            raise ProfileError(f"profile {profile.name} has no quality for any of {modes}")
        self.choices = tuple(dict.fromkeys(self.modes + (Mode.LOCAL,)))
        self.name = f"adaptive(margin={safety_margin:g})"

    def _upper(self, mode: Mode) -> float:
        q = self.profile.modes[mode]
        return q.mean if q.ci_high is None else max(q.mean, q.ci_high)

    def decide(self, request: PolicyInput) -> Decision:
        rate = max(request.bandwidth_bps, 0.0) * (1 - self.safety_margin)
        latency = _expected(request, rate, tuple(dict.fromkeys(self.modes + (Mode.LOCAL,))))
        quality = {m: self.profile.quality(m) for m in latency}
        feasible = tuple(m for m in self.modes
                         if m in latency and latency[m] <= request.deadline_s)

        def fallback(reason: str) -> Decision:
            return Decision(Mode.LOCAL, reason, latency, quality, feasible, rate)

        if request.bandwidth_bps <= 0:
            return fallback("link down (bandwidth 0): answer at the edge")
        if not feasible:
            return fallback(f"no mode meets the {request.deadline_s:.3f} s deadline at "
                            f"{rate / 1e6:.2f} Mbit/s")
        # A mode whose measured interval reaches the best mean is not known to be worse
        # than the best: among those the smallest payload wins, as it is the least exposed
        # to the rate falling during its transfer (profiles without intervals: exact ties).
        top = max(quality[m] for m in feasible)
        tied = [m for m in feasible if self._upper(m) >= top]
        best = min(tied, key=lambda m: (request.payload_bytes.get(m, 0), -quality[m]))
        why = (f"highest expected quality ({quality[best]:.3f})" if len(tied) == 1 else
               f"smallest payload of {len(tied)} within the best's measured quality "
               f"({quality[best]:.3f} vs {top:.3f})")
        return Decision(best, f"{why} of {len(feasible)} feasible at {rate / 1e6:.2f} Mbit/s",
                        latency, quality, feasible, rate)


class QueueAwarePolicy(AdaptivePolicy):
    """The mode that keeps the most requests in time, this one *and* those behind it, and
    among those the one of highest expected quality.

    Each mode that meets this request's deadline (at the margin-discounted rate, as
    ``AdaptivePolicy``) is scored on the requests it affects: this one; the queued requests,
    served after it in order, each with the best mode that fits the time it will have left
    (the myopic rule: a one-step rollout), a hit or a miss; and the next request to arrive
    (Poisson at ``arrival_rate_hz``), which, arriving at ``a`` before the agent is free, has
    its deadline less its wait left and, arriving later, its whole deadline. The deadline
    comes first: the modes keeping the most requests in time (expected hits, within
    ``HIT_TOLERANCE``) compete, and of those the highest expected quality (own, queued, next
    arrival) wins; ties: higher own quality, then the smaller payload.

    Maximizing expected quality alone, misses counting 0, sends a KV transfer that ends
    0.2-0.4 s before the deadline whenever its gain outweighs the chance (about 10% at 0.25
    Hz) that the next request arrives during it and then finds no mode in time. Putting hits
    first, an idle agent sends a mode other than its fastest only if, when it ends, a request
    that arrived during it still has time for the fastest one: ``guards_next_arrival``, which
    the allocator's model of the agent assumes too (``queueing.adaptive_quality``). Without
    arrivals and a queue every feasible mode keeps the same hits and it decides on quality;
    with nothing feasible it falls back to ``local`` as ``AdaptivePolicy``.
    """

    guards_next_arrival = True

    def __init__(self, profile: QualityProfile, safety_margin: float = 0.1,
                 modes: tuple[Mode, ...] = CLOUD_MODES + (Mode.LOCAL,)):
        super().__init__(profile, safety_margin, modes)
        self.name = f"adaptive:queue(margin={safety_margin:g})"

    def decide(self, request: PolicyInput) -> Decision:
        plain = super().decide(request)
        if plain.mode == Mode.LOCAL and not plain.feasible:
            return plain  # link down or nothing in time: the same fallback
        latency, quality = plain.expected_latency_s, plain.expected_quality
        # The myopic rule for the requests after this one: by rising latency, the best
        # quality reachable so far (a step function of the time left).
        steps, best = [], -math.inf
        for m in sorted(self.modes, key=lambda m: (latency.get(m, math.inf),
                                                     request.payload_bytes.get(m, 0))):
            if m in latency and math.isfinite(latency[m]) and quality[m] > best:
                best = quality[m]
                steps.append((latency[m], m))

        def myopic(time_left_s: float) -> Mode | None:
            fits = [m for lat, m in steps if lat <= time_left_s]
            return fits[-1] if fits else None

        fresh_s = (request.deadline_s if request.request_deadline_s is None
                   else request.request_deadline_s)
        rate_hz = max(request.arrival_rate_hz, 0.0)

        def value(mode: Mode) -> tuple[float, tuple[float, float, float]]:
            t, hits, queued = latency[mode], 1.0, 0.0
            for left in request.queue_deadlines_s:
                nxt = myopic(left - t)
                if nxt is not None:
                    hits += 1
                    queued += quality[nxt]
                    t += latency[nxt]
            next_hit, next_quality = self._next_arrival(t, fresh_s, rate_hz, steps, quality)
            return hits + next_hit, (quality[mode], queued, next_quality)

        values = {m: value(m) for m in plain.feasible}
        most = max(hits for hits, _ in values.values())
        keeps = [m for m in plain.feasible if values[m][0] >= most - HIT_TOLERANCE]
        best = max(keeps, key=lambda m: (sum(values[m][1]), quality[m],
                                         -request.payload_bytes.get(m, 0)))
        hits, (own, queued, nxt) = values[best]
        served = 2 + len(request.queue_deadlines_s)
        reason = (f"queue-aware: {best.value} keeps {hits:.3f} of {served} requests in time, "
                  f"worth {own + queued + nxt:.3f} (own {own:.3f}, "
                  f"{len(request.queue_deadlines_s)} queued {queued:.3f}, next arrival "
                  f"{nxt:.3f} at {rate_hz:g} Hz)")
        if best != plain.mode:
            reason += (f"; myopic {plain.mode.value} keeps {values[plain.mode][0]:.3f}, "
                       f"worth {sum(values[plain.mode][1]):.3f}")
        return Decision(best, reason, latency, quality, plain.feasible,
                        plain.planning_rate_bps)

    @staticmethod
    def _next_arrival(busy_s: float, deadline_s: float, rate_hz: float, steps,
                      quality) -> tuple[float, float]:
        """(probability it meets its deadline, expected quality) of the next arrival under
        the myopic rule when the agent is busy for ``busy_s``: arriving at a < busy_s it has
        ``deadline_s - busy_s + a`` left, later its whole deadline."""
        def best_at(time_left_s: float) -> tuple[float, float]:
            fits = [quality[m] for lat, m in steps if lat <= time_left_s]
            return (1.0, fits[-1]) if fits else (0.0, 0.0)

        if rate_hz == 0:
            return best_at(deadline_s)
        start = deadline_s - busy_s  # time left of an arrival at a = 0
        cuts = [start] + [lat for lat, _ in steps if start < lat < deadline_s] + [deadline_s]
        hit = value = 0.0
        for lo, hi in zip(cuts, cuts[1:]):
            odds = math.exp(-rate_hz * (lo - start)) - math.exp(-rate_hz * (hi - start))
            h, q = best_at(lo)
            hit, value = hit + h * odds, value + q * odds
        h, q = best_at(deadline_s)
        after = math.exp(-rate_hz * busy_s)
        return hit + after * h, value + after * q


class StaticPolicy:
    """Always the same mode, whatever the link says: the baseline every run compares to."""

    safety_margin = 0.0  # it plans nothing, so it keeps nothing in reserve
    guards_next_arrival = False

    def __init__(self, mode: Mode, profile: QualityProfile | None = None):
        self.mode = mode
        self.choices = (mode,)
        self.profile = profile
        self.name = f"static({mode.value})"

    def decide(self, request: PolicyInput) -> Decision:
        rate = max(request.bandwidth_bps, 0.0)
        latency = _expected(request, rate, (self.mode,))
        quality = {m: (self.profile.quality(m) if self.profile else None) for m in latency}
        feasible = tuple(m for m in latency if latency[m] <= request.deadline_s)
        return Decision(self.mode, "static baseline", latency, quality, feasible, rate)


ADAPTIVE_POLICIES = ("adaptive", "adaptive:offload", "adaptive:queue")
POLICY_NAMES_HINT = "adaptive, adaptive:offload, adaptive:queue or static:<mode>"


def make_policy(name: str, profile: QualityProfile, safety_margin: float) -> Policy:
    """The policy a spec names. ``adaptive`` lets ``local`` compete on quality;
    ``adaptive:offload`` keeps it as the fallback only (Paper B), for pairs whose edge model
    answers as well as the cloud's; ``adaptive:queue`` also weighs the requests queued and
    arriving behind this one; ``static:<mode>`` always sends that mode."""
    if name == "adaptive":
        return AdaptivePolicy(profile, safety_margin)
    if name == "adaptive:offload":
        return AdaptivePolicy(profile, safety_margin, modes=CLOUD_MODES)
    if name == "adaptive:queue":
        return QueueAwarePolicy(profile, safety_margin)
    if name.startswith("static:"):
        return StaticPolicy(Mode.parse(name.split(":", 1)[1]), profile)
    raise ValueError(f"unknown policy {name!r}; use {POLICY_NAMES_HINT}")
