"""Entering a named network namespace from one thread, for the emulator and its probes.

A network namespace is a per-thread attribute in Linux, so a short-lived thread can enter
one, open a TUN device or write a sysctl there, and leave the rest of the process alone:
file descriptors keep the namespace they were opened in. Python 3.11 has no ``os.setns``,
hence the one ctypes call. Creating and removing namespaces is left to pyroute2's ``netns``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Callable, TypeVar

NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(netns: str) -> str:
    """Path of a named namespace; raises with the fix when it does not exist."""
    path = os.path.join(NETNS_DIR, netns)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"network namespace {netns!r} does not exist ({path} missing); "
            "create it first (pyroute2.netns.create) or check the name"
        )
    return path


def enter_netns(netns: str) -> None:
    """Move the calling thread into ``netns`` (for good: call it in a thread you own)."""
    fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns!r} failed: {os.strerror(err)}; run as root")
    finally:
        os.close(fd)


def run_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that has entered ``netns``; return its result or raise."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            enter_netns(netns)
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=body, name=f"rs-netns-{netns}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def write_sysctl(parts: tuple[str, ...], value: str) -> None:
    """Write the sysctl ``/proc/sys/<parts...>`` in the calling thread's namespace.

    A tuple rather than a dotted key because interface names may contain dots.
    """
    path = os.path.join("/proc/sys", *parts)
    with open(path, "w") as fh:
        fh.write(value)


def read_sysctl(parts: tuple[str, ...]) -> str:
    """Read the sysctl ``/proc/sys/<parts...>`` in the calling thread's namespace."""
    with open(os.path.join("/proc/sys", *parts)) as fh:
        return fh.read().strip()
