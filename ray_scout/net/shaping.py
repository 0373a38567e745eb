"""HTB shaping on one interface: a root class at the link rate, one leaf class per destination
or per agent (u32 filters by IP, and port where needed), live rate changes, and the boundary to
the impairment backend that adds delay, jitter and loss under a leaf.

Layout on an interface (``M`` = 0x7273, "rs", so cleanup can recognise our qdiscs)::

    M:   htb root, default -> M:2
    M:1  parent class, rate = ceil = link rate            (only with per_class=True)
    M:2  default class (ARP and anything unmatched), ceil = link rate
    M:N  one leaf per ``add_class`` (N >= 0x10), guaranteed rate, ceil = link rate
    leaf qdisc under each leaf: bfifo sized in bytes, or the impairment backend's (netem)

A link with one class (an access link) hangs the default class straight off the root, so a
live rate change is one netlink call; classes that share and borrow need the parent.

pyroute2 0.9.7 pitfalls handled here: rates go in as integer bytes/s (no unit strings),
``change-class`` replaces the whole class so every change re-sends rate, ceil, burst, cburst
and quantum, and quantum is passed explicitly (the kernel clamps r2q's guess at high rates).
What this module leaves to others: which rates to set (allocator, trace replay), namespaces
(``topology``), and the impairment itself (a backend object).
"""

from __future__ import annotations

import functools
import ipaddress
import time
from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg import plugins as tc_plugins, sched_pfifo

from ray_scout.net.errors import NETEM_MISSING, CapabilityError, NetError
from ray_scout.net.namespaces import in_netns
from ray_scout.net.netem import NetemParams
from ray_scout.net.profiles import DEFAULT_MTU, FRAME_BYTES, Impairment, check_rate_bps

# pyroute2 0.9.7 has no bfifo plugin and silently sends unknown kinds to the root (replacing
# HTB). bfifo's options are pfifo's struct (tc_fifo_qopt.limit), only counted in bytes.
tc_plugins.setdefault("bfifo", sched_pfifo)

HTB_MAJOR = 0x7273
PARENT_MINOR = 1
DEFAULT_MINOR = 2
FIRST_LEAF_MINOR = 0x10
LEAF_QDISC_MAJOR_BASE = 0x7300  # leaf qdisc of class M:N gets handle (BASE+N):
# netem under class M:N gets (BASE+N+NETEM_MAJOR_OFFSET): a qdisc cannot change kind under
# one handle (EINVAL), so swapping bfifo and netem grafts a new qdisc under another handle.
NETEM_MAJOR_OFFSET = 0x100
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
MIN_QUANTUM_BYTES = FRAME_BYTES
MAX_QUANTUM_BYTES = 200_000
BURST_S = 0.002  # 2 ms of the rate: enough that softirq latency on a busy host does not cost rate


def classid(minor: int) -> int:
    return (HTB_MAJOR << 16) | minor


