"""Link profiles: what a link is (rate, delay, jitter, loss, queue), read from ``netem/*.yaml``.

A profile is data: frozen dataclasses in the internal units (bits per second, seconds,
bytes, loss as a fraction). Text units are parsed here and nowhere else, case-insensitively,
so ``10Mbit``, ``10mbit`` and ``10 Mbit/s`` mean the same; the kernel-facing code never sees a
unit string (pyroute2's own suffixes are case-sensitive and a bare int there is bytes/s).
Rates are written in ``bit``: ``mbps`` is refused, since tc reads it as megabytes per second
and most people as megabits, and case cannot tell ``Mbps`` from ``MBps`` here.

The queue is sized from the bandwidth-delay product, not netem's 1000 packets: ``queue`` may
be bytes (``256kB``) or milliseconds of buffering at the link rate (``50ms``); when absent it is
one BDP at RTT = 2 x (delay + jitter), never less than 20 ms of the rate or 10 full frames.

YAML shape (every key optional except ``rate``; ``up``/``down`` override per direction)::

    name: lte
    rate: 20mbit
    delay: 30ms
    jitter: 5ms
    jitter_distribution: normal
    loss: 0.1%
    queue: 60ms
    congestion_control: cubic
    mtu: 1500                     # bytes; smaller frames carry less payload per shaped bit
    # netem only (the emulator backends refuse them):
    delay_correlation: 25%
    loss_model: {p_good_to_bad: 1%, p_bad_to_good: 30%, loss_bad: 100%}  # instead of loss
    duplicate: 0.1%
    reorder: 1%
    corrupt: 0.1%
    up: {rate: 10mbit}
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from ray_scout.net.errors import NetError

MIN_RATE_BPS = 8_000
MAX_RATE_BPS = 10_000_000_000
DEFAULT_MTU = 1500
ETHERNET_HEADER_BYTES = 14
TCP_IP_HEADER_BYTES = 52  # IP 20, TCP 20, timestamp option 12
# A full packet's Ethernet frame (1514 B), as HTB counts it on a veth.
FRAME_BYTES = DEFAULT_MTU + ETHERNET_HEADER_BYTES
# TCP payload of such a frame (20 B IP, 20 B TCP, 12 B timestamp option): what an application
# gets of a shaped rate, 1448/1514 = 0.956 (the lab measures 0.953-0.959, docs/TESTBED.md).
TCP_PAYLOAD_PER_FRAME = (DEFAULT_MTU - TCP_IP_HEADER_BYTES) / FRAME_BYTES
# Below this a TCP segment would carry less payload than its headers (and Linux's
# tcp_min_snd_mss of 48 is near); above it, not Ethernet.
MIN_MTU = 128
MIN_QUEUE_BYTES = 10 * FRAME_BYTES
MIN_QUEUE_S = 0.020
JITTER_DISTRIBUTIONS = ("uniform", "normal", "pareto", "paretonormal")
PROFILE_DIR = Path(__file__).resolve().parents[2] / "netem"

_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
# Units whose meaning depends on who reads them (tc: bytes per second; a data sheet: bits).
_AMBIGUOUS_RATE_UNITS = {"bps": "bit", "kbps": "kbit", "mbps": "mbit", "gbps": "gbit"}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "kib": 1024, "mib": 1024**2}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z%/]*)\s*$", re.I)


def _split(text: object, what: str) -> tuple[float, str]:
    match = _NUMBER_UNIT.match(str(text))
    if not match:
        raise NetError(f"cannot read {what} {text!r}: write a number and a unit, e.g. '10mbit', '20ms'")
    return float(match.group(1)), match.group(2).lower().removesuffix("/s")


def parse_rate_bps(text: object) -> int:
    """``'10mbit'``/``'10 Mbit/s'`` -> 10_000_000; a unit is required, bits per second inside."""
    value, unit = _split(text, "rate")
    if unit in _AMBIGUOUS_RATE_UNITS:
        number = f"{value:g}"
        raise NetError(f"rate {text!r} is ambiguous (tc reads {unit!r} as bytes per second, "
                       f"most people as bits): write {number}{_AMBIGUOUS_RATE_UNITS[unit]} "
                       f"for bits per second")
    if unit not in _RATE_UNITS:
        raise NetError(f"rate {text!r} needs a unit among {sorted(_RATE_UNITS)}, e.g. '25mbit'")
    rate_bps = int(round(value * _RATE_UNITS[unit]))
    check_rate_bps(rate_bps)
    return rate_bps


def check_rate_bps(rate_bps: float) -> None:
    """Raise unless HTB can be given this rate (8 kbit/s .. 10 Gbit/s)."""
    if not MIN_RATE_BPS <= rate_bps <= MAX_RATE_BPS:
        raise NetError(
            f"rate {rate_bps:.0f} bit/s is out of range: give {MIN_RATE_BPS} bit/s to "
            f"{MAX_RATE_BPS / 1e9:.0f} Gbit/s (HTB cannot shape below or above)"
        )


def parse_time_s(text: object) -> float:
    """``'20ms'`` -> 0.02; a unit is required."""
    value, unit = _split(text, "time")
    if unit not in _TIME_UNITS:
        raise NetError(f"time {text!r} needs a unit among {sorted(_TIME_UNITS)}, e.g. '20ms'")
    return value * _TIME_UNITS[unit]


def parse_probability(text: object, what: str = "probability") -> float:
    """``'1%'`` -> 0.01; a bare number is a fraction (``0.01``). Must lie in [0, 1]."""
    value, unit = _split(text, what)
    if unit not in ("", "%"):
        raise NetError(f"{what} {text!r}: write a percentage ('1%') or a fraction (0.01)")
    probability = value / 100 if unit == "%" else value
    if not 0 <= probability <= 1:
        raise NetError(f"{what} {text!r} must lie between 0% and 100%")
    return probability


def parse_loss(text: object) -> float:
    """A link's random loss, as ``parse_probability``, below 100% (a link must carry something)."""
    loss = parse_probability(text, "loss")
    if loss == 1:
        raise NetError(f"loss {text!r} must be at least 0% and below 100%")
    return loss


