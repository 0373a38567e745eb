"""netem over netlink, complete: every option of ``sch_netem`` a profile can ask for.

What lives here: netem's delay distribution tables, computed the way iproute2's table
generators (``netem/normal.c``, ``pareto.c``, ``paretonormal.c``) compute them, so no
``/usr/lib/tc/*.dist`` file is needed; ``NetemParams``, the kernel's netem options in the
project's units; the pyroute2 plugin that encodes them (pyroute2 0.9.7's own netem plugin
has no distribution table, no Gilbert-Elliott loss, no 64-bit delays); and ``read_netem``,
which reads an installed netem back from the kernel.

Kernel layout (``include/uapi/linux/pkt_sched.h``): TCA_OPTIONS holds ``struct
tc_netem_qopt`` (latency and jitter in psched ticks, limit in packets, probabilities as u32
fractions of 2^32-1) followed by attributes: CORR, DELAY_DIST (s16 values, scaled by
NETEM_DIST_SCALE = 8192), REORDER, CORRUPT, LOSS (nested GE model: p, r, h, k1), RATE,
RATE64, LATENCY64/JITTER64 (ns). The kernel draws a delay as ``mu + sigma * t / 8192`` for a
random entry ``t`` of the table, so the table is the inverse CDF of a unit distribution.

What it leaves to others: where netem hangs (``shaping.NetemBackend``), what the profile says
(``profiles``).
"""

from __future__ import annotations

import functools
import math
import struct
import types
from dataclasses import dataclass

from pyroute2.netlink import nla
from pyroute2.netlink.rtnl import TC_H_ROOT
from pyroute2.netlink.rtnl.tcmsg import plugins as tc_plugins

from ray_scout.net.errors import NetError
from ray_scout.net.profiles import FRAME_BYTES, GilbertElliott, Impairment

DIST_SCALE = 8192  # NETEM_DIST_SCALE
DIST_ENTRIES = 4096  # what iproute2's generators print (every 4th of 16384 quantiles)
U32_MAX = 2**32 - 1
NS_PER_TICK = 64  # psched ticks (PSCHED_SHIFT = 6; /proc/net/psched says 1000 ns = 0x40 ticks x 15.625)
_PARETO_SHAPE = 3.0


def _probability_u32(fraction: float) -> int:
    return int(round(fraction * U32_MAX))


def _normal_quantiles() -> list[float]:
    """x such that 16384 * Phi(x) rounds to i, for i = 0..16384 (last x wins, as in normal.c)."""
    table = [0.0] * 16385
    x = -10.0
    # The same walk and the same float accumulation as the C generator, so the same table.
    while x < 10.05:
        table[round(16384 * (0.5 + 0.5 * math.erf(x / math.sqrt(2.0))))] = x
        x += 0.00005
    return table


def _clip_s16(value: int) -> int:
    return max(-32768, min(32767, value))


def _pareto_value(i: int) -> int:
    """Entry for 65536ths ``i`` of netem's Pareto (shape 3, shifted by its mean 1.5, scaled 4/3)."""
    quantile = 1.0 / math.pow(i / 65536, 1.0 / _PARETO_SHAPE)
    return round(min((quantile - 1.5) * (4.0 / 3.0) * DIST_SCALE, 32767))


