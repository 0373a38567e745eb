"""This process's resident memory, now and at its peak, for tests that bound what hostile
input can make a decoder or a server hold.

The peak is the kernel's high-water mark (VmHWM), reset through /proc/self/clear_refs, so a
buffer allocated and freed between two samples still counts.
"""

from __future__ import annotations

MIB = 1 << 20


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def rss_bytes() -> int:
    """Resident now (VmRSS)."""
    return _status_bytes("VmRSS")


def reset_peak() -> int:
    """Start a new peak from what is resident now (Linux >= 4.0); returns that."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _status_bytes("VmHWM")


def peak_rss_bytes() -> int:
    """The most that was resident since the last ``reset_peak`` (VmHWM)."""
    return _status_bytes("VmHWM")
