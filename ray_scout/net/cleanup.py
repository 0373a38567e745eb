"""Remove what the project left on this host, as ``mn -c`` does for Mininet.

Finds objects by their marks only: namespaces and root-namespace interfaces whose names start
with the prefix (``rs-`` by default, ``rs-<run>-`` for one run) and, with the plain prefix,
root HTB qdiscs of major 0x7273 on host interfaces (left by ``HtbShaper`` on a NIC). Nothing
else is touched. Tests pass their own run's prefix, never the bare one, so concurrent runs
of other people stay intact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyroute2 import IPRoute, netns

from ray_scout.net import PREFIX
from ray_scout.net.errors import NetError, require_root
from ray_scout.net.shaping import HTB_MAJOR


@dataclass(frozen=True)
class Leftovers:
    """What carries the project's marks right now."""

    namespaces: tuple[str, ...] = ()
    links: tuple[str, ...] = ()
    qdiscs: tuple[str, ...] = field(default=())  # interface names with our root HTB

    @property
    def empty(self) -> bool:
        return not (self.namespaces or self.links or self.qdiscs)


def find_leftovers(prefix: str = PREFIX) -> Leftovers:
    """List namespaces, host links and host root qdiscs that carry ``prefix`` / our HTB major."""
    if not prefix.startswith(PREFIX):
        raise NetError(f"cleanup prefix must start with {PREFIX!r} (the project's mark); got {prefix!r}")
    namespaces = tuple(sorted(n for n in netns.listnetns() if n.startswith(prefix)))
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        links = tuple(sorted(n for n in names.values() if n.startswith(prefix)))
        qdiscs = ()
        if prefix == PREFIX:
            qdiscs = tuple(sorted(names[q["index"]] for q in ipr.get_qdiscs()
                                  if q["parent"] == 0xFFFFFFFF and q["handle"] >> 16 == HTB_MAJOR
                                  and q["index"] in names))
    return Leftovers(namespaces, links, qdiscs)


def cleanup(prefix: str = PREFIX) -> Leftovers:
    """Remove everything ``find_leftovers(prefix)`` lists; returns what was removed."""
    require_root()
    found = find_leftovers(prefix)
    for name in found.namespaces:
        netns.remove(name)
    with IPRoute() as ipr:
        for name in found.links:
            for index in ipr.link_lookup(ifname=name):
                ipr.link("del", index=index)
        for name in found.qdiscs:
            for index in ipr.link_lookup(ifname=name):
                ipr.tc("del", index=index, handle=HTB_MAJOR << 16, kind="htb")
    return found
