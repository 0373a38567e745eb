"""Where a trial's actors run: one machine's lab-in-a-box, or a cluster's real links.

What lives here: reading the Ray cluster's node table (``ray.nodes()``) and deciding, as a
pure function, whether the experiment runs on one machine (every agent in its own namespace
behind an emulated bottleneck: a local Ray, or a cluster whose only ``edge`` slots are on the
cloud node) or across lab nodes (the cloud actor on the node with the ``cloud`` resource, agents
spread over the other nodes' ``edge`` slots, each node shaping its real interface toward the
cloud node); and, on a cluster, which cloud port each agent sends to (its traffic class on its
node). On a cluster, a sweep's emulated points go one lab per edge node at a time, each
point's agents on one node (``lanes``). What it leaves to others: starting actors there (the
runner, the sweep), shaping (link managers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ray_scout.experiments.spec import SpecError


@dataclass(frozen=True)
class Node:
    """One alive Ray node: its id, address and custom resources."""

    node_id: str
    address: str
    cloud: float
    edge: float


@dataclass(frozen=True)
class Placement:
    """``cluster`` False: the lab-in-a-box on one machine (the rest is empty)."""

    cluster: bool
    cloud: Node | None = None
    agent_node: Mapping[str, Node] = field(default_factory=dict)
    cloud_port: Mapping[str, int] = field(default_factory=dict)

    def nodes(self) -> list[Node]:
        """The edge nodes that hold agents, in first-agent order."""
        return list(dict.fromkeys(self.agent_node.values()))

    def agents_on(self, node: Node) -> list[str]:
        return [a for a, n in self.agent_node.items() if n == node]

    def describe(self) -> dict:
        if not self.cluster:
            return {"mode": "lab-in-a-box"}
        return {"mode": "cluster", "cloud": self.cloud.address,
                "agents": {a: n.address for a, n in self.agent_node.items()},
                "cloud_ports": dict(self.cloud_port)}


def alive_nodes(ray_nodes: Sequence[Mapping]) -> list[Node]:
    """``ray.nodes()`` rows as ``Node``s: alive ones only, ordered by address then id."""
    nodes = [Node(row["NodeID"], row["NodeManagerAddress"],
                  float(row.get("Resources", {}).get("cloud", 0)),
                  float(row.get("Resources", {}).get("edge", 0)))
             for row in ray_nodes if row.get("Alive")]
    return sorted(nodes, key=lambda n: (n.address, n.node_id))


def edge_hosts(agents: Sequence[str], cores: int, one_per_agent: bool) -> list[list[str]]:
    """Agents of one node split into at most ``cores`` edge hosts (worker processes).

    Profiled agents sleep and wait on sockets, so hundreds share a process; full-fidelity
    agents each run a model, which must not be shared between threads, so each gets its own.
    Hosts take contiguous runs of agents, as even as the count allows.
    """
    if one_per_agent:
        return [[a] for a in agents]
    count = max(1, min(cores, len(agents)))
    size, extra = divmod(len(agents), count)
    hosts, start = [], 0
    for k in range(count):
        end = start + size + (k < extra)
        hosts.append(list(agents[start:end]))
        start = end
    return [h for h in hosts if h]


def place(agents: Sequence[str], nodes: Sequence[Node], first_port: int) -> Placement:
    """Put ``agents`` on ``nodes``; raise ``SpecError`` with the fix when they do not fit.

    Agents go round-robin over the edge nodes (not the cloud node's own slots: a node cannot
    shape a link to itself), each node taking at most its ``edge`` slots, so N agents on M
    equal nodes spread N/M each. Agent ``i`` sends to cloud port ``first_port + i``.
    """
    clouds = [n for n in nodes if n.cloud > 0]
    if not clouds:
        raise SpecError("no node of the cluster has the `cloud` resource; start the GPU node with "
                        "ray start --resources='{\"cloud\": 1}' (clusters/lab.yaml does)")
    cloud = clouds[0]
    edges = [n for n in nodes if n.edge > 0 and n.address != cloud.address]
    if not edges:
        return Placement(cluster=False)
    slots = {n: int(n.edge) for n in edges}
    if sum(slots.values()) < len(agents):
        raise SpecError(f"the cluster's edge nodes have {sum(slots.values())} `edge` slots for "
                        f"{len(agents)} agents; raise --resources='{{\"edge\": N}}' on the workers "
                        "or add edge nodes")
    placed: dict[str, Node] = {}
    queue = list(agents)
    while queue:
        for node in edges:
            if queue and slots[node] > 0:
                placed[queue.pop(0)] = node
                slots[node] -= 1
    ports = {agent: first_port + i for i, agent in enumerate(agents)}
    return Placement(True, cloud, placed, ports)


@dataclass(frozen=True)
class Lane:
    """One edge node's share of a sweep: the points it runs one after another (indices into
    the caller's list), its agents' cloud ports counting from ``first_port``."""

    node: Node
    first_port: int
    points: tuple[int, ...]


def lanes(agent_counts: Sequence[int], nodes: Sequence[Node],
          first_port: int) -> tuple[list[Lane], list[int]]:
    """Spread a sweep's points (given by their agent counts) over a cluster's edge nodes, one
    lab per node at a time; returns the lanes and the points that fit on no single node.

    Each point goes to the edge node with the fewest points so far among those whose ``edge``
    slots hold all its agents (ties: node order), so M equal nodes take turns. Node ``k``'s
    cloud ports start after the slots of the nodes before it: points running at once on
    different nodes never share a port of the cloud node. A point that fits on no single
    node, and every point on a machine without edge nodes of its own (the lab-in-a-box) or
    without a cloud node, is left for the caller to run alone over the whole cluster.
    """
    clouds = [n for n in nodes if n.cloud > 0]
    edges = [n for n in nodes if clouds and n.edge > 0 and n.address != clouds[0].address]
    assigned: dict[Node, list[int]] = {n: [] for n in edges}
    alone = []
    for index, count in enumerate(agent_counts):
        fitting = [n for n in edges if int(n.edge) >= count]
        if not fitting:
            alone.append(index)
            continue
        assigned[min(fitting, key=lambda n: len(assigned[n]))].append(index)
    out, port = [], first_port
    for node in edges:
        if assigned[node]:
            out.append(Lane(node, port, tuple(assigned[node])))
        port += int(node.edge)
    return out, alone
