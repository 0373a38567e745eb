"""Delay, jitter and loss for real IP packets where the kernel has no ``sch_netem``.

``TunImpairment`` steers one direction of traffic through a TUN device inside a router
namespace: a policy rule (by ingress interface, destination prefix, or both) sends every
IPv4 packet it selects to a private routing table whose only route points into the TUN. A pump
thread reads those packets, drops some (Bernoulli or Gilbert-Elliott), stamps the survivors
with a release time ``arrival + delay + jitter`` and writes them back into the TUN on a
timerfd schedule; the kernel then routes them on as if they had just arrived. TCP therefore
sees the delay and has to retransmit what was lost, exactly as it would behind netem.

Semantics, stated once:
- ``delay_s`` is one-way, added to the direction the object is attached to; attach one
  object per direction you want impaired.
- ``jitter_s`` is the standard deviation of the added delay for every distribution (netem's
  default uniform jitter takes a half-width instead). Samples that would make the delay
  negative are clamped to zero delay.
- Packet order is kept by default: a packet never leaves before the one ahead of it, so a
  jittered sample is raised to the previous release time when it would overtake it. netem
  with jitter reorders instead; ask for that with ``reorder=True``. Keeping order shrinks the
  measured jitter when packets are closer together than the jitter.
- Loss is decided on arrival, before the packet is queued, as netem does.
- Parameters changed with ``change`` apply to packets that arrive afterwards.

What it leaves to others: rate (HTB on a real interface does that exactly), building the
namespaces and addresses (the topology code), and IPv6 (only IPv4 is steered).

One pump thread does both reading and releasing: two Python threads would contend for the
GIL and a release could wait a whole switch interval (5 ms) behind the reader. A host
process that runs CPU-bound Python threads of its own can still delay releases the same way;
run the emulator in a process of its own when that matters.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import heapq
import itertools
import math
import os
import random
import select
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Union

from pyroute2.netlink.exceptions import NetlinkError

from ray_scout.net.profiles import GilbertElliott  # noqa: F401 - the loss model lives with the profiles
from ray_scout.net.namespaces import NETNS_DIR, netlink, netns_path, read_sysctl, write_sysctl

MECHANISM = "tun-emulator"
JITTER_DISTRIBUTIONS = ("uniform", "normal", "pareto", "paretonormal")

TUN_DEVICE = "/dev/net/tun"
TUN_PREFIX = "rs-t"  # TUN names rs-t<pid>-<n>; cleanup recognises the guard rules by it
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
RULE_PRIORITY = 1000
# Packets written back into the TUN must never match a steering rule again (a ``to`` rule
# would loop them): a rule just ahead of it sends the TUN's own packets to the main table.
GUARD_PRIORITY = RULE_PRIORITY - 1
TABLE_BASE = 0x72730000  # "rs" in the high half keeps clear of tables people number by hand
TABLE_SPAN = 0x10000  # tables TABLE_BASE .. TABLE_BASE + 0xFFFF are the emulator's (cleanup knows)
READ_BATCH = 64  # packets read per wake before releasing; bounds how late a release can be
MAX_PACKET_BYTES = 65535

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
TFD_TIMER_ABSTIME = 1

_PARETO_SHAPE = 3.0
_PARETO_MEAN = _PARETO_SHAPE / (_PARETO_SHAPE - 1.0)
_PARETO_STD = math.sqrt(_PARETO_SHAPE / ((_PARETO_SHAPE - 1.0) ** 2 * (_PARETO_SHAPE - 2.0)))
_PARETONORMAL_NORM = math.hypot(0.25, 0.75)

_names = itertools.count()


LossModel = Union[float, GilbertElliott]


@dataclass(frozen=True)
class TunImpairmentParams:
    """What one direction gets: delay, jitter, loss, and how packets may be held."""

    delay_s: float
    jitter_s: float = 0.0
    jitter_distribution: str = "normal"
    loss: LossModel = 0.0
    reorder: bool = False
    limit_packets: int = 10_000

    def __post_init__(self) -> None:
        if not 0.0 <= self.delay_s <= 10.0:
            raise ValueError(f"delay_s={self.delay_s} out of range; give seconds in [0, 10]")
        if not 0.0 <= self.jitter_s <= 10.0:
            raise ValueError(f"jitter_s={self.jitter_s} out of range; give seconds in [0, 10]")
        if self.jitter_distribution not in JITTER_DISTRIBUTIONS:
            raise ValueError(
                f"unknown jitter_distribution {self.jitter_distribution!r}; "
                f"known: {', '.join(JITTER_DISTRIBUTIONS)}"
            )
        if not isinstance(self.loss, GilbertElliott) and not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss={self.loss} must be a probability in [0, 1] (0.01 is 1%)")
        if self.limit_packets < 1:
            raise ValueError(f"limit_packets={self.limit_packets} must be at least 1")


@dataclass(frozen=True)
class ImpairmentStats:
    """Counters of one direction since ``start``; ``cpu_s`` is the pump thread's CPU time."""

    packets_in: int
    packets_out: int
    packets_dropped: int
    packets_overflow: int
    packets_not_ipv4: int
    packets_queued: int
    bytes_in: int
    bytes_out: int
    bytes_dropped: int
    cpu_s: float