def parse_queue_bytes(text: object, rate_bps: int) -> int:
    """``'256kB'`` -> bytes; ``'50ms'`` -> 50 ms of buffering at ``rate_bps``."""
    value, unit = _split(text, "queue")
    if unit in _TIME_UNITS:
        size_bytes = value * _TIME_UNITS[unit] * rate_bps / 8
    elif unit in _SIZE_UNITS:
        size_bytes = value * _SIZE_UNITS[unit]
    else:
        raise NetError(f"queue {text!r}: give bytes ('256kB') or buffering time ('50ms')")
    if size_bytes < FRAME_BYTES:
        raise NetError(f"queue {text!r} holds less than one {FRAME_BYTES}-byte frame; make it larger")
    return int(math.ceil(size_bytes))


def default_queue_bytes(rate_bps: int, delay_s: float, jitter_s: float) -> int:
    """One BDP at RTT = 2 x (delay + jitter), floored at 20 ms of the rate and 10 frames."""
    buffer_s = max(2 * (delay_s + jitter_s), MIN_QUEUE_S)
    return max(int(math.ceil(rate_bps * buffer_s / 8)), MIN_QUEUE_BYTES)


@dataclass(frozen=True)
class GilbertElliott:
    """Two-state burst loss: a good and a bad state with their own loss probabilities.

    Per packet, the state moves good→bad with ``p_good_to_bad`` and bad→good with
    ``p_bad_to_good``; the packet is then lost with the current state's probability.
    """

    p_good_to_bad: float
    p_bad_to_good: float
    loss_good: float = 0.0
    loss_bad: float = 1.0

    def __post_init__(self) -> None:
        for name in ("p_good_to_bad", "p_bad_to_good", "loss_good", "loss_bad"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"GilbertElliott.{name}={value} must be a probability in [0, 1]")
        if self.p_good_to_bad + self.p_bad_to_good == 0.0:
            raise ValueError("GilbertElliott needs p_good_to_bad + p_bad_to_good > 0")

    @property
    def mean_loss(self) -> float:
        """Long-run fraction of packets lost (the chain's stationary loss)."""
        p, r = self.p_good_to_bad, self.p_bad_to_good
        return (r * self.loss_good + p * self.loss_bad) / (p + r)

    @property
    def mean_burst_packets(self) -> float:
        """Mean number of consecutive packets spent in the bad state."""
        return math.inf if self.p_bad_to_good == 0.0 else 1.0 / self.p_bad_to_good



