"""Impairment backends for kernels without netem, and the choice of backend from the probe.

``NetemBackend`` (in ``shaping``) hangs netem under an HTB class. Where the kernel has no
``sch_netem`` this module supplies the same ``ImpairmentBackend`` protocol from the
emulators: ``TunEmulatorBackend`` (delay, jitter and loss through a TUN device, mechanism
``tun-emulator``) and ``BpfLossBackend`` (loss alone, an eBPF program on the interface's
``clsact`` egress hook, mechanism ``bpf``). ``default_impairment_backend`` picks netem where
the probe finds it, the TUN emulator otherwise. The emulators give delay, jitter and loss
(random or Gilbert-Elliott); what only netem gives (delay correlation, duplication,
reordering, corruption) they refuse with a message rather than leave out.

What they act on: the egress of a ``Port`` (an interface in a named namespace). The TUN
emulator steers by policy routing in the port's namespace: packets headed to
``port.steer_dst`` (everything routing sends out of the port) go through the TUN and are
forwarded on to the interface, where HTB shapes them. That namespace therefore routes: the
backend turns IPv4 forwarding on and reverse-path filtering off there (a LabTopology's
namespaces are the project's own). One emulator serves one (namespace, interface): the
classes of one interface (the bottleneck's per-agent classes) share it, as they share one
impairment in a profile. What they leave to others: rates (HTB), namespaces (topology).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyroute2 import IPRoute

from ray_scout.net.emulator import TunImpairment
from ray_scout.net.emulator_bpf import BpfLoss
from ray_scout.net.errors import CapabilityError
from ray_scout.net.namespaces import in_netns, read_sysctl, write_sysctl
from ray_scout.net.probe import Capabilities
from ray_scout.net.profiles import GilbertElliott, Impairment
from ray_scout.net.shaping import ImpairmentBackend, NetemBackend, Port

# The forwarding the TUN emulator needs in the namespace it steers in (see emulator._open_tun).
ROUTED_SYSCTLS = (("net/ipv4/ip_forward", "1"), ("net/ipv4/conf/all/rp_filter", "0"))


def tun_jitter_std_s(impairment: Impairment) -> float:
    """The emulator's jitter (a standard deviation) for a profile's jitter (netem's parameter).

    netem's uniform jitter is the half-width of the interval, std = half-width / sqrt(3); its
    table distributions (normal, pareto, paretonormal) scale by the jitter as sigma. The
    emulator takes the std for every distribution, so only uniform is converted.
    """
    if impairment.jitter_distribution == "uniform":
        return impairment.jitter_s / math.sqrt(3)
    return impairment.jitter_s


def _far_end_first(port: Port) -> tuple[str, str]:
    if port.peer_netns is not None and port.peer_ifname is not None:
        return port.peer_netns, port.peer_ifname
    return _own_end(port)


def _own_end(port: Port) -> tuple[str, str]:
    if port.netns is None:
        raise CapabilityError(
            f"the emulator backends act in a named namespace, and {port.ifname} is in this host's: "
            "steering the host's own traffic would turn host forwarding on. Shape a lab node's NIC "
            "with netem (NetemBackend) where the kernel has it, or route its traffic through a "
            "namespace (LabTopology)")
    return port.netns, port.ifname


@dataclass
class _Shared:
    """One emulator on one interface and the ports (HTB classes) it serves."""

    emulator: TunImpairment | BpfLoss
    impairment: Impairment
    ports: set[int] = field(default_factory=set)  # classids


class _PerInterface(ABC):
    """Bookkeeping common to both emulator backends: one emulator per (namespace, interface)."""

    mechanism: str

    @staticmethod
    def _place(port: Port) -> tuple[str, str]:
        """(namespace, interface) the emulator for this port acts on; the port's own end."""
        return _own_end(port)

    def __init__(self) -> None:
        self._shared: dict[tuple[str, str], _Shared] = {}

    @staticmethod
    def _check(mechanism: str, impairment: Impairment) -> None:
        beyond = impairment.beyond_delay_and_loss
        if beyond:
            raise CapabilityError(f"the {mechanism} backend gives delay, jitter and loss only, and this link "
                                  f"also asks for {', '.join(beyond)}: use netem (NetemBackend; "
                                  "`scout net lab-kernel` runs a kernel that has it) or drop them")

    @abstractmethod
    def _start(self, port: Port, impairment: Impairment) -> TunImpairment | BpfLoss:
        """Start an emulator for the port's interface."""

    @abstractmethod
    def _change(self, emulator, impairment: Impairment) -> None:
        """Give a running emulator new parameters."""

    def apply(self, ipr: IPRoute, port: Port, impairment: Impairment) -> None:
        self._check(self.mechanism, impairment)
        key = self._place(port)
        shared = self._shared.get(key)
        if shared is None:
            shared = self._shared[key] = _Shared(self._start(port, impairment), impairment)
        elif shared.impairment != impairment:
            raise CapabilityError(
                f"{self.mechanism} impairs a whole interface, and {port.ifname} in {port.netns} already "
                f"carries {shared.impairment}; classes of one interface must share one impairment "
                "(or use netem, which sits under each class)")
        shared.ports.add(port.classid)

    def change(self, ipr: IPRoute, port: Port, impairment: Impairment) -> None:
        """New parameters for every class of the port's interface (they share the emulator)."""
        shared = self._shared.get(self._place(port))
        if shared is None:
            raise CapabilityError(f"{port.ifname} in {port.netns} has no {self.mechanism} impairment; apply first")
        self._check(self.mechanism, impairment)
        self._change(shared.emulator, impairment)
        shared.impairment = impairment

    def remove(self, ipr: IPRoute, port: Port) -> None:
        key = self._place(port)
        shared = self._shared.get(key)
        if shared is None:
            return
        shared.ports.discard(port.classid)
        if not shared.ports:
            del self._shared[key]
            shared.emulator.stop()

    def emulators(self) -> dict[tuple[str, str], TunImpairment | BpfLoss]:
        """Running emulators by (namespace, interface): their ``stats`` say what they did."""
        return {key: shared.emulator for key, shared in self._shared.items()}


class TunEmulatorBackend(_PerInterface):
    """Delay, jitter and loss from the userspace TUN emulator (``ray_scout.net.emulator``).

    Attaches in the port's own namespace, selecting the packets routed toward
    ``port.steer_dst`` (the port's peer alone when the topology gave no prefix), so they are
    delayed before the interface's HTB queue, as netem's packets are before HTB dequeues them.
    ``realtime_priority`` (1-99) runs each pump thread SCHED_FIFO (keeps releases on time on a
    loaded host); ``reorder`` lets jitter reorder packets as netem does; ``seed`` makes loss and
    jitter repeatable (each emulator gets ``seed + n``).
    """

    mechanism = "tun-emulator"

    def __init__(self, *, realtime_priority: int | None = None, reorder: bool = False,
                 seed: int | None = None) -> None:
        super().__init__()
        self.realtime_priority = realtime_priority
        self.reorder = reorder
        self.seed = seed
        self._started = 0

    def _start(self, port: Port, impairment: Impairment) -> TunImpairment:
        dst = port.steer_dst or (f"{port.peer}/32" if port.peer else None)
        if dst is None:
            raise CapabilityError(f"port {port.ifname} in {port.netns} names no steer_dst or peer; the TUN "
                                  "emulator selects packets by destination and needs one")
        with in_netns(port.netns):
            for key, value in ROUTED_SYSCTLS:
                if read_sysctl(key) != value:
                    write_sysctl(key, value)
        seed = None if self.seed is None else self.seed + self._started
        self._started += 1
        return TunImpairment(
            port.netns, None, dst=dst, delay_s=impairment.delay_s, jitter_s=tun_jitter_std_s(impairment),
            jitter_distribution=impairment.jitter_distribution, loss=_loss_model(impairment), reorder=self.reorder,
            seed=seed, realtime_priority=self.realtime_priority).start()

    def _change(self, emulator: TunImpairment, impairment: Impairment) -> None:
        emulator.change(delay_s=impairment.delay_s, jitter_s=tun_jitter_std_s(impairment),
                        jitter_distribution=impairment.jitter_distribution, loss=_loss_model(impairment))


class BpfLossBackend(_PerInterface):
    """Loss alone, in the kernel: ``BpfLoss`` on the ``clsact`` ingress hook of the hop's far end
    (``port.peer_netns``/``peer_ifname``), else on the egress hook of the port's interface.

    The far end is preferred because a drop on the egress of a namespace whose own TCP socket
    sent the packet is reported back to the socket (NET_XMIT_DROP): TCP enters CWR and resends
    at once, which is local congestion, not loss in the network. Per skb: segmentation offloads
    must be off (a LabTopology turns them off) or a 64 KB aggregate is one draw. Refuses delay
    or jitter.
    """

    mechanism = "bpf"
    _place = staticmethod(_far_end_first)

    def _start(self, port: Port, impairment: Impairment) -> BpfLoss:
        self._loss_only(impairment)
        netns, ifname = self._place(port)
        hook = "ingress" if (port.peer_netns, port.peer_ifname) == (netns, ifname) else "egress"
        return BpfLoss(netns, ifname, loss=impairment.loss, hook=hook).start()

    def _change(self, emulator: BpfLoss, impairment: Impairment) -> None:
        self._loss_only(impairment)
        emulator.change(loss=impairment.loss)

    @staticmethod
    def _loss_only(impairment: Impairment) -> None:
        if impairment.gilbert_elliott is not None:
            raise CapabilityError("the bpf backend draws random loss only; for Gilbert-Elliott loss use "
                                  "TunEmulatorBackend or netem")
        if impairment.delay_s or impairment.jitter_s:
            raise CapabilityError(
                f"the bpf backend adds loss only, and this link asks for delay {impairment.delay_s} s / "
                f"jitter {impairment.jitter_s} s; use TunEmulatorBackend (or netem where the kernel has it)")


def _loss_model(impairment: Impairment) -> float | GilbertElliott:
    return impairment.gilbert_elliott if impairment.gilbert_elliott is not None else impairment.loss


def default_impairment_backend(capabilities: Capabilities, impairments: Iterable[Impairment] = (), *,
                               realtime_priority: int | None = None,
                               seed: int | None = None) -> ImpairmentBackend:
    """netem where the probe found it, the TUN emulator otherwise (``capabilities = probe()``).

    ``impairments``: what the links will ask for. Without netem, a link that needs what only
    netem gives is refused here, before anything is built.
    """
    if capabilities.netem:
        return NetemBackend()
    for impairment in impairments:
        _PerInterface._check(TunEmulatorBackend.mechanism, impairment)
    return TunEmulatorBackend(realtime_priority=realtime_priority, seed=seed)
