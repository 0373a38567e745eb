"""Lab-in-a-box: edge agents in namespaces, one for the cloud, joined by a base station.

::

    rs-<run>-e0 ──access e0──┐
    rs-<run>-e1 ──access e1──┤ rs-<run>-bs ══bottleneck══ rs-<run>-cloud
         ...                 ┘   (router)      (shared)

Each access link is a veth pair with its own profile: HTB at the uplink rate on the edge's
end, at the downlink rate on the base station's end. A cell of hundreds of agents uses
*sites* instead (``site_size`` > 1): up to 250 agents share a site namespace
``rs-<run>-s<k>`` and its veth, each with its own address on it and its own access link as
an HTB class on each end of that veth (uplink matched by its source address, downlink by its
destination), so every agent still has its access link and its bottleneck class, at a
namespace and a veth per site rather than per agent. The bottleneck's uplink (base station
toward the cloud) has one HTB class per agent, matched by the agent's source address, with a
guaranteed share and the bottleneck rate as ceil: this is what the allocator drives. Delay,
jitter and loss go to the impairment backend (netem where present). Offloads are off on every
veth (HTB then sees real frames, not 64 KB GSO segments) and each namespace's TCP congestion
control is pinned from its profile; both are recorded.

Addresses live only inside these namespaces: access link (or site) k is 10.77.(k+1).0/24 (base
station .1, edges .2 upward), the bottleneck 10.77.0.0/24 (base station .1, cloud .2). Namespaces are named
``rs-<run>-...`` and interfaces ``rs-<run>-...`` so that ``scout net cleanup`` finds leftovers.
What this module leaves to others: traffic (transport), rates over time (allocator, replay).
"""

from __future__ import annotations

import atexit
import os
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pyroute2 import IPRoute, netns

from ray_scout.net import PREFIX
from ray_scout.net.backends import default_impairment_backend
from ray_scout.net.errors import NetError, require_root
from ray_scout.net.namespaces import add_veth, address_up, create_netns, in_netns, offloads_off, write_sysctl
from ray_scout.net.profiles import (
    DEFAULT_MTU, MAX_RATE_BPS, Direction, LinkProfile, check_rate_bps,
)
from ray_scout.net.owner import Ownership
from ray_scout.net.probe import probe
from ray_scout.net.shaping import HtbShaper, ImpairmentBackend, LeafClass, LinkShaping, Match, Port

MAX_SITES = 250  # one /24 of 10.77.0.0/16 each
MAX_SITE_SIZE = 250  # edge addresses .2 to .251 of a site's /24
AUTO = "auto"  # impairment backend chosen from the probe when a profile needs one
LAB_NET = "10.77.0.0/16"
# SCHED_FIFO for the TUN emulator's pump threads when the topology picks it: on a loaded host
# this is what keeps releases on time (docs/EMULATOR.md); they block between packets.
EMULATOR_REALTIME_PRIORITY = 10
BOTTLENECK_NET = "10.77.0"
PEER_INDEX = 2  # ifindex of the one veth in a cloud/edge namespace (lo is 1), and of bs's uplink
FIRST_ACCESS_INDEX = 10  # ifindex of the base station's end of access link i: 10 + i


def edge_address(index: int, site_size: int = 1) -> str:
    site, slot = divmod(index, site_size)
    return f"10.77.{site + 1}.{slot + 2}"


CLOUD_ADDRESS = f"{BOTTLENECK_NET}.2"


def _pin_namespace_cc(cc: str) -> str:
    """Make ``cc`` the namespace default where the kernel lets us; else sockets pin it.

    Outside the initial namespace the kernel accepts only congestion controls listed in the
    host's ``tcp_allowed_congestion_control`` (EPERM otherwise, even for root), and changing
    the host's list is not ours to do. ``LabTopology.socket`` pins ``cc`` per socket anyway.
    """
    try:
        write_sysctl("net/ipv4/tcp_congestion_control", cc)
    except PermissionError:
        return "socket"
    return "netns"