def htb_class_params(rate_bps: float, ceil_bps: float) -> dict:
    """Everything HTB needs for one class, in pyroute2's units (bytes/s, bytes)."""
    check_rate_bps(rate_bps)
    check_rate_bps(ceil_bps)
    if ceil_bps < rate_bps:
        raise NetError(f"ceil {ceil_bps:.0f} bit/s is below rate {rate_bps:.0f} bit/s; give ceil >= rate")
    rate_Bps, ceil_Bps = int(rate_bps // 8), int(ceil_bps // 8)
    # Quantum = 10 ms of the guaranteed rate: excess bandwidth is lent in proportion to it,
    # so classes borrow in proportion to their guarantees.
    quantum = min(max(rate_Bps // 100, MIN_QUANTUM_BYTES), MAX_QUANTUM_BYTES)
    return {"rate": rate_Bps, "ceil": ceil_Bps, "quantum": quantum,
            "burst": max(int(rate_Bps * BURST_S), 2 * FRAME_BYTES),
            "cburst": max(int(ceil_Bps * BURST_S), 2 * FRAME_BYTES)}


def _in_own_netns(method):
    """Run a netlink method inside the shaper's namespace: pyroute2 opens one socket per
    thread, in that thread's namespace, so a call from another thread (trace replay, the
    allocator) would otherwise reach the host's interfaces."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.netns is None:
            return method(self, *args, **kwargs)
        with in_netns(self.netns):
            return method(self, *args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class Match:
    """Which packets a leaf class takes: source/destination (address or CIDR, IPv4 or IPv6), ports.

    IPv6 matches the fixed header (addresses at +8/+24, ports right after its 40 bytes), as
    tc's ``match ip6`` does: a packet with extension headers before TCP goes to the default class.
    """

    src: str | None = None
    dst: str | None = None
    sport: int | None = None
    dport: int | None = None

    @property
    def version(self) -> int:
        versions = {ipaddress.ip_network(a, strict=False).version for a in (self.src, self.dst) if a is not None}
        if len(versions) > 1:
            raise NetError(f"a Match takes one IP version; got src {self.src} and dst {self.dst}")
        return versions.pop() if versions else 4

    @property
    def protocol(self) -> int:
        """The ethertype the filter is attached for."""
        return ETH_P_IP if self.version == 4 else ETH_P_IPV6

    def u32_keys(self) -> list[str]:
        keys = []
        v6 = self.version == 6
        for address, offset in ((self.src, 8 if v6 else 12), (self.dst, 24 if v6 else 16)):
            if address is None:
                continue
            net = ipaddress.ip_network(address, strict=False)
            words = net.max_prefixlen // 32
            value, mask = int(net.network_address), int(net.netmask)
            for n in range(words):
                shift = 32 * (words - 1 - n)
                word_mask = (mask >> shift) & 0xFFFFFFFF
                if word_mask:
                    keys.append(f"0x{(value >> shift) & 0xFFFFFFFF:08x}/0x{word_mask:08x}+{offset + 4 * n}")
        # Ports follow a 20-byte IPv4 header (no options, as tc's "match ip dport") or IPv6's 40.
        port_offset = 40 if v6 else 20
        if self.sport is not None:
            keys.append(f"0x{self.sport << 16:08x}/0xffff0000+{port_offset}")
        if self.dport is not None:
            keys.append(f"0x{self.dport:08x}/0x0000ffff+{port_offset}")
        if not keys:
            raise NetError("a Match needs at least one of src, dst, sport, dport")
        return keys


@dataclass(frozen=True)
class Port:
    """Where an impairment backend acts: egress of ``ifname`` in ``netns``, under class ``classid``.

    ``local``/``peer`` are the addresses at the two ends of this hop; ``steer_dst`` is the
    destination prefix of everything routing sends out of this port (the whole far side, not
    only the peer). Backends that steer packets by policy routing rather than by qdisc (the TUN
    emulator) select with it. ``peer_netns``/``peer_ifname`` name the far end of the hop: a
    drop on its ingress is loss in the network, while a drop on this end's egress is reported
    to a local sender, whose TCP resends at once instead of seeing a loss.
    """

    netns: str | None
    ifname: str
    ifindex: int
    classid: int
    leaf_handle: int
    queue_bytes: int
    local: str | None = None
    peer: str | None = None
    steer_dst: str | None = None
    peer_netns: str | None = None
    peer_ifname: str | None = None
    rate_bps: float = 0.0  # the most the class may send (its ceil): sizes netem's delay line


class ImpairmentBackend(Protocol):
    """Adds delay/jitter/loss to one direction of a link. Rate is never its job (HTB's)."""

    mechanism: str  # recorded per link: 'netem', 'tun-emulator' or 'bpf'

    def apply(self, ipr: IPRoute, port: Port, impairment: Impairment) -> None: ...

    def change(self, ipr: IPRoute, port: Port, impairment: Impairment) -> None: ...

    def remove(self, ipr: IPRoute, port: Port) -> None: ...


class NetemBackend:
    """netem as the leaf qdisc under the HTB class (kernels with sch_netem), with every option a
    profile carries (``ray_scout.net.netem``: distribution tables, Gilbert-Elliott loss, ...).

    Its limit covers the delay line at the rate the class may reach plus the class's queue
    (``NetemParams.for_impairment``); a class whose ceil later rises above the rate the limit
    was sized for is re-sized by ``HtbShaper.set_class_rate``.
    """

    mechanism = "netem"

    @staticmethod
    def handle(port: Port) -> int:
        """The netem qdisc's handle under the port's class (the bfifo's is ``port.leaf_handle``)."""
        return port.leaf_handle + (NETEM_MAJOR_OFFSET << 16)

    def apply(self, ipr: IPRoute, port: Port, impairment: Impairment) -> None:
        params = NetemParams.for_impairment(impairment, queue_bytes=port.queue_bytes, rate_bps=port.rate_bps)
        ipr.tc("replace", "netem", index=port.ifindex, parent=port.classid, handle=self.handle(port), params=params)

    def change(self, ipr: IPRoute, port: Port, impairment: Impairment) -> None:
        """New options, in place: packets netem holds keep their release times."""
        self.apply(ipr, port, impairment)

    def remove(self, ipr: IPRoute, port: Port) -> None:
        ipr.tc("replace", "bfifo", index=port.ifindex, parent=port.classid, handle=port.leaf_handle,
               limit=port.queue_bytes)


@dataclass(frozen=True)
class LinkShaping:
    """How one direction of one link was shaped; results carry one row of this per link."""

    link: str
    rate_bps: int
    queue_bytes: int
    mechanisms: tuple[str, ...]  # ('htb',) or ('htb', 'netem' | 'tun-emulator' | 'bpf')
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    congestion_control: str = ""
    congestion_control_scope: str = ""  # 'netns' (namespace default) or 'socket' (pinned per socket)
    offloads_off: bool = False
    mtu: int = DEFAULT_MTU  # bytes, of the link's veth (both ends)

    def as_row(self) -> dict:
        return {**self.__dict__, "mechanisms": "+".join(self.mechanisms)}


@dataclass
class LeafClass:
    """A handle on one leaf: ``set_rate`` is what the allocator and trace replay call."""

    shaper: HtbShaper
    name: str
    minor: int
    rate_bps: int
    ceil_bps: int
    queue_bytes: int
    impairment: Impairment = Impairment()
    impaired_by: str | None = None
    impaired_at: Port | None = None  # where the backend acts (its rate_bps: what netem's limit covers)
    backend: ImpairmentBackend | None = None

    @property
    def classid(self) -> int:
        return classid(self.minor)

    def set_rate(self, rate_bps: float, ceil_bps: float | None = None) -> float:
        """Change the guaranteed rate (and ceil; default: the link rate) live; returns call seconds."""
        return self.shaper.set_class_rate(self, rate_bps, ceil_bps)

    def port(self, local: str | None = None, peer: str | None = None, **far: str | None) -> Port:
        """Where a backend acts; ``far``: ``steer_dst``, ``peer_netns``, ``peer_ifname`` (see Port)."""
        return Port(self.shaper.netns, self.shaper.ifname, self.shaper.ifindex, self.classid,
                    (LEAF_QDISC_MAJOR_BASE + self.minor) << 16, self.queue_bytes, local, peer, **far,
                    rate_bps=self.ceil_bps)


@dataclass
class HtbShaper:
    """Root HTB on one interface (a NIC of a lab node, or a veth end inside a namespace)."""

    ipr: IPRoute
    ifname: str
    link_rate_bps: int
    queue_bytes: int
    netns: str | None = None
    per_class: bool = False  # True: a parent class under which add_class leaves share the link
    ifindex: int = 0  # 0: looked up by ifname at install
    classes: dict[str, LeafClass] = field(default_factory=dict)

    @property
    def _leaf_parent(self) -> int:
        return classid(PARENT_MINOR) if self.per_class else classid(0)

    @_in_own_netns
    def install(self) -> LeafClass:
        """Create the root qdisc (and parent class if per_class) and the default class; returns it."""
        check_rate_bps(self.link_rate_bps)
        if not self.ifindex:
            found = self.ipr.link_lookup(ifname=self.ifname)
            if not found:
                raise NetError(f"interface {self.ifname!r} not found{' in ' + self.netns if self.netns else ''}; "
                               "check the name with `ip link`")
            self.ifindex = found[0]
        try:
            self.ipr.tc("add", "htb", index=self.ifindex, handle=classid(0), default=DEFAULT_MINOR)
        except NetlinkError as error:
            raise NetError(f"cannot install HTB on {self.ifname}: {error}; if a root qdisc is already "
                           "there, remove it (`scout net cleanup` removes ours)") from error
        if self.per_class:
            self.ipr.tc("add-class", "htb", index=self.ifindex, handle=classid(PARENT_MINOR), parent=classid(0),
                        **htb_class_params(self.link_rate_bps, self.link_rate_bps))
        default = LeafClass(self, "default", DEFAULT_MINOR, self.link_rate_bps, self.link_rate_bps, self.queue_bytes)
        self._add_leaf(default)
        return default

    def _add_leaf(self, leaf: LeafClass) -> None:
        self.ipr.tc("add-class", "htb", index=self.ifindex, handle=leaf.classid, parent=self._leaf_parent,
                    **htb_class_params(leaf.rate_bps, leaf.ceil_bps))
        port = leaf.port()
        # "replace": HTB already hung a default pfifo under the new class.
        self.ipr.tc("replace", "bfifo", index=self.ifindex, parent=leaf.classid, handle=port.leaf_handle,
                    limit=leaf.queue_bytes)
        self.classes[leaf.name] = leaf

    @_in_own_netns
    def add_class(self, name: str, rate_bps: int, match: Match, ceil_bps: int | None = None,
                  queue_bytes: int | None = None) -> LeafClass:
        """A leaf with a guaranteed ``rate_bps`` that may borrow up to ``ceil_bps`` (the link rate)."""
        if not self.per_class:
            raise NetError(f"{self.ifname} was shaped as one class; build HtbShaper(..., per_class=True) "
                           "to give destinations or agents their own classes")
        if name in self.classes:
            raise NetError(f"class {name!r} already exists on {self.ifname}; pick another name")
        minor = FIRST_LEAF_MINOR + len(self.classes) - 1
        leaf = LeafClass(self, name, minor, int(rate_bps), int(ceil_bps or self.link_rate_bps),
                         queue_bytes or self.queue_bytes)
        self._add_leaf(leaf)
        self.ipr.tc("add-filter", "u32", index=self.ifindex, parent=classid(0), prio=10 + minor,
                    protocol=match.protocol, target=leaf.classid, keys=match.u32_keys())
        return leaf

    @_in_own_netns
    def set_class_rate(self, leaf: LeafClass, rate_bps: float, ceil_bps: float | None = None) -> float:
        ceil_bps = self.link_rate_bps if ceil_bps is None else ceil_bps
        params = htb_class_params(rate_bps, max(ceil_bps, rate_bps))
        start = time.perf_counter()
        self.ipr.tc("change-class", "htb", index=self.ifindex, handle=leaf.classid,
                    parent=self._leaf_parent, **params)
        elapsed = time.perf_counter() - start
        leaf.rate_bps, leaf.ceil_bps = int(rate_bps), int(max(ceil_bps, rate_bps))
        self._follow_netem(leaf)
        return elapsed

    def _follow_netem(self, leaf: LeafClass) -> None:
        port = leaf.impaired_at
        if isinstance(leaf.backend, NetemBackend) and port is not None and leaf.ceil_bps > port.rate_bps:
            # netem's limit was sized for a slower class: grow it, or the delay line drops.
            leaf.impaired_at = replace(port, rate_bps=leaf.ceil_bps)
            leaf.backend.change(self.ipr, leaf.impaired_at, leaf.impairment)

    def set_class_rates(self, rates_bps: Sequence[tuple[LeafClass, float, float]]) -> float:
        """Many (leaf, rate, ceil) in one netlink batch (``htb_batch``); returns seconds."""
        from ray_scout.net import htb_batch

        changes = []
        for leaf, rate_bps, ceil_bps in rates_bps:
            params = htb_class_params(rate_bps, max(ceil_bps, rate_bps))
            changes.append(htb_batch.ClassChange(
                self.ifindex, leaf.classid, self._leaf_parent, params["rate"], params["ceil"],
                params["quantum"], params["burst"], params["cburst"]))
        start = time.perf_counter()
        htb_batch.apply(self.netns, changes)
        elapsed = time.perf_counter() - start
        for leaf, rate_bps, ceil_bps in rates_bps:
            leaf.rate_bps, leaf.ceil_bps = int(rate_bps), int(max(ceil_bps, rate_bps))
        with in_netns(self.netns):
            for leaf, _, _ in rates_bps:
                self._follow_netem(leaf)
        return elapsed

    @_in_own_netns
    def set_rate(self, rate_bps: float) -> float:
        """Change the whole link's rate live; returns call seconds.

        The parent class (if any) and every ceil follow; the default class's guarantee is the link rate,
        the other leaves keep theirs (capped at the new rate). Trace replay drives this.
        """
        check_rate_bps(rate_bps)
        start = time.perf_counter()
        if self.per_class:
            self.ipr.tc("change-class", "htb", index=self.ifindex, handle=classid(PARENT_MINOR),
                        parent=classid(0), **htb_class_params(rate_bps, rate_bps))
        self.link_rate_bps = int(rate_bps)
        for leaf in self.classes.values():
            guarantee = rate_bps if leaf.minor == DEFAULT_MINOR else min(leaf.rate_bps, rate_bps)
            self.set_class_rate(leaf, guarantee, rate_bps)
        return time.perf_counter() - start

    @_in_own_netns
    def impair(self, leaf: LeafClass, impairment: Impairment, backend: ImpairmentBackend | None,
               local: str | None = None, peer: str | None = None, **far: str | None) -> Port | None:
        """Hand delay/jitter/loss of this leaf to ``backend``; none needed when the impairment is none.

        Returns the port the backend acts on (``unimpair`` takes it back), or None.
        """
        if impairment.is_none:
            return None
        if backend is None:
            raise CapabilityError(
                f"link {self.ifname}/{leaf.name} asks for delay/jitter/loss but no impairment backend "
                f"was given. {NETEM_MISSING}. Pass impairment=NetemBackend() where netem exists, or "
                "the emulator's backend, or use a rate-only profile (netem/lab.yaml)")
        port = leaf.port(local, peer, **far)
        backend.apply(self.ipr, port, impairment)
        leaf.impairment, leaf.impaired_by, leaf.impaired_at, leaf.backend = (impairment, backend.mechanism,
                                                                              port, backend)
        return port

    @_in_own_netns
    def unimpair(self, leaf: LeafClass, port: Port, backend: ImpairmentBackend) -> None:
        """Take the impairment of ``leaf`` away again (``backend.remove``)."""
        backend.remove(self.ipr, port)
        leaf.impairment, leaf.impaired_by, leaf.impaired_at, leaf.backend = Impairment(), None, None, None

    def record(self, leaf: LeafClass, link: str, congestion_control: str = "", cc_scope: str = "",
               offloads_off: bool = False, mtu: int = DEFAULT_MTU) -> LinkShaping:
        mechanisms = ("htb",) + ((leaf.impaired_by,) if leaf.impaired_by else ())
        return LinkShaping(link, leaf.rate_bps, leaf.queue_bytes, mechanisms, leaf.impairment.delay_s,
                           leaf.impairment.jitter_s, leaf.impairment.mean_loss, congestion_control, cc_scope,
                           offloads_off, mtu)

    @_in_own_netns
    def read_rates_bps(self) -> dict[int, int]:
        """Rates the kernel actually holds, by classid (read back with ``get_classes``)."""
        rates = {}
        for msg in self.ipr.get_classes(index=self.ifindex):
            params = msg.get_nested("TCA_OPTIONS", "TCA_HTB_PARMS")
            if params is not None:
                rates[msg["handle"]] = params["rate"] * 8
        return rates

    @_in_own_netns
    def remove(self) -> None:
        """Delete the root qdisc (and with it every class, filter and leaf qdisc)."""
        self.ipr.tc("del", index=self.ifindex, handle=classid(0), kind="htb")
        self.classes.clear()