@dataclass(frozen=True)
class Impairment:
    """What an impairment backend adds on one direction.

    ``loss`` is random (Bernoulli) loss; ``gilbert_elliott`` a burst-loss model instead of it.
    ``delay_correlation`` ties each jitter draw to the previous one (netem's delay correlation);
    ``duplicate``, ``reorder`` (sent without the delay) and ``corrupt`` (one bit flipped) are
    per-packet probabilities. All fractions in [0, 1].
    """

    delay_s: float = 0.0
    jitter_s: float = 0.0
    jitter_distribution: str = "normal"
    loss: float = 0.0
    delay_correlation: float = 0.0
    gilbert_elliott: GilbertElliott | None = None
    duplicate: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0

    def __post_init__(self) -> None:
        if self.loss and self.gilbert_elliott is not None:
            raise NetError("a link has either a random loss or a Gilbert-Elliott loss model; drop one")
        for name in ("loss", "delay_correlation", "duplicate", "reorder", "corrupt"):
            if not 0 <= getattr(self, name) <= 1:
                raise NetError(f"{name} {getattr(self, name)} must be a fraction in [0, 1]")

    @property
    def is_none(self) -> bool:
        return self == Impairment(jitter_distribution=self.jitter_distribution)

    @property
    def mean_loss(self) -> float:
        """The long-run fraction lost (random loss, or the burst model's stationary loss)."""
        return self.gilbert_elliott.mean_loss if self.gilbert_elliott is not None else self.loss

    @property
    def beyond_delay_and_loss(self) -> tuple[str, ...]:
        """Names of the parameters set here that only netem gives (the emulators refuse them)."""
        return tuple(name for name in ("delay_correlation", "duplicate", "reorder", "corrupt") if getattr(self, name))


@dataclass(frozen=True)
class Direction:
    """One direction of a link: HTB rate, its queue, and the impairment on top."""

    rate_bps: int
    queue_bytes: int
    impairment: Impairment = Impairment()


@dataclass(frozen=True)
class LinkProfile:
    """A named link: uplink (edge -> cloud) and downlink, plus the TCP congestion control."""

    name: str
    up: Direction
    down: Direction
    congestion_control: str = "cubic"
    mtu: int = DEFAULT_MTU  # bytes of IP packet; set on both ends of the link's veth

    def __post_init__(self) -> None:
        if not MIN_MTU <= self.mtu <= DEFAULT_MTU:
            raise NetError(f"profile {self.name}: mtu {self.mtu} must lie in "
                           f"{MIN_MTU}..{DEFAULT_MTU} bytes")

    @property
    def payload_share(self) -> float:
        """TCP payload this link's frames carry per shaped bit, relative to a 1500-byte MTU
        link's (1): every shaper on the path counts the smaller frames' headers too, so a link
        of MTU 200 delivers (148/214)/(1448/1514) = 0.72 of what its grant delivers on
        another link (the simulator's ``AgentSpec.link_share``)."""
        payload = (self.mtu - TCP_IP_HEADER_BYTES) / (self.mtu + ETHERNET_HEADER_BYTES)
        return payload / TCP_PAYLOAD_PER_FRAME

    def with_rate(self, rate_bps: int) -> LinkProfile:
        """The same link at another rate in both directions (queues keep their byte size)."""
        check_rate_bps(rate_bps)
        return replace(self, up=replace(self.up, rate_bps=rate_bps),
                       down=replace(self.down, rate_bps=rate_bps))