def pin_congestion_control(sock: socket.socket, cc: str) -> None:
    """Pin a TCP socket's congestion control (needs CAP_NET_ADMIN for non-allowed ones)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
    except OSError as error:
        raise NetError(f"cannot pin congestion control {cc!r} on a socket ({error}); run as root "
                       f"or `modprobe tcp_{cc}`") from error


@dataclass(frozen=True)
class Edge:
    """One edge agent's place in the topology."""

    name: str
    index: int
    netns: str
    address: str
    access: LinkProfile
    site: int  # its access link (site_size 1) or the site it shares with others


class LabTopology:
    """Build with ``with LabTopology(...) as topo:``; torn down on exit, on Ctrl-C and at exit."""

    def __init__(self, access: Sequence[LinkProfile], bottleneck: LinkProfile, *,
                 shares_bps: Sequence[int] | None = None, impairment: ImpairmentBackend | str | None = AUTO,
                 run_id: str | None = None, congestion_control: str | None = None,
                 disable_offloads: bool = True, site_size: int = 1):
        if not 1 <= site_size <= MAX_SITE_SIZE:
            raise NetError(f"site_size must be 1 to {MAX_SITE_SIZE} agents, not {site_size}")
        if not 1 <= len(access) <= MAX_SITES * site_size:
            raise NetError(f"give 1 to {MAX_SITES * site_size} access profiles (one per edge) at "
                           f"site_size {site_size}; got {len(access)} (raise site_size for more)")
        capacity = bottleneck.up.rate_bps
        shares = list(shares_bps) if shares_bps is not None else [capacity // len(access)] * len(access)
        if len(shares) != len(access):
            raise NetError(f"shares_bps has {len(shares)} entries for {len(access)} edges; give one per edge")
        for share in shares:
            check_rate_bps(share)
        if sum(shares) > capacity:
            raise NetError(f"shares_bps sum to {sum(shares)} bit/s, above the bottleneck's {capacity}; "
                           "scale them down (guarantees must fit the link)")
        self.run_id = run_id or secrets.token_hex(2)
        self.prefix = f"{PREFIX}{self.run_id}-"
        if len(self.prefix) + 4 > 15:
            raise NetError(f"run_id {self.run_id!r} is too long for 15-character interface names; use <= 6 chars")
        self.bottleneck = bottleneck
        self.impairment = impairment
        self.congestion_control = congestion_control
        self.disable_offloads = disable_offloads
        self.cloud_netns = f"{self.prefix}cloud"
        self.bs_netns = f"{self.prefix}bs"
        self.site_size = site_size
        self.sites = [f"{self.prefix}{'e' if site_size == 1 else 's'}{k}"
                      for k in range(-(-len(access) // site_size))]
        self.edges = [Edge(f"e{i}", i, self.sites[i // site_size], edge_address(i, site_size),
                           profile, i // site_size) for i, profile in enumerate(access)]
        for k in range(len(self.sites)):
            mtus = sorted({e.access.mtu for e in self.edges if e.site == k})
            if len(mtus) > 1:
                raise NetError(f"agents sharing site {k} have access profiles of MTUs {mtus}; "
                               "a site is one veth: give them one MTU, or site_size 1")
        self._shares = shares
        self.cc_scope: dict[str, str] = {}
        self._iprs: dict[str, IPRoute] = {}
        self._ifindex: dict[str, int] = {}
        self._ns_ifnames: dict[str, list[str]] = {}
        self._records: list[LinkShaping] = []
        self._impaired: list[tuple[LeafClass, Port]] = []
        self.uplinks: dict[str, HtbShaper] = {}  # edge -> its access link's uplink (set_rate)
        self.downlinks: dict[str, HtbShaper] = {}
        self.shares: dict[str, LeafClass] = {}
        self.bottleneck_up: HtbShaper | None = None
        self.bottleneck_down: LeafClass | None = None
        self.build_s = 0.0
        self.teardown_s = 0.0
        self._ownership: Ownership | None = None

    @property
    def namespaces(self) -> list[str]:
        return [self.cloud_netns, self.bs_netns] + self.sites

    def edge(self, name: str) -> Edge:
        for edge in self.edges:
            if edge.name == name:
                return edge
        raise NetError(f"no edge {name!r}; edges are {[e.name for e in self.edges]}")

    def __enter__(self) -> LabTopology:
        self.build()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def build(self) -> LabTopology:
        require_root()
        # Claimed first: while this process lives, no cleanup takes this run's namespaces;
        # once it is gone (SIGKILL included), `scout net cleanup --stale` or the next
        # `scout run` removes what it left (``owner``).
        ownership = Ownership(self.prefix)
        existing = set(netns.listnetns())
        clash = [n for n in self.namespaces if n in existing]
        if clash:
            # Leftovers of a dead owner keep their lock file (the next stale cleanup takes
            # them); ones of unknown origin are left to the user.
            ownership.release(forget=not ownership.inherited)
            raise NetError(f"namespace {clash[0]} exists already: pick another run_id, or remove "
                           "leftovers with `python3 -m ray_scout.cli net cleanup --prefix "
                           f"{self.prefix}`")
        self._ownership = ownership
        start = time.perf_counter()
        atexit.register(self.teardown)
        try:
            for name in self.namespaces:
                self._iprs[name] = create_netns(name)
            self._wire()
            self._configure_namespaces()
            self.impairment = self._backend(self.impairment)
            self._shape()
        except BaseException as error:
            # The cause of the failure is what the user must see; a teardown that fails too
            # rides along as a note, never in its place.
            try:
                self.teardown()
            except Exception as cleanup:  # noqa: BLE001 - reported on the original error
                error.add_note(f"cleaning up after it also failed: {cleanup}")
            raise
        self.build_s = time.perf_counter() - start
        return self

    def _veth(self, here: str, name: str, index: int, there: str, peer: str, address: str,
              peer_address: str) -> None:
        add_veth(self._iprs[here], name, index, there, peer, PEER_INDEX)
        for ns, ifname, ifindex, addr in ((here, name, index, address), (there, peer, PEER_INDEX, peer_address)):
            self._ifindex[ifname] = ifindex
            self._ns_ifnames.setdefault(ns, []).append(ifname)
            address_up(self._iprs[ns], ifindex, addr)

    def _wire(self) -> None:
        self._veth(self.bs_netns, f"{self.prefix}bc", PEER_INDEX, self.cloud_netns, f"{self.prefix}c",
                   f"{BOTTLENECK_NET}.1", CLOUD_ADDRESS)
        self._iprs[self.cloud_netns].route("add", dst="10.77.0.0/16", gateway=f"{BOTTLENECK_NET}.1")
        for k, site in enumerate(self.sites):
            members = [e for e in self.edges if e.site == k]
            self._veth(self.bs_netns, f"{self.prefix}b{k}", FIRST_ACCESS_INDEX + k,
                       site, site,
                       f"10.77.{k + 1}.1", members[0].address)
            for edge in members[1:]:  # the site's other agents: more addresses on its veth
                self._iprs[site].addr("add", index=PEER_INDEX, address=edge.address,
                                      prefixlen=24)
            if members[0].access.mtu != DEFAULT_MTU:  # the link's frames: both ends of its veth
                self._iprs[self.bs_netns].link("set", index=FIRST_ACCESS_INDEX + k,
                                               mtu=members[0].access.mtu)
                self._iprs[site].link("set", index=PEER_INDEX, mtu=members[0].access.mtu)
            self._iprs[site].route("add", dst="10.77.0.0/16", gateway=f"10.77.{k + 1}.1")

    def _cc(self, name: str) -> str:
        if self.congestion_control:
            return self.congestion_control
        if name == self.cloud_netns or name == self.bs_netns:
            return self.bottleneck.congestion_control
        return next(e.access.congestion_control for e in self.edges if e.netns == name)

    def _configure_namespaces(self) -> None:
        available = open("/proc/sys/net/ipv4/tcp_available_congestion_control").read().split()
        for name in self.namespaces:
            cc = self._cc(name)
            if cc not in available:
                raise NetError(f"congestion control {cc!r} is not available (have {available}); "
                               f"`modprobe tcp_{cc}` or pick one of those")
            with in_netns(name):
                self.cc_scope[name] = _pin_namespace_cc(cc)
                if name == self.bs_netns:
                    write_sysctl("net/ipv4/ip_forward", "1")
                if self.disable_offloads:
                    offloads_off(self._ns_ifnames[name])

    def _shaper(self, ns: str, ifname: str, direction: Direction,
                per_class: bool = False) -> tuple[HtbShaper, LeafClass]:
        shaper = HtbShaper(self._iprs[ns], ifname, direction.rate_bps, direction.queue_bytes, netns=ns,
                           per_class=per_class, ifindex=self._ifindex[ifname])
        return shaper, shaper.install()

    def _backend(self, choice: ImpairmentBackend | str | None) -> ImpairmentBackend | None:
        """``AUTO``: the probe's pick (netem, else the TUN emulator), only if a profile needs one."""
        if choice != AUTO:
            return choice
        directions = [d for e in self.edges for d in (e.access.up, e.access.down)]
        directions += [self.bottleneck.up, self.bottleneck.down]
        impairments = [d.impairment for d in directions if not d.impairment.is_none]
        if not impairments:
            return None
        return default_impairment_backend(probe(), impairments, realtime_priority=EMULATOR_REALTIME_PRIORITY)

    def _impair(self, leaf: LeafClass, direction: Direction, local: str, peer: str, steer_dst: str,
                peer_netns: str, peer_ifname: str) -> None:
        # Each direction is impaired in the namespace that sends it, selected by where it goes:
        # every packet then meets each impaired link it crosses exactly once (see _shape).
        port = leaf.shaper.impair(leaf, direction.impairment, self.impairment, local, peer, steer_dst=steer_dst,
                                  peer_netns=peer_netns, peer_ifname=peer_ifname)
        if port is not None:
            self._impaired.append((leaf, port))

    def _shape(self) -> None:
        """HTB on every veth end, impairments per direction.

        The base station routes (one /24 per link, ip_forward=1), it does not bridge, so every
        namespace on the path consults policy routing. The TUN emulator works there by
        destination: edge i steers everything toward the lab (10.77.0.0/16) through its
        access-up emulator; the base station steers traffic to 10.77.(i+1).0/24 through access i's
        down emulator and traffic to 10.77.0.0/24 through the bottleneck-up one; the cloud
        steers everything toward the lab through the bottleneck-down one. These selectors are
        disjoint within each namespace, so an uplink packet crosses access-up then
        bottleneck-up, a downlink packet bottleneck-down then access-down, each once.
        """
        b = self.bottleneck
        if self.site_size == 1:
            self._shape_access_links()
        else:
            self._shape_sites()
        self.bottleneck_up, default = self._shaper(self.bs_netns, f"{self.prefix}bc", b.up, per_class=True)
        bs_address, bottleneck_net = f"{BOTTLENECK_NET}.1", f"{BOTTLENECK_NET}.0/24"
        cloud_end = f"{self.prefix}c"
        for edge, share in zip(self.edges, self._shares):
            leaf = self.bottleneck_up.add_class(edge.name, share, Match(src=edge.address))
            self._impair(leaf, b.up, bs_address, CLOUD_ADDRESS, bottleneck_net, self.cloud_netns, cloud_end)
            self.shares[edge.name] = leaf
            self._record(leaf, f"bottleneck.up[{edge.name}]", self.bs_netns)
        self._impair(default, b.up, bs_address, CLOUD_ADDRESS, bottleneck_net, self.cloud_netns, cloud_end)
        _, self.bottleneck_down = self._shaper(self.cloud_netns, f"{self.prefix}c", b.down)
        self._impair(self.bottleneck_down, b.down, CLOUD_ADDRESS, bs_address, LAB_NET,
                     self.bs_netns, f"{self.prefix}bc")
        self._record(self.bottleneck_down, "bottleneck.down", self.cloud_netns)

    def _shape_access_links(self) -> None:
        """One veth per agent: HTB at its rates on both ends, impairments as in ``_shape``."""
        for edge in self.edges:
            _, up = self._shaper(edge.netns, f"{self.prefix}e{edge.index}", edge.access.up)
            _, down = self._shaper(self.bs_netns, f"{self.prefix}b{edge.index}", edge.access.down)
            gateway = f"10.77.{edge.index + 1}.1"
            edge_end, bs_end = f"{self.prefix}e{edge.index}", f"{self.prefix}b{edge.index}"
            self._impair(up, edge.access.up, edge.address, gateway, LAB_NET, self.bs_netns, bs_end)
            self._impair(down, edge.access.down, gateway, edge.address, f"10.77.{edge.index + 1}.0/24",
                         edge.netns, edge_end)
            self.uplinks[edge.name], self.downlinks[edge.name] = up.shaper, down.shaper
            self._record(up, f"{edge.name}.up", edge.netns, edge.access.mtu)
            self._record(down, f"{edge.name}.down", edge.netns, edge.access.mtu)

    def _shape_sites(self) -> None:
        """Agents share a site's veth: each its own HTB class on either end (its access link).

        The site's root runs at the sum of its agents' rates, so a class never waits for
        another agent's; impairments go under each class, which only netem can do (the TUN
        emulator steers a whole namespace by destination).
        """
        if any(not d.impairment.is_none for e in self.edges for d in (e.access.up, e.access.down)) \
                and getattr(self.impairment, "mechanism", None) != "netem":
            raise NetError("access links of agents that share a site take delay, jitter or loss "
                           "only from netem (the TUN emulator steers a whole namespace); use "
                           "rate-only access profiles or a kernel with sch_netem")
        for k, site in enumerate(self.sites):
            members = [e for e in self.edges if e.site == k]
            up_rate = min(sum(e.access.up.rate_bps for e in members), MAX_RATE_BPS)
            down_rate = min(sum(e.access.down.rate_bps for e in members), MAX_RATE_BPS)
            queue = max(e.access.up.queue_bytes for e in members)
            up = HtbShaper(self._iprs[site], site, up_rate, queue, netns=site, per_class=True,
                           ifindex=self._ifindex[site])
            down = HtbShaper(self._iprs[self.bs_netns], f"{self.prefix}b{k}", down_rate, queue,
                             netns=self.bs_netns, per_class=True,
                             ifindex=self._ifindex[f"{self.prefix}b{k}"])
            up.install()
            down.install()
            for edge in members:
                a = edge.access
                up_leaf = up.add_class(edge.name, a.up.rate_bps, Match(src=edge.address),
                                       ceil_bps=a.up.rate_bps, queue_bytes=a.up.queue_bytes)
                down_leaf = down.add_class(edge.name, a.down.rate_bps, Match(dst=edge.address),
                                           ceil_bps=a.down.rate_bps,
                                           queue_bytes=a.down.queue_bytes)
                for leaf, direction in ((up_leaf, a.up), (down_leaf, a.down)):
                    if not direction.impairment.is_none:
                        self._impaired.append((leaf, leaf.shaper.impair(
                            leaf, direction.impairment, self.impairment)))
                self.uplinks[edge.name], self.downlinks[edge.name] = up, down
                self._record(up_leaf, f"{edge.name}.up", site, a.mtu)
                self._record(down_leaf, f"{edge.name}.down", site, a.mtu)

    def _record(self, leaf: LeafClass, link: str, ns: str, mtu: int = DEFAULT_MTU) -> None:
        self._records.append(leaf.shaper.record(leaf, link, self._cc(ns), self.cc_scope[ns],
                                                self.disable_offloads, mtu))

    def shaping(self) -> list[LinkShaping]:
        """One record per shaped direction, as built (rates as first set)."""
        return list(self._records)

    def set_share(self, edge: str, rate_bps: float, ceil_bps: float | None = None) -> float:
        """The allocator's call: guaranteed bottleneck rate of one agent; returns call seconds."""
        if edge not in self.shares:
            raise NetError(f"no edge {edge!r}; edges are {list(self.shares)}")
        return self.shares[edge].set_rate(rate_bps, ceil_bps)

    def set_shares(self, shares_bps: Mapping[str, float | tuple[float, float]]) -> float:
        """Apply a whole allocation in one netlink batch; returns its seconds.

        ``shares_bps`` maps an edge to its guaranteed rate (ceil: the link rate) or to a
        (rate, ceil) pair.
        """
        pairs = {edge: share if isinstance(share, tuple)
                 else (share, self.bottleneck_up.link_rate_bps)
                 for edge, share in shares_bps.items()}
        total = sum(rate for rate, _ in pairs.values())
        if total > self.bottleneck_up.link_rate_bps:
            raise NetError(f"shares sum to {total:.0f} bit/s, above the bottleneck's "
                           f"{self.bottleneck_up.link_rate_bps} bit/s; scale them down")
        unknown = set(pairs) - set(self.shares)
        if unknown:
            raise NetError(f"no edge {sorted(unknown)[0]!r}; edges are {list(self.shares)}")
        return self.bottleneck_up.set_class_rates(
            [(self.shares[e], rate, ceil) for e, (rate, ceil) in pairs.items()])

    def netns_of(self, node: str) -> str:
        """Namespace of ``'cloud'`` or of an edge by name."""
        return self.cloud_netns if node == "cloud" else self.edge(node).netns

    def address(self, node: str) -> str:
        """IPv4 address of ``'cloud'`` or of an edge by name."""
        return CLOUD_ADDRESS if node == "cloud" else self.edge(node).address

    def socket(self, node: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """An IPv4 socket inside ``node``'s namespace; TCP ones get the node's congestion control."""
        name = self.netns_of(node)
        with in_netns(name):
            sock = socket.socket(socket.AF_INET, kind)
        if kind == socket.SOCK_STREAM:
            pin_congestion_control(sock, self._cc(name))
        return sock

    def teardown(self) -> None:
        """Remove every namespace of this run (their veths, qdiscs and routes go with them)."""
        start = time.perf_counter()
        atexit.unregister(self.teardown)
        errors = []
        # Emulators first: their pump threads and TUN fds live in this process, not in the
        # namespaces, so removing a namespace alone would leave them running.
        while self._impaired:
            leaf, port = self._impaired.pop()
            try:
                leaf.shaper.unimpair(leaf, port, self.impairment)
            except Exception as error:  # keep tearing down; reported below
                errors.append(f"{port.netns}/{port.ifname}: {error}")
        for ipr in self._iprs.values():
            ipr.close()
        self._iprs.clear()
        existing = set(netns.listnetns())
        for name in self.namespaces:
            if name in existing:
                try:
                    netns.remove(name)
                except OSError as error:
                    errors.append(f"{name}: {error}")
        self.teardown_s = time.perf_counter() - start
        if self._ownership is not None:
            self._ownership.release(forget=not errors)
            self._ownership = None
        if errors:
            raise NetError(f"could not remove {errors}; run `python3 -m ray_scout.cli net cleanup "
                           f"--stale`")


def pid_run_id() -> str:
    """A run id unique among concurrent processes on this host (tests use it)."""
    return f"{os.getpid() % 0xFFFFFF:06x}"
