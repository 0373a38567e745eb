"""Many HTB class changes in one netlink batch: a cell's whole split at once.

pyroute2 builds each class message in Python (two 256-entry rate tables each) and waits for
its ack: about a millisecond a class on a 2-core box, a second for a cell of 1,000 agents.
An allocator moves hundreds of classes at each split, so this module encodes the very
messages pyroute2's ``tc("change-class", "htb", ...)`` sends (``RTM_NEWTCLASS``: a
``tc_htb_opt`` and the rate and ceil tables),
with the tables cached per rate, sends them back to back on one netlink socket of the
namespace, then reads every ack and raises on the first error, naming its class. What it
leaves to others: which rates (the allocator), the class layout (``shaping.HtbShaper``).
"""

from __future__ import annotations

import functools
import os
import socket
import struct
from dataclasses import dataclass
from typing import Sequence

from pyroute2.netlink.rtnl.tcmsg.common import calc_xmittime

from ray_scout.net.errors import NetError
from ray_scout.net.namespaces import in_netns

RTM_NEWTCLASS = 40
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_HTB_PARMS, TCA_HTB_CTAB, TCA_HTB_RTAB = 1, 3, 4
MTU = 1600  # what pyroute2 and tc assume for the rate tables
U32_MAX = (1 << 32) - 1  # bytes/s: 34 Gbit/s, above profiles.MAX_RATE_BPS (no 64-bit rates)
_NLMSGHDR = struct.Struct("=IHHII")
_TCMSG = struct.Struct("=BxxxiIII")
_NLA = struct.Struct("=HH")
_RATESPEC = struct.Struct("=BBHhHI")  # cell_log, linklayer, overhead, cell_align, mpu, rate
_HTB_OPT_TAIL = struct.Struct("=IIIII")  # buffer, cbuffer, quantum, level, prio


@dataclass(frozen=True)
class ClassChange:
    """One class's new parameters, in ``shaping.htb_class_params``' units (bytes, bytes/s)."""

    ifindex: int
    classid: int
    parent: int
    rate: int  # bytes per second
    ceil: int
    quantum: int
    burst: int  # bytes
    cburst: int


def _cell_log() -> int:
    cell_log = 0
    while (MTU >> cell_log) > 255:
        cell_log += 1
    return cell_log


CELL_LOG = _cell_log()


@functools.lru_cache(maxsize=4096)
def rate_table(rate_Bps: int) -> bytes:
    """tc's 256-entry transmit-time table of a rate (Ethernet, no overhead), packed."""
    return struct.pack("=256I", *(calc_xmittime(rate_Bps, (i + 1) << CELL_LOG)
                                  for i in range(256)))


def _nla(kind: int, payload: bytes) -> bytes:
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def encode(change: ClassChange, seq: int) -> bytes:
    """The ``RTM_NEWTCLASS`` message of ``change`` (change, with ack), sequence ``seq``."""
    if max(change.rate, change.ceil) > U32_MAX:
        raise NetError(f"HTB rate {max(change.rate, change.ceil) * 8} bit/s needs 64-bit "
                       "attributes this batch does not send; stay within profiles.MAX_RATE_BPS")
    parms = (_RATESPEC.pack(CELL_LOG, 0, 0, -1, 0, change.rate)
             + _RATESPEC.pack(CELL_LOG, 0, 0, -1, 0, change.ceil)
             + _HTB_OPT_TAIL.pack(calc_xmittime(change.rate, change.burst),
                                  calc_xmittime(change.ceil, change.cburst),
                                  change.quantum, 0, 0))
    options = (_nla(TCA_HTB_PARMS, parms) + _nla(TCA_HTB_CTAB, rate_table(change.ceil))
               + _nla(TCA_HTB_RTAB, rate_table(change.rate)))
    body = (_TCMSG.pack(0, change.ifindex, change.classid, change.parent, 0)
            + _nla(TCA_KIND, b"htb\0") + _nla(TCA_OPTIONS, options))
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_NEWTCLASS,
                          NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def apply(netns: str | None, changes: Sequence[ClassChange]) -> None:
    """Send every change on one netlink socket inside ``netns``, then check every ack."""
    if not changes:
        return
    with in_netns(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        sock.bind((0, 0))
        pending = {seq: change for seq, change in enumerate(changes, start=1)}
        batch = b"".join(encode(change, seq) for seq, change in pending.items())
        view, step = memoryview(batch), 1 << 16
        while view:  # the kernel takes a datagram of whole messages: cut at message ends
            cut = _message_boundary(view, step)
            sock.send(view[:cut])
            view = view[cut:]
            _drain(sock, pending, block=False)
        while pending:
            _drain(sock, pending, block=True)
    finally:
        sock.close()


def _message_boundary(view: memoryview, limit: int) -> int:
    end = 0
    while end < len(view):
        size = _NLMSGHDR.unpack_from(view, end)[0]
        if end and end + size > limit:
            break
        end += size
    return end


def _drain(sock: socket.socket, pending: dict[int, ClassChange], block: bool) -> None:
    """Read the acks that have arrived (at least one when ``block``)."""
    flags = 0 if block else socket.MSG_DONTWAIT
    while pending:
        try:
            data = sock.recv(1 << 20, flags)
        except BlockingIOError:
            return
        offset = 0
        while offset < len(data):
            size, kind, _, seq, _ = _NLMSGHDR.unpack_from(data, offset)
            if kind == NLMSG_ERROR and seq in pending:
                error = -struct.unpack_from("=i", data, offset + _NLMSGHDR.size)[0]
                change = pending.pop(seq)
                if error:
                    raise NetError(f"HTB class {change.classid >> 16:x}:{change.classid & 0xFFFF:x}"
                                   f" on interface {change.ifindex}: {os.strerror(error)}")
            offset += max(size, _NLMSGHDR.size)
        flags = socket.MSG_DONTWAIT
