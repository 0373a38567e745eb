"""Capability probe: which qdiscs and classifiers this kernel has, found without side effects.

Every test happens inside a throwaway namespace on a throwaway veth pair, which is removed
before the probe returns, so probing never touches the host's interfaces. Netlink replies
are read with ``ext_ack=True``: an unknown kind comes back as ENOENT ("Specified qdisc kind
is unknown"), anything else means the kernel found the module and judged our arguments.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from ray_scout.net import PREFIX
from ray_scout.net.errors import NETEM_MISSING, require_root
from ray_scout.net.namespaces import create_netns, in_netns
from ray_scout.net.netem import NetemParams  # also registers the complete netem encoder with pyroute2

QDISCS = ("htb", "netem", "tbf", "pfifo", "bfifo", "fq_codel", "fq", "sfq", "cake", "clsact", "ingress")
CLASSIFIERS = ("u32", "bpf", "flower")
_QDISC_ARGS = {"htb": {"default": 1}, "netem": {"params": NetemParams(10, 0.001)}, "tbf": {"rate": 125000, "burst": 3000, "latency": 50000},
               "pfifo": {"limit": 10}, "bfifo": {"limit": 15000}}
_INGRESS_LIKE = ("clsact", "ingress")



@dataclass(frozen=True)
class Capabilities:
    """What the probe found. ``netem`` decides the impairment backend for delay/jitter/loss."""

    kernel: str
    qdiscs: frozenset[str]
    classifiers: frozenset[str]
    congestion_controls: tuple[str, ...]
    default_congestion_control: str

    @property
    def netem(self) -> bool:
        return "netem" in self.qdiscs

    @property
    def htb(self) -> bool:
        return "htb" in self.qdiscs and "u32" in self.classifiers

    def summary(self) -> str:
        lines = [
            f"kernel {self.kernel}",
            f"qdiscs:      {', '.join(sorted(self.qdiscs)) or 'none'}",
            f"missing:     {', '.join(q for q in QDISCS if q not in self.qdiscs) or 'none'}",
            f"classifiers: {', '.join(sorted(self.classifiers)) or 'none'}",
            f"tcp cc:      {', '.join(self.congestion_controls)} (default {self.default_congestion_control})",
        ]
        if not self.htb:
            lines.append("HTB or u32 missing: links cannot be rate-shaped here; build the kernel with "
                         "CONFIG_NET_SCH_HTB and CONFIG_NET_CLS_U32")
        if not self.netem:
            lines.append(NETEM_MISSING)
        return "\n".join(lines)


def _known(error: NetlinkError) -> bool:
    # ENOENT from RTM_NEWQDISC/NEWTFILTER is "kind unknown"; any other error is about arguments.
    return error.code != errno.ENOENT


def _probe_qdisc(ns: IPRoute, index: int, kind: str) -> bool:
    handle = "ffff:" if kind in _INGRESS_LIKE else "1:"
    try:
        ns.tc("add", kind, index=index, handle=handle, **_QDISC_ARGS.get(kind, {}))
    except NetlinkError as error:
        return _known(error)
    # pyroute2 encodes options even for a delete: give the same ones (tbf and netem refuse none).
    ns.tc("del", index=index, handle=handle, kind=kind, **_QDISC_ARGS.get(kind, {}))
    return True


def _probe_classifier(ns: IPRoute, index: int, kind: str) -> bool:
    args = {"u32": {"keys": ["0x0/0x0+0"], "target": 0x10001},
            "bpf": {"fd": 2**31 - 1, "name": "probe"},  # a bad fd: EBADF proves the kind exists
            "flower": {}}[kind]
    ns.tc("add", "htb", index=index, handle="1:", default=1)
    try:
        ns.tc("add-filter", kind, index=index, parent="1:", prio=1, protocol=0x0800, **args)
    except NetlinkError as error:
        return _known(error)
    finally:
        ns.tc("del", index=index, handle="1:", kind="htb")
    return True


def _read(path: str) -> str:
    return Path(path).read_text().strip()


def probe() -> Capabilities:
    """Probe qdiscs, classifiers and TCP congestion controls in a throwaway namespace."""
    require_root()
    name = f"{PREFIX}probe-{os.getpid()}"
    # In a thread of ours (create_netns), not pyroute2's forked helper: a probe runs inside
    # Ray workers and pytest, whose forked copies must never go on running.
    create_netns(name).close()
    try:
        with in_netns(name), IPRoute(ext_ack=True) as ns:  # the socket is made in there
            ns.link("add", ifname="probe0", kind="veth", peer="probe1")
            index = ns.link_lookup(ifname="probe0")[0]
            ns.link("set", index=index, state="up")
            qdiscs = frozenset(k for k in QDISCS if _probe_qdisc(ns, index, k))
            classifiers = frozenset(k for k in CLASSIFIERS if "htb" in qdiscs and _probe_classifier(ns, index, k))
    finally:
        netns.remove(name)
    return Capabilities(
        kernel=os.uname().release,
        qdiscs=qdiscs,
        classifiers=classifiers,
        congestion_controls=tuple(_read("/proc/sys/net/ipv4/tcp_available_congestion_control").split()),
        default_congestion_control=_read("/proc/sys/net/ipv4/tcp_congestion_control"),
    )