def unit_jitter_sampler(distribution: str, rng: random.Random) -> Callable[[], float]:
    """A zero-mean, unit-standard-deviation sampler for ``distribution``.

    ``pareto`` is a shape-3 Pareto, standardised (heavy right tail: its sample standard
    deviation converges slowly); ``paretonormal`` mixes 1/4 normal and 3/4 Pareto, the
    proportions of iproute2's table, again standardised.
    """
    if distribution == "normal":
        return lambda: rng.gauss(0.0, 1.0)
    if distribution == "uniform":
        half_width = math.sqrt(3.0)
        return lambda: rng.uniform(-half_width, half_width)
    if distribution == "pareto":
        return lambda: _unit_pareto(rng)
    if distribution == "paretonormal":
        return lambda: (0.25 * rng.gauss(0.0, 1.0) + 0.75 * _unit_pareto(rng)) / _PARETONORMAL_NORM
    raise ValueError(
        f"unknown jitter distribution {distribution!r}; known: {', '.join(JITTER_DISTRIBUTIONS)}"
    )


def _unit_pareto(rng: random.Random) -> float:
    return (rng.paretovariate(_PARETO_SHAPE) - _PARETO_MEAN) / _PARETO_STD


class _LossDecider:
    """Per-packet drop decisions for a loss model; holds the Gilbert-Elliott state."""

    def __init__(self, model: LossModel, rng: random.Random) -> None:
        self.model = model
        self.rng = rng
        self.bad = False

    def drop(self) -> bool:
        model = self.model
        if isinstance(model, GilbertElliott):
            if self.bad:
                self.bad = self.rng.random() >= model.p_bad_to_good
            else:
                self.bad = self.rng.random() < model.p_good_to_bad
            return self.rng.random() < (model.loss_bad if self.bad else model.loss_good)
        return model > 0.0 and self.rng.random() < model


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _TimerFd:
    """A CLOCK_MONOTONIC timerfd armed at absolute ``time.monotonic()`` deadlines.

    Python 3.11 has no ``os.timerfd_create`` (3.13 does), hence ctypes.
    """

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create failed: {os.strerror(err)}")
        self.fd = fd

    def arm_at(self, deadline_s: float | None) -> None:
        """Fire once at monotonic ``deadline_s``; ``None`` disarms."""
        spec = _Itimerspec()
        if deadline_s is not None:
            sec = int(deadline_s)
            spec.it_value.tv_sec = sec
            # A zero it_value would disarm instead of firing at once.
            spec.it_value.tv_nsec = max(int((deadline_s - sec) * 1e9), 0 if sec else 1)
        if self._libc.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime failed: {os.strerror(err)}")

    def drain(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


def _open_tun(name: str) -> int:
    """Create the TUN ``name`` in the calling thread's namespace; the fd keeps that namespace.

    Not persistent: the device vanishes, with its routes, when the fd is closed.
    """
    if not os.path.exists(TUN_DEVICE):
        raise FileNotFoundError(f"{TUN_DEVICE} missing; load the tun module or run with --device")
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
        os.set_blocking(fd, False)
        # Kernel-made IPv6 chatter (router solicitations) would come out of the TUN too.
        write_sysctl(f"net/ipv6/conf/{name}/disable_ipv6", "1")
        # Reverse-path filtering drops what we write back: the source is reached through the
        # ingress interface, not the TUN, and even loose mode rejects packets on an interface
        # without an address. The effective value is max(all, device), so "all" must be 0 too.
        write_sysctl(f"net/ipv4/conf/{name}/rp_filter", "0")
        # In an end host the re-injected packets carry one of its own addresses as source,
        # which the kernel drops as martian unless the TUN accepts local sources.
        write_sysctl(f"net/ipv4/conf/{name}/accept_local", "1")
        forwarding = read_sysctl("net/ipv4/ip_forward")
        rp_filter_all = read_sysctl("net/ipv4/conf/all/rp_filter")
    except BaseException:
        os.close(fd)
        raise
    if forwarding != "1":
        os.close(fd)
        raise RuntimeError(
            "IPv4 forwarding is off in this namespace; the emulator re-injects packets for the "
            "kernel to forward: set net.ipv4.ip_forward=1 in the router namespace first"
        )
    if rp_filter_all != "0":
        os.close(fd)
        raise RuntimeError(
            f"net.ipv4.conf.all.rp_filter={rp_filter_all} in this namespace would drop every packet "
            "the emulator re-injects; set it to 0 in the router namespace (the TUN's own is set)"
        )
    return fd


def _free_table(ipr, first: int) -> int:
    """The first routing table from ``first`` on (within the 0x7273xxxx range) that holds no
    route in this namespace: a router namespace of a large topology carries one emulator per
    link, more than a fixed pid/counter split would number apart."""
    for step in range(TABLE_SPAN):
        table = TABLE_BASE + (first - TABLE_BASE + step) % TABLE_SPAN
        if not ipr.get_routes(table=table):
            return table
    raise RuntimeError(f"all {TABLE_SPAN} emulator routing tables are in use in this namespace; "
                       "stop other emulators or run `scout net cleanup`")


class TunImpairment:
    """Delay, jitter and loss for IPv4 packets in ``netns`` that arrive on ``ingress_iface``
    and/or are headed to ``dst`` (a CIDR prefix; at least one of the two).

    ``ingress_iface`` alone suits a router between the two ends (the direction is the
    interface it arrives on). ``dst`` suits the egress of a port toward a known peer, and
    also works in an end host for its own traffic (the namespace must forward then, since
    re-injected packets are forwarded: set net.ipv4.ip_forward=1 there).

    ``start`` creates the TUN, route, rule and pump thread; ``change`` alters the parameters
    live; ``stop`` removes everything (idempotent). Also a context manager.

    ``realtime_priority`` (1-99) runs the pump thread under SCHED_FIFO so releases stay on
    time when other work loads the host; it blocks between packets, so it cannot starve it.
    """

    mechanism = MECHANISM

    def __init__(
        self,
        netns: str,
        ingress_iface: str | None,
        *,
        dst: str | None = None,
        delay_s: float,
        jitter_s: float = 0.0,
        jitter_distribution: str = "normal",
        loss: LossModel = 0.0,
        reorder: bool = False,
        limit_packets: int = 10_000,
        seed: int | None = None,
        realtime_priority: int | None = None,
    ) -> None:
        self.netns = netns
        if ingress_iface is None and dst is None:
            raise ValueError("give ingress_iface, dst or both: they select the packets to impair")
        self.ingress_iface = ingress_iface
        self.dst = dst
        self._selector: dict = {}
        if ingress_iface is not None:
            self._selector["iifname"] = ingress_iface
        if dst is not None:
            address, _, prefix = dst.partition("/")
            self._selector.update(dst=address, dst_len=int(prefix or 32))
        self._params = TunImpairmentParams(
            delay_s, jitter_s, jitter_distribution, loss, reorder, limit_packets
        )
        if realtime_priority is not None and not 1 <= realtime_priority <= 99:
            raise ValueError(
                f"realtime_priority={realtime_priority} must be a SCHED_FIFO priority in 1..99"
            )
        self.realtime_priority = realtime_priority
        self._rng = random.Random(seed)
        self._unit_jitter = unit_jitter_sampler(jitter_distribution, self._rng)
        self._loss = _LossDecider(loss, self._rng)
        k = next(_names)
        self.tun_name = f"{TUN_PREFIX}{os.getpid():x}-{k:x}"[:15]
        self.table = TABLE_BASE + ((os.getpid() & 0xFF) << 8) + (k & 0xFF)  # first try; see _free_table
        self._tun_fd: int | None = None
        self._rules: list[dict] = []
        self._thread: threading.Thread | None = None
        self._stop_fd: int | None = None
        self._timer: _TimerFd | None = None
        self._error: BaseException | None = None
        self._counts = [0] * 9
        self._cpu_s = 0.0

    @property
    def params(self) -> TunImpairmentParams:
        return self._params

    def __enter__(self) -> "TunImpairment":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "TunImpairment":
        if self._thread is not None:
            raise RuntimeError(f"{self.tun_name} already started; call stop() first")
        if os.geteuid() != 0:
            raise PermissionError(
                "the TUN emulator needs root (CAP_NET_ADMIN) to create devices, routes and rules"
            )
        netns_path(self.netns)
        try:
            with netlink(self.netns) as ipr:
                mtu = 1500
                if self.ingress_iface is not None:
                    ingress = ipr.link_lookup(ifname=self.ingress_iface)
                    if not ingress:
                        raise ValueError(
                            f"interface {self.ingress_iface!r} not found in namespace "
                            f"{self.netns!r}; pass the interface the impaired direction arrives on"
                        )
                    mtu = ipr.get_links(ingress[0])[0].get_attr("IFLA_MTU")
                self._tun_fd = _open_tun(self.tun_name)  # this thread is in the namespace here
                tun_index = ipr.link_lookup(ifname=self.tun_name)[0]
                ipr.link("set", index=tun_index, mtu=mtu, state="up")
                self.table = _free_table(ipr, self.table)
                ipr.route("add", dst="0.0.0.0/0", oif=tun_index, table=self.table)
                for rule in (
                    dict(iifname=self.tun_name, table=254, priority=GUARD_PRIORITY),
                    dict(self._selector, table=self.table, priority=RULE_PRIORITY),
                ):
                    ipr.rule("add", **rule)
                    self._rules.append(rule)
            self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._timer = _TimerFd()
            self._thread = threading.Thread(
                target=self._pump_guarded, name=self.tun_name, daemon=True
            )
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        return self

    def change(
        self,
        *,
        delay_s: float | None = None,
        jitter_s: float | None = None,
        jitter_distribution: str | None = None,
        loss: LossModel | None = None,
        reorder: bool | None = None,
        limit_packets: int | None = None,
    ) -> TunImpairmentParams:
        """Replace the given parameters for packets arriving from now on; returns the new set."""
        updates = {
            key: value
            for key, value in dict(
                delay_s=delay_s,
                jitter_s=jitter_s,
                jitter_distribution=jitter_distribution,
                loss=loss,
                reorder=reorder,
                limit_packets=limit_packets,
            ).items()
            if value is not None
        }
        new = dataclasses.replace(self._params, **updates)
        # The pump reads these attributes without a lock; each assignment is atomic and a
        # packet that sees a mix of old sampler and new delay is one packet of the switch.
        if new.jitter_distribution != self._params.jitter_distribution:
            self._unit_jitter = unit_jitter_sampler(new.jitter_distribution, self._rng)
        if new.loss != self._params.loss:
            self._loss = _LossDecider(new.loss, self._rng)
        self._params = new
        return new

    @property
    def stats(self) -> ImpairmentStats:
        """A snapshot of the counters; raises if the pump has died (its direction is a blackhole
        until ``stop``)."""
        if self._error is not None:
            raise RuntimeError(
                f"emulator {self.tun_name} failed while running: {self._error!r}; call stop()"
            )
        c = self._counts
        return ImpairmentStats(
            packets_in=c[0],
            packets_out=c[1],
            packets_dropped=c[2],
            packets_overflow=c[3],
            packets_not_ipv4=c[4],
            packets_queued=c[5],
            bytes_in=c[6],
            bytes_out=c[7],
            bytes_dropped=c[8],
            cpu_s=self._cpu_s,
        )

    def stop(self) -> None:
        """Stop the pump and remove TUN, route and rule; safe to call twice or after a failure.

        Packets still held are discarded (a link that goes away loses what is in flight).
        Raises if the pump thread had died with an error, after cleaning up.
        """
        if self._thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join()
            self._thread = None
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        if self._stop_fd is not None:
            os.close(self._stop_fd)
            self._stop_fd = None
        if self._rules:
            self._delete_rules()
        if self._tun_fd is not None:
            os.close(self._tun_fd)  # removes the non-persistent TUN and its route
            self._tun_fd = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"emulator {self.tun_name} failed while running: {error!r}") from error

    def _delete_rules(self) -> None:
        if not os.path.exists(os.path.join(NETNS_DIR, self.netns)):
            self._rules.clear()  # the namespace is gone, and its rules with it
            return
        with netlink(self.netns) as ipr:
            while self._rules:
                rule = self._rules.pop()
                try:
                    ipr.rule("del", **rule)
                except NetlinkError as exc:
                    if exc.code != 2:  # ENOENT: someone already removed it
                        raise

    def _pump_guarded(self) -> None:
        try:
            self._pump()
        except BaseException as exc:  # surfaced by stop()
            self._error = exc

    def _pump(self) -> None:
        if self.realtime_priority is not None:
            # Only this thread: pid 0 is the calling thread for sched_setscheduler on Linux.
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.realtime_priority))
        tun_fd, timer, stop_fd, counts = self._tun_fd, self._timer, self._stop_fd, self._counts
        assert tun_fd is not None and timer is not None and stop_fd is not None
        poller = select.epoll()
        poller.register(tun_fd, select.EPOLLIN)
        poller.register(timer.fd, select.EPOLLIN)
        poller.register(stop_fd, select.EPOLLIN)
        heap: list[tuple[float, int, bytes]] = []
        seq = 0
        last_release = 0.0
        armed: float | None = None
        monotonic, heappush, heappop, read, write = (
            time.monotonic, heapq.heappush, heapq.heappop, os.read, os.write
        )
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if stop_fd in ready:
                    return
                if timer.fd in ready:
                    timer.drain()
                if tun_fd in ready:
                    params = self._params
                    for _ in range(READ_BATCH):
                        try:
                            packet = read(tun_fd, MAX_PACKET_BYTES)
                        except BlockingIOError:
                            break
                        now = monotonic()
                        size = len(packet)
                        if not packet or packet[0] >> 4 != 4:
                            counts[4] += 1
                            continue
                        counts[0] += 1
                        counts[6] += size
                        if self._loss.drop():
                            counts[2] += 1
                            counts[8] += size
                            continue
                        if len(heap) >= params.limit_packets:
                            counts[3] += 1
                            counts[8] += size
                            continue
                        hold_s = params.delay_s
                        if params.jitter_s:
                            hold_s = max(0.0, hold_s + params.jitter_s * self._unit_jitter())
                        release = now + hold_s
                        if not params.reorder:
                            release = max(release, last_release)
                            last_release = release
                        heappush(heap, (release, seq, packet))
                        seq += 1
                now = monotonic()
                while heap and heap[0][0] <= now:
                    packet = heappop(heap)[2]
                    write(tun_fd, packet)
                    counts[1] += 1
                    counts[7] += len(packet)
                counts[5] = len(heap)
                head = heap[0][0] if heap else None
                if head != armed:
                    timer.arm_at(head)
                    armed = head
                self._cpu_s = time.thread_time()
        finally:
            self._cpu_s = time.thread_time()
            poller.close()
