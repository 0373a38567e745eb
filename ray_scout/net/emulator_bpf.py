"""Random loss alone, in the kernel: a six-instruction eBPF ``cls_bpf`` program (direct action).

Where a link needs loss but no delay, the packets need not leave the kernel: a classifier on
the ``clsact`` hook of an interface draws ``bpf_get_prandom_u32()`` per packet and returns
TC_ACT_SHOT below a threshold. The program is assembled here as raw instructions and loaded
with the ``bpf()`` syscall through ctypes, so no clang, bpftool or libbpf is needed; pyroute2
attaches it. Changing the loss swaps in a program with a new threshold. Delay and jitter are
left to ``TunImpairment``; rate to HTB.

Semantics: Bernoulli loss per packet on the chosen hook (``egress`` by default: after
routing, before the root qdisc, so HTB never sees the dropped packets). GSO packets are one
packet to the hook: turn segmentation offloads off on the interface, or attach on the
ingress hook of a receiving veth, when loss must act per MTU segment.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import platform
import struct
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ray_scout.net.namespaces import NETNS_DIR, netlink, netns_path

MECHANISM = "bpf"

SYS_BPF_BY_MACHINE = {"x86_64": 321, "aarch64": 280}
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_FUNC_GET_PRANDOM_U32 = 7
TC_ACT_OK = 0
TC_ACT_SHOT = 2
CLSACT_PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
ETH_P_ALL = 0x0003
FILTER_PRIO_BASE = 0x7273  # "rs", so that cleanup and people can tell the filter apart

_prios = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhI", code, dst | (src << 4), off, imm & 0xFFFFFFFF)


def loss_threshold(loss: float) -> int:
    """The u32 below which a random draw drops the packet: P(drop) = threshold / 2**32."""
    if not 0.0 <= loss <= 1.0:
        raise ValueError(f"loss={loss} must be a probability in [0, 1] (0.01 is 1%)")
    return min(round(loss * 2**32), 2**32 - 1)


def random_drop_program(loss: float) -> bytes:
    """Instructions: r0 = prandom(); if w0 >= threshold return OK; return SHOT."""
    return b"".join((
        _insn(0x85, imm=BPF_FUNC_GET_PRANDOM_U32),  # call
        _insn(0x36, dst=0, off=2, imm=loss_threshold(loss)),  # jmp32 jge (unsigned), imm
        _insn(0xB7, dst=0, imm=TC_ACT_SHOT),  # mov64 r0, imm
        _insn(0x95),  # exit
        _insn(0xB7, dst=0, imm=TC_ACT_OK),
        _insn(0x95),
    ))


def load_program(code: bytes, name: str) -> int:
    """Load a SCHED_CLS program; returns its fd. Raises with the verifier log on rejection."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(
        struct.pack(
            "<IIQQIIQII16s",
            BPF_PROG_TYPE_SCHED_CLS, len(code) // 8, ctypes.addressof(insns),
            ctypes.addressof(license_), 1, len(log), ctypes.addressof(log), 0, 0,
            name.encode()[:15],
        ),
        128,
    )
    machine = platform.machine()
    if machine not in SYS_BPF_BY_MACHINE:
        raise OSError(f"no bpf() syscall number known for {machine}; use the TUN emulator for loss")
    fd = _libc.syscall(SYS_BPF_BY_MACHINE[machine], BPF_PROG_LOAD, attr, 128)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(
            err,
            f"loading the eBPF loss program failed: {os.strerror(err)}; needs root (CAP_BPF) and "
            f"a kernel with BPF syscall support. Verifier said: {log.value.decode(errors='replace')}",
        )
    return fd


@dataclass(frozen=True)
class BpfLossStats:
    """The clsact hook's counters (all packets through the hook since it was added)."""

    packets: int
    bytes: int
    packets_dropped: int


class BpfLoss:
    """Bernoulli loss on the ``hook`` of ``iface`` in ``netns``; start/change/stop; a context
    manager."""

    mechanism = MECHANISM

    def __init__(self, netns: str, iface: str, *, loss: float, hook: str = "egress") -> None:
        if hook not in CLSACT_PARENT:
            raise ValueError(f"hook={hook!r}; use 'egress' or 'ingress'")
        loss_threshold(loss)
        self.netns = netns
        self.iface = iface
        self.hook = hook
        self.loss = loss
        self.prio = FILTER_PRIO_BASE + (os.getpid() + next(_prios)) % 0x100
        self._index: int | None = None
        self._created_clsact = False

    def __enter__(self) -> "BpfLoss":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _filter(self, ipr: IPRoute, command: str, fd: int) -> None:
        ipr.tc(
            command, "bpf", index=self._index, handle=1, fd=fd, name=f"rs-loss-{self.prio:x}",
            parent=CLSACT_PARENT[self.hook], prio=self.prio, protocol=ETH_P_ALL, direct_action=True,
        )

    def _install(self, command: str) -> None:
        fd = load_program(random_drop_program(self.loss), "rs_loss")
        try:
            with netlink(self.netns) as ipr:
                self._filter(ipr, command, fd)
        finally:
            os.close(fd)  # the attached filter holds its own reference

    def start(self) -> "BpfLoss":
        if self._index is not None:
            raise RuntimeError("already started; call stop() first")
        netns_path(self.netns)
        with netlink(self.netns) as ipr:
            found = ipr.link_lookup(ifname=self.iface)
            if not found:
                raise ValueError(f"interface {self.iface!r} not found in namespace {self.netns!r}")
            index = found[0]
            if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=index)):
                ipr.tc("add", "clsact", index=index)
                self._created_clsact = True
        self._index = index
        try:
            self._install("add-filter")
        except BaseException:
            self.stop()
            raise
        return self

    def change(self, *, loss: float) -> None:
        """New loss probability from the next packet on (the program is swapped atomically)."""
        loss_threshold(loss)
        self.loss = loss
        self._install("replace-filter")

    @property
    def stats(self) -> BpfLossStats:
        with netlink(self.netns) as ipr:
            for qdisc in ipr.get_qdiscs(index=self._index):
                if qdisc.get_attr("TCA_KIND") == "clsact":
                    basic = qdisc.get_attr("TCA_STATS2").get_attr("TCA_STATS_BASIC")
                    queue = qdisc.get_attr("TCA_STATS2").get_attr("TCA_STATS_QUEUE")
                    return BpfLossStats(basic["packets"], basic["bytes"], queue["drops"])
        raise RuntimeError(f"no clsact qdisc on {self.iface!r}; was the loss stopped?")

    def stop(self) -> None:
        """Remove the filter, and the clsact qdisc if this object added it; idempotent."""
        if self._index is None:
            return
        index, self._index = self._index, None
        if not os.path.exists(os.path.join(NETNS_DIR, self.netns)):
            return  # the namespace went, and the filter with it
        with netlink(self.netns) as ipr:
            try:
                if self._created_clsact:
                    ipr.tc("del", "clsact", index=index)
                else:
                    ipr.tc("del-filter", "bpf", index=index, parent=CLSACT_PARENT[self.hook],
                           prio=self.prio, protocol=ETH_P_ALL)
            except NetlinkError as exc:
                if exc.code not in (2, 22):  # already gone with its interface or qdisc
                    raise
        self._created_clsact = False
