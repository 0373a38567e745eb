"""Remove what the project left on this host, as ``mn -c`` does for Mininet.

Finds objects by their marks only: namespaces and root-namespace interfaces whose names start
with the prefix (``rs-`` by default, ``rs-<run>-`` for one run) and, with the plain prefix,
root HTB qdiscs of major 0x7273 on host interfaces (left by ``HtbShaper`` on a NIC) and the TUN
emulator's policy rules outside ``rs-`` namespaces. Nothing else is touched. A run whose owner
process is alive (it holds its lock, ``owner``) is never touched: its namespaces and links are
kept and reported. ``remove_stale`` takes only what runs whose owner died left (the next
``scout run`` calls it), never objects of unknown origin. Tests pass their own run's prefix,
never the bare one, so concurrent runs of other people stay intact.

What the emulators can leave when their process dies without stopping them: TUN devices are
not persistent (they vanish with the process's fds, and their routes with them) and the pump
threads die with it, but the two policy rules per emulator (priority 999 ``iif rs-t...
lookup main`` and 1000 ``... lookup 0x7273xxxx``) are namespace state and stay. In an ``rs-``
namespace they go with the namespace; elsewhere (a namespace someone else named, or the host's
if it was given a name) they are found by those marks. The eBPF loss filter and its ``clsact``
qdisc are interface state: in an ``rs-`` namespace they also go with it.
"""

from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass, field

from pyroute2 import IPRoute, netns

from ray_scout.net import PREFIX
from ray_scout.net.emulator import GUARD_PRIORITY, RULE_PRIORITY, TABLE_BASE, TABLE_SPAN, TUN_PREFIX
from ray_scout.net.errors import NetError, require_root
from ray_scout.net.namespaces import NETNS_DIR, netlink
from ray_scout.net.owner import live_prefixes, stale_prefixes
from ray_scout.net.shaping import HTB_MAJOR

MAIN_TABLE = 254
HOST = "host"  # how the initial namespace is named in ``Leftovers.rules``


@dataclass(frozen=True)
class EmulatorRule:
    """A policy rule the TUN emulator added (its marks: priority, table range, TUN name)."""

    netns: str  # HOST for the initial namespace
    priority: int
    table: int
    selector: tuple[tuple[str, object], ...]  # what ``ipr.rule`` needs to match it again

    def __str__(self) -> str:
        return f"{self.netns}: priority {self.priority} {dict(self.selector)} table {self.table:#x}"


def emulator_rules(ipr: IPRoute, where: str) -> list[EmulatorRule]:
    """The IPv4 rules in ``ipr``'s namespace that carry the TUN emulator's marks."""
    found = []
    for rule in ipr.get_rules(family=2):
        priority, table = rule.get_attr("FRA_PRIORITY"), rule.get_attr("FRA_TABLE")
        iifname = rule.get_attr("FRA_IIFNAME")
        guard = (priority == GUARD_PRIORITY and table == MAIN_TABLE and iifname is not None
                 and iifname.startswith(TUN_PREFIX))
        steer = priority == RULE_PRIORITY and TABLE_BASE <= (table or 0) < TABLE_BASE + TABLE_SPAN
        if not (guard or steer):
            continue
        selector = {"iifname": iifname} if iifname else {}
        for attr, key in (("FRA_DST", "dst"), ("FRA_SRC", "src")):
            if rule.get_attr(attr) is not None:
                selector.update({key: rule.get_attr(attr), f"{key}_len": rule[f"{key}_len"]})
        found.append(EmulatorRule(where, priority, table, tuple(sorted(selector.items()))))
    return found


def remove_emulator_rules(ipr: IPRoute, rules: list[EmulatorRule]) -> None:
    for rule in rules:
        ipr.rule("del", priority=rule.priority, table=rule.table, **dict(rule.selector))


def _rule_places() -> list[str | None]:
    """Where emulator rules can outlive their process unseen: the host and non-rs namespaces."""
    return [None] + [n for n in netns.listnetns() if not n.startswith(PREFIX)]


@dataclass(frozen=True)
class Leftovers:
    """What carries the project's marks right now."""

    namespaces: tuple[str, ...] = ()
    links: tuple[str, ...] = ()
    qdiscs: tuple[str, ...] = field(default=())  # interface names with our root HTB
    rules: tuple[EmulatorRule, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.namespaces or self.links or self.qdiscs or self.rules)


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
    rules: list[EmulatorRule] = []
    if prefix == PREFIX:  # rules name no run: only a full cleanup may take them
        for place in _rule_places():
            if place is not None and not os.path.exists(os.path.join(NETNS_DIR, place)):
                continue  # removed since it was listed (another run's teardown)
            with netlink(place) as ipr:
                rules += emulator_rules(ipr, place or HOST)
    return Leftovers(namespaces, links, qdiscs, tuple(rules))


def of_live_runs(found: Leftovers) -> Leftovers:
    """The namespaces and links in ``found`` that belong to a run whose owner is alive."""
    live = tuple(live_prefixes())
    return Leftovers(tuple(n for n in found.namespaces if n.startswith(live)),
                     tuple(n for n in found.links if n.startswith(live)))


def cleanup(prefix: str = PREFIX) -> Leftovers:
    """Remove everything ``find_leftovers(prefix)`` lists but a live run's (see
    ``of_live_runs``); returns what was removed."""
    require_root()
    found = find_leftovers(prefix)
    live = of_live_runs(found)
    return _remove(dataclasses.replace(
        found, namespaces=tuple(n for n in found.namespaces if n not in live.namespaces),
        links=tuple(n for n in found.links if n not in live.links)))


def _remove(found: Leftovers) -> Leftovers:
    for name in found.namespaces:
        netns.remove(name)
    with IPRoute() as ipr:
        for name in found.links:
            for index in ipr.link_lookup(ifname=name):
                ipr.link("del", index=index)
        for name in found.qdiscs:
            for index in ipr.link_lookup(ifname=name):
                ipr.tc("del", index=index, handle=HTB_MAJOR << 16, kind="htb")
    for place in {rule.netns for rule in found.rules}:
        with netlink(None if place == HOST else place) as ipr:
            remove_emulator_rules(ipr, [rule for rule in found.rules if rule.netns == place])
    return found


def remove_stale() -> dict[str, Leftovers]:
    """Remove what runs whose owner process died (SIGKILL, a crash) left; returns what was
    removed, by run prefix. Live runs and objects without an owner are not touched."""
    require_root()
    removed = {}
    for prefix in stale_prefixes():  # its lock held here: ``cleanup`` would call it live
        found = _remove(find_leftovers(prefix))
        if not found.empty:
            removed[prefix] = found
    return removed
