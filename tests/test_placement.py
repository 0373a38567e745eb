"""Where a trial's actors go: the lab-in-a-box on one machine, or a cluster's edge nodes."""

from __future__ import annotations

import pytest

from ray_scout.experiments.placement import Node, alive_nodes, place
from ray_scout.experiments.spec import SpecError


def _row(node_id, address, alive=True, **resources):
    return {"NodeID": node_id, "NodeManagerAddress": address, "Alive": alive,
            "Resources": {"CPU": 2.0, **resources}}


def test_a_local_ray_with_cloud_and_edge_on_one_node_runs_the_lab_in_a_box():
    nodes = alive_nodes([_row("n0", "127.0.0.1", cloud=1, edge=4)])
    assert not place(["e0", "e1"], nodes, 7300).cluster


def test_edge_slots_on_the_cloud_node_do_not_count_on_a_cluster():
    nodes = alive_nodes([_row("h", "10.0.0.1", cloud=1, edge=8), _row("w", "10.0.0.2", edge=1)])
    with pytest.raises(SpecError, match="1 `edge` slots for 2 agents"):
        place(["e0", "e1"], nodes, 7300)


def test_agents_spread_round_robin_over_edge_nodes_and_get_ports_in_order():
    nodes = alive_nodes([_row("w2", "10.0.0.3", edge=4), _row("h", "10.0.0.1", cloud=1),
                         _row("w1", "10.0.0.2", edge=1), _row("dead", "10.0.0.4", False, edge=9)])
    where = place(["a", "b", "c"], nodes, 7300)
    assert where.cluster and where.cloud.address == "10.0.0.1"
    assert {a: n.address for a, n in where.agent_node.items()} == {
        "a": "10.0.0.2", "b": "10.0.0.3", "c": "10.0.0.3"}
    assert dict(where.cloud_port) == {"a": 7300, "b": 7301, "c": 7302}
    assert [n.node_id for n in where.nodes()] == ["w1", "w2"]
    assert where.agents_on(where.nodes()[1]) == ["b", "c"]
    assert where.describe() == {"mode": "cluster", "cloud": "10.0.0.1",
                                "agents": {"a": "10.0.0.2", "b": "10.0.0.3", "c": "10.0.0.3"},
                                "cloud_ports": {"a": 7300, "b": 7301, "c": 7302}}


def test_a_cluster_without_a_cloud_node_says_how_to_mark_one():
    with pytest.raises(SpecError, match="--resources='{\"cloud\": 1}'"):
        place(["a"], [Node("w", "10.0.0.2", 0, 4)], 7300)
