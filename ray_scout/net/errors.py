"""Errors of the link layer, and the one privilege check every mutating entry point runs.

Each message says what went wrong and what to do next; nothing here logs and carries on.
"""

from __future__ import annotations

import os


NETEM_MISSING = (
    "this kernel has no sch_netem: rate is still exact (HTB), but delay, jitter and loss must "
    "come from another impairment backend (the userspace TUN emulator, ray_scout.net.emulator, "
    "or a cls_bpf loss program); links record which one shaped them"
)


class NetError(RuntimeError):
    """A link-layer operation could not be done; the message says what to do instead."""


class CapabilityError(NetError):
    """The kernel or the process lacks something a requested link needs."""


def require_root() -> None:
    """Raise unless the process may create namespaces and qdiscs (root / CAP_NET_ADMIN)."""
    if os.geteuid() != 0:
        raise CapabilityError(
            "network namespaces and qdiscs need root (CAP_NET_ADMIN + CAP_SYS_ADMIN); "
            "run this command as root (sudo)"
        )