@functools.cache
def distribution_table(name: str) -> tuple[int, ...]:
    """netem's table for ``normal``, ``pareto``, ``paretonormal`` or ``uniform`` (4096 signed 16-bit entries).

    ``paretonormal`` is 1/4 normal + 3/4 Pareto, combined entry by entry with C's integer
    division (truncation toward zero), as paretonormal.c does.
    """
    if name == "pareto":
        return tuple(_pareto_value(i) for i in range(65536, 0, -16))
    if name == "uniform":
        # Not a file of iproute2's: netem's own uniform draw (mu +- sigma) as a table.
        return tuple(range(-DIST_SCALE, DIST_SCALE, 2 * DIST_SCALE // DIST_ENTRIES))
    if name not in ("normal", "paretonormal"):
        raise NetError(f"netem has no {name!r} distribution table; use normal, pareto or paretonormal "
                       "(or uniform, which needs none)")
    quantiles = _normal_quantiles()
    normal = [round(quantiles[i] * DIST_SCALE) for i in range(0, 16384, 4)]
    if name == "normal":
        return tuple(_clip_s16(value) for value in normal)
    pareto = [_pareto_value(65536 - 4 * i) for i in range(0, 16384, 4)]
    return tuple(_clip_s16(int((n + 3 * p) / 4)) for n, p in zip(normal, pareto))


@dataclass(frozen=True)
class NetemParams:
    """One netem qdisc's options in the project's units (seconds, fractions, bits/s, packets)."""

    limit_packets: int
    delay_s: float = 0.0
    jitter_s: float = 0.0
    distribution: str = "uniform"  # uniform needs no table
    delay_correlation: float = 0.0
    loss: float = 0.0
    gilbert_elliott: GilbertElliott | None = None
    duplicate: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0
    rate_bps: int = 0  # netem's own rate limiter (0: none; under HTB the class sets the rate)

    @classmethod
    def for_impairment(cls, impairment: Impairment, *, queue_bytes: int, rate_bps: float) -> NetemParams:
        """netem for a profile's impairment under a class that may send at ``rate_bps``.

        The limit counts every packet netem holds: those in the delay line (``rate`` x the
        longest delay, about delay + 4 jitter) plus the class's queue. netem's default of 1000
        packets would drop at 1 Gbit/s with 20 ms of delay; a limit sized to the queue alone
        would drop whenever the delay line is fuller than the queue.
        """
        longest_delay_s = impairment.delay_s + 4 * impairment.jitter_s
        in_flight_bytes = rate_bps * longest_delay_s / 8
        limit = max(math.ceil((queue_bytes + in_flight_bytes) / FRAME_BYTES), 10)
        return cls(limit, impairment.delay_s, impairment.jitter_s, impairment.jitter_distribution,
                   impairment.delay_correlation, impairment.loss, impairment.gilbert_elliott,
                   impairment.duplicate, impairment.reorder, impairment.corrupt)

    def __post_init__(self) -> None:
        if self.limit_packets < 1:
            raise NetError(f"netem limit {self.limit_packets} packets: give at least 1")
        if self.jitter_s:
            distribution_table(self.distribution)  # raises for an unknown name
        if self.reorder and not self.delay_s:
            raise NetError("netem reorders by sending some packets without the delay: give a delay with reorder")
        if self.delay_correlation and not self.jitter_s:
            raise NetError("delay correlation correlates the jitter: give a jitter with it")
        if self.loss and self.gilbert_elliott is not None:
            raise NetError("give either a random loss or a Gilbert-Elliott loss model, not both")
        for name in ("delay_correlation", "loss", "duplicate", "reorder", "corrupt"):
            if not 0 <= getattr(self, name) <= 1:
                raise NetError(f"netem {name} {getattr(self, name)} must be a fraction in [0, 1]")

    def options(self) -> dict:
        """The ``options`` pyroute2 encodes with ``NetemOptions`` (struct fields + attributes)."""
        delay_ns, jitter_ns = round(self.delay_s * 1e9), round(self.jitter_s * 1e9)
        # A change keeps whatever attribute it does not carry (correlations, reorder, corrupt,
        # rate, the table): every one is sent, zero where unused, so replace means replace.
        attrs = [["TCA_NETEM_LATENCY64", delay_ns], ["TCA_NETEM_JITTER64", jitter_ns],
                 ["TCA_NETEM_CORR", {"delay_corr": _probability_u32(self.delay_correlation),
                                     "loss_corr": 0, "dup_corr": 0}],
                 ["TCA_NETEM_REORDER", {"prob_reorder": _probability_u32(self.reorder), "corr_reorder": 0}],
                 ["TCA_NETEM_CORRUPT", {"prob_corrupt": _probability_u32(self.corrupt), "corr_corrupt": 0}]]
        if self.jitter_s:
            # Uniform goes as a table too: an earlier table would otherwise stay in force.
            table = distribution_table(self.distribution)
            attrs.append(["TCA_NETEM_DELAY_DIST", struct.pack(f"={len(table)}h", *table)])
        if self.gilbert_elliott is not None:
            ge = self.gilbert_elliott
            # The kernel's bad state loses a packet when a draw exceeds h, so h = 1 - loss_bad;
            # its good state loses one when a draw is below k1 = loss_good.
            attrs.append(["TCA_NETEM_LOSS", {"attrs": [["NETEM_LOSS_GE", {
                "p": _probability_u32(ge.p_good_to_bad), "r": _probability_u32(ge.p_bad_to_good),
                "h": _probability_u32(1 - ge.loss_bad), "k1": _probability_u32(ge.loss_good)}]]}])
        rate_Bps = int(self.rate_bps // 8)
        attrs.append(["TCA_NETEM_RATE", {"rate": min(rate_Bps, U32_MAX), "packet_overhead": 0,
                                         "cell_size": 0, "cell_overhead": 0}])
        if rate_Bps > U32_MAX:
            attrs.append(["TCA_NETEM_RATE64", rate_Bps])
        return {"delay": min(delay_ns // NS_PER_TICK, U32_MAX), "limit": self.limit_packets,
                "loss": _probability_u32(self.loss), "gap": 1 if self.reorder else 0,
                "duplicate": _probability_u32(self.duplicate),
                "jitter": min(jitter_ns // NS_PER_TICK, U32_MAX), "attrs": attrs}


class NetemOptions(nla):
    """TCA_OPTIONS of netem: ``struct tc_netem_qopt`` then netem's attributes (kernel order)."""

    nla_map = (
        ("TCA_NETEM_UNSPEC", "none"),
        ("TCA_NETEM_CORR", "netem_corr"),
        ("TCA_NETEM_DELAY_DIST", "cdata"),
        ("TCA_NETEM_REORDER", "netem_reorder"),
        ("TCA_NETEM_CORRUPT", "netem_corrupt"),
        ("TCA_NETEM_LOSS", "netem_loss"),
        ("TCA_NETEM_RATE", "netem_rate"),
        ("TCA_NETEM_ECN", "uint32"),
        ("TCA_NETEM_RATE64", "uint64"),
        ("TCA_NETEM_PAD", "none"),
        ("TCA_NETEM_LATENCY64", "int64"),
        ("TCA_NETEM_JITTER64", "int64"),
    )
    fields = (("delay", "I"), ("limit", "I"), ("loss", "I"), ("gap", "I"), ("duplicate", "I"), ("jitter", "I"))

    class netem_corr(nla):
        fields = (("delay_corr", "I"), ("loss_corr", "I"), ("dup_corr", "I"))

    class netem_reorder(nla):
        fields = (("prob_reorder", "I"), ("corr_reorder", "I"))

    class netem_corrupt(nla):
        fields = (("prob_corrupt", "I"), ("corr_corrupt", "I"))

    class netem_rate(nla):
        fields = (("rate", "I"), ("packet_overhead", "i"), ("cell_size", "I"), ("cell_overhead", "i"))

    class netem_loss(nla):
        nla_map = (("NETEM_LOSS_UNSPEC", "none"), ("NETEM_LOSS_GI", "netem_gi"), ("NETEM_LOSS_GE", "netem_ge"))

        class netem_gi(nla):
            fields = (("p13", "I"), ("p31", "I"), ("p32", "I"), ("p14", "I"), ("p23", "I"))

        class netem_ge(nla):
            fields = (("p", "I"), ("r", "I"), ("h", "I"), ("k1", "I"))


def _get_parameters(kwarg: dict) -> dict:
    params = kwarg.get("params")
    if not isinstance(params, NetemParams):
        raise NetError("add netem with ipr.tc(..., 'netem', ..., params=NetemParams(...)); this plugin "
                       "takes the whole option set as one value")
    return params.options()


# Replaces pyroute2's netem plugin: the same kind, encoded completely (and decoded on read-back).
PLUGIN = types.SimpleNamespace(parent=TC_H_ROOT, get_parameters=_get_parameters, options=NetemOptions)
tc_plugins["netem"] = PLUGIN


@dataclass(frozen=True)
class InstalledNetem:
    """A netem qdisc as the kernel reports it (read back, not as requested)."""

    handle: int
    parent: int
    limit_packets: int
    delay_s: float
    jitter_s: float
    loss: float
    duplicate: float
    reorder: float
    corrupt: float
    delay_correlation: float
    gilbert_elliott: tuple[float, float, float, float] | None  # p, r, 1 - h (loss bad), k1 (loss good)
    rate_bps: int


def _fraction(value: int) -> float:
    return value / U32_MAX


def read_netem(ipr, ifindex: int) -> list[InstalledNetem]:
    """Every netem qdisc on ``ifindex``, decoded from the kernel's dump.

    The kernel dumps the table-less parts (it does not echo a distribution table back); delay
    and jitter come from the 64-bit attributes where present.
    """
    found = []
    for msg in ipr.get_qdiscs(index=ifindex):
        if msg.get_attr("TCA_KIND") != "netem":
            continue
        options = msg.get_attr("TCA_OPTIONS")
        delay_ns = options.get_attr("TCA_NETEM_LATENCY64")
        jitter_ns = options.get_attr("TCA_NETEM_JITTER64")
        corr = options.get_attr("TCA_NETEM_CORR")
        reorder = options.get_attr("TCA_NETEM_REORDER")
        corrupt = options.get_attr("TCA_NETEM_CORRUPT")
        rate = options.get_attr("TCA_NETEM_RATE")
        rate64 = options.get_attr("TCA_NETEM_RATE64")
        loss = options.get_attr("TCA_NETEM_LOSS")
        ge = loss.get_attr("NETEM_LOSS_GE") if loss is not None else None
        found.append(InstalledNetem(
            msg["handle"], msg["parent"], options["limit"],
            (delay_ns if delay_ns is not None else options["delay"] * NS_PER_TICK) / 1e9,
            (jitter_ns if jitter_ns is not None else options["jitter"] * NS_PER_TICK) / 1e9,
            _fraction(options["loss"]), _fraction(options["duplicate"]),
            _fraction(reorder["prob_reorder"]) if reorder is not None else 0.0,
            _fraction(corrupt["prob_corrupt"]) if corrupt is not None else 0.0,
            _fraction(corr["delay_corr"]) if corr is not None else 0.0,
            None if ge is None else (_fraction(ge["p"]), _fraction(ge["r"]), 1 - _fraction(ge["h"]),
                                     _fraction(ge["k1"])),
            8 * (rate64 if rate64 else rate["rate"] if rate is not None else 0)))
    return found
