"""Sockets born in a named network namespace while the process stays where it is.

What lives here: `socket_in_netns`, which creates a socket inside /var/run/netns/<name>.
What it knows: a network namespace is a per-thread attribute on Linux and a socket keeps the
namespace it was created in for its whole life, so a short-lived thread of our own enters the
namespace (setns), creates the socket and exits; the socket is then used from any thread, and
the calling thread, Ray's control plane and every other thread never move.
What it leaves to others: creating namespaces, veth pairs and addresses (the net layer).

Python 3.11 has no os.setns (3.12 added it), hence the one libc call through ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading

NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000


class NetnsError(OSError):
    """The namespace cannot be entered; the message says why and what to do."""


def _libc_setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _explain(name: str, exc: OSError) -> NetnsError:
    path = os.path.join(NETNS_DIR, name)
    if exc.errno == errno.ENOENT:
        return NetnsError(
            errno.ENOENT,
            f"no network namespace named {name!r} ({path} is missing): create it first "
            f"(`ip netns add {name}` or the net layer's topology)",
        )
    if exc.errno in (errno.EPERM, errno.EACCES):
        return NetnsError(
            exc.errno,
            f"entering network namespace {name!r} needs CAP_SYS_ADMIN: run as root "
            f"(current uid {os.geteuid()})",
        )
    return NetnsError(exc.errno, f"cannot enter network namespace {name!r} ({path}): {exc}")


def socket_in_netns(
    name: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    """A new socket that lives in network namespace `name` (created by a thread of our own)."""
    if not name or "/" in name or name in (".", ".."):
        raise NetnsError(errno.EINVAL, f"bad network namespace name {name!r}: a bare name under {NETNS_DIR}")
    result: dict[str, object] = {}

    def enter_and_create() -> None:
        # This thread ends right after, so its namespace dies with it; nothing to restore.
        try:
            fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _libc_setns(fd)
            finally:
                os.close(fd)
            result["socket"] = socket.socket(family, type, proto)
        except OSError as exc:
            result["error"] = _explain(name, exc)

    worker = threading.Thread(target=enter_and_create, name=f"netns-{name}", daemon=True)
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["socket"]  # type: ignore[return-value]