_KEYS = {"rate", "delay", "jitter", "jitter_distribution", "loss", "queue", "delay_correlation",
         "loss_model", "duplicate", "reorder", "corrupt"}
_GE_KEYS = {"p_good_to_bad", "p_bad_to_good", "loss_good", "loss_bad"}


def _loss_model(spec: object, where: str) -> GilbertElliott:
    if not isinstance(spec, dict) or not {"p_good_to_bad", "p_bad_to_good"} <= set(spec) <= _GE_KEYS:
        raise NetError(f"{where}: loss_model is a Gilbert-Elliott mapping with p_good_to_bad and "
                       f"p_bad_to_good (and optionally loss_good, loss_bad), e.g. "
                       "{p_good_to_bad: 1%, p_bad_to_good: 30%}")
    try:
        return GilbertElliott(**{key: parse_probability(value, key) for key, value in spec.items()})
    except ValueError as error:
        raise NetError(f"{where}: {error}") from None


def _direction(spec: dict, where: str) -> Direction:
    unknown = set(spec) - _KEYS
    if unknown:
        raise NetError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    if "rate" not in spec:
        raise NetError(f"{where}: 'rate' is required, e.g. rate: 20mbit")
    rate_bps = parse_rate_bps(spec["rate"])
    delay_s = parse_time_s(spec.get("delay", "0ms"))
    jitter_s = parse_time_s(spec.get("jitter", "0ms"))
    distribution = str(spec.get("jitter_distribution", "normal")).lower()
    if distribution not in JITTER_DISTRIBUTIONS:
        raise NetError(f"{where}: jitter_distribution {distribution!r}; use one of {JITTER_DISTRIBUTIONS}")
    model = spec.get("loss_model")
    impairment = Impairment(delay_s, jitter_s, distribution, parse_loss(spec.get("loss", 0)),
                            delay_correlation=parse_probability(spec.get("delay_correlation", 0),
                                                               "delay_correlation"),
                            gilbert_elliott=None if model is None else _loss_model(model, where),
                            duplicate=parse_probability(spec.get("duplicate", 0), "duplicate"),
                            reorder=parse_probability(spec.get("reorder", 0), "reorder"),
                            corrupt=parse_probability(spec.get("corrupt", 0), "corrupt"))
    queue = spec.get("queue")
    queue_bytes = (default_queue_bytes(rate_bps, delay_s, jitter_s) if queue is None
                   else parse_queue_bytes(queue, rate_bps))
    return Direction(rate_bps, queue_bytes, impairment)


def profile_from_dict(spec: dict, name: str | None = None) -> LinkProfile:
    """Build a profile from the YAML mapping described in the module docstring."""
    if not isinstance(spec, dict):
        raise NetError(f"a link profile is a mapping with at least 'rate'; got {type(spec).__name__}")
    name = str(spec.get("name", name or "unnamed"))
    shared = {k: v for k, v in spec.items() if k in _KEYS}
    extra = set(spec) - _KEYS - {"name", "description", "up", "down", "congestion_control", "mtu"}
    if extra:
        raise NetError(f"profile {name}: unknown keys {sorted(extra)}")
    up = _direction({**shared, **(spec.get("up") or {})}, f"profile {name} (up)")
    down = _direction({**shared, **(spec.get("down") or {})}, f"profile {name} (down)")
    mtu = spec.get("mtu", DEFAULT_MTU)
    if isinstance(mtu, bool) or not isinstance(mtu, int):
        raise NetError(f"profile {name}: mtu is a whole number of bytes, e.g. mtu: 1500, "
                       f"not {mtu!r}")
    return LinkProfile(name, up, down, str(spec.get("congestion_control", "cubic")), mtu)


def load_profile(name_or_path: str | Path) -> LinkProfile:
    """A profile by name (``netem/<name>.yaml``) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = ", ".join(list_profiles()) or "none"
        raise NetError(f"no link profile {str(name_or_path)!r}: pass a YAML path or one of: {names}")
    return profile_from_dict(yaml.safe_load(path.read_text()), name=path.stem)


def list_profiles() -> list[str]:
    """Names of the profiles shipped in ``netem/``."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
