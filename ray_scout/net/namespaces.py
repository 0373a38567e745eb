"""The one way the link layer enters network namespaces, creates them, joins them with veths,
turns offloads off and writes sysctls.

A network namespace is a per-thread attribute in Linux: a thread can enter one, open a socket,
a TUN device or a ``/proc/sys/net`` file there, and come back; file descriptors keep the
namespace they were opened in. pyroute2's ``netns.create`` forks a helper process per
namespace, its pushns/popns keep one process-wide stack that saves the leader's namespace (not
the calling thread's), and ``IPRoute(netns=...)``/``NetNS`` silently create a missing
namespace. pyroute2's ``IPRoute`` also opens one netlink socket per *thread*, in whatever
namespace that thread is in at first use: code that drives a namespace from another thread
(trace replay, the allocator, the emulator) must enter it first, which ``in_netns`` and
``netlink`` do. Removing namespaces is left to ``pyroute2.netns.remove``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator, Sequence

from pyroute2 import IPRoute, netns
from pyroute2.ethtool.ioctl import IoctlEthtool

from ray_scout.net.errors import NetError

NETNS_DIR = "/var/run/netns"
LOOPBACK_INDEX = 1
CLONE_NEWNET = 0x40000000
# Legacy ethtool flags: TSO covers every TCP segmentation feature (v4, v6, ECN, mangleid), so
# HTB and per-packet loss act on MTU-sized frames, never on 64 KB GSO aggregates.
OFFLOADS = ("tcp-segmentation-offload", "generic-segmentation-offload", "generic-receive-offload")
_LIBC = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> str:
    """Path of the named namespace; raises with the fix when it does not exist."""
    path = os.path.join(NETNS_DIR, name)
    if not os.path.exists(path):
        raise NetError(f"network namespace {name!r} does not exist ({path} missing); create it "
                       "first (LabTopology, EmulatorLine or create_netns) or check the name")
    return path


def _setns(fd: int, what: str) -> None:
    if _LIBC.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetError(f"cannot enter network namespace {what}: {os.strerror(err)}; run as root")


def enter_netns(name: str) -> None:
    """Move the calling thread into ``name`` for good (a probe process, a thread you own)."""
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd, repr(name))
    finally:
        os.close(fd)


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside namespace ``name`` (``None``: stay here).

    Sockets, TUN fds and netlink sockets made in the body stay in that namespace. Thread-safe.
    """
    if name is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter_netns(name)
        yield
    finally:
        _setns(home, "of this thread (going back)")
        os.close(home)


@contextlib.contextmanager
def netlink(name: str | None) -> Iterator[IPRoute]:
    """A netlink socket inside ``name`` (``None``: this thread's), closed after the body.

    The body runs inside the namespace too, so pyroute2's per-thread socket is made there.
    """
    with in_netns(name):
        ipr = IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()


def create_netns(name: str) -> IPRoute:
    """Create namespace ``name`` with loopback up and return a netlink socket inside it.

    Done from the calling thread (unshare, then bind-mount /proc/thread-self/ns/net):
    pyroute2's ``netns.create`` forks a helper process per namespace, ~20 ms each.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _LIBC.unshare(CLONE_NEWNET) != 0:
            raise NetError(f"cannot create namespace {name}: {os.strerror(ctypes.get_errno())}; run as root")
        netns.attach(name, "thread-self")
        ipr = IPRoute()
        ipr.link("set", index=LOOPBACK_INDEX, state="up")  # also binds the socket here
        return ipr
    finally:
        _setns(home, "of this thread (going back)")
        os.close(home)


def add_veth(here: IPRoute, name: str, index: int, there: str, peer: str, peer_index: int) -> None:
    """A veth pair: ``name`` (ifindex ``index``) where ``here`` is bound, ``peer`` in namespace ``there``.

    Indices are chosen by the caller, not looked up: namespaces are new, and a lookup is a dump.
    """
    here.link("add", ifname=name, index=index, kind="veth",
              peer={"ifname": peer, "net_ns_fd": there, "index": peer_index})


def address_up(ipr: IPRoute, index: int, address: str, prefixlen: int = 24) -> None:
    """Give interface ``index`` an IPv4 address and bring it up."""
    ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
    ipr.link("set", index=index, state="up")


def offloads_off(ifnames: Sequence[str]) -> None:
    """Turn TSO/GSO/GRO off on ``ifnames`` in the calling thread's namespace.

    pyroute2's ioctl ethtool, one legacy set-call per flag: the feature-list route
    (Ethtool.get/set_features) reads every string set and costs ~4 ms per interface.
    """
    tool = IoctlEthtool()
    try:
        for ifname in ifnames:
            tool.change_ifname(ifname)
            for flag in OFFLOADS:
                tool.set_offload_flag(flag, 0)
    finally:
        tool.close()


def write_sysctl(key: str, value: str) -> None:
    """Write ``/proc/sys/<key>`` in the calling thread's namespace.

    ``key`` is slash-separated (``net/ipv4/ip_forward``, ``net/ipv4/conf/<ifname>/rp_filter``):
    interface names may contain dots, so dotted keys would be ambiguous.
    """
    with open(os.path.join("/proc/sys", key), "w") as handle:
        handle.write(value)


def read_sysctl(key: str) -> str:
    """Read ``/proc/sys/<key>`` (slash-separated) in the calling thread's namespace."""
    with open(os.path.join("/proc/sys", key)) as handle:
        return handle.read().strip()
