"""Where a trial's actors go: the lab-in-a-box on one machine, or a cluster's edge nodes."""

from __future__ import annotations

import pytest

from ray_scout.experiments.placement import Lane, Node, alive_nodes, lanes, place
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


# --- a sweep's emulated points over the edge nodes: one lab per node at a time ----------
def _three_edge_nodes():
    return alive_nodes([_row("h", "10.0.0.1", cloud=1), _row("w1", "10.0.0.2", edge=4),
                        _row("w2", "10.0.0.3", edge=2), _row("w3", "10.0.0.4", edge=4)])


def test_points_take_turns_over_the_edge_nodes_that_hold_all_their_agents():
    nodes = _three_edge_nodes()
    w1, w2, w3 = nodes[1:]
    spread, alone = lanes([2, 2, 2, 2, 4, 3, 6], nodes, 7300)
    # Fewest points first among the nodes with room (ties: node order); 4 and 3 agents do
    # not fit w2's 2 slots, 6 fit no node and run alone over the whole cluster.
    assert spread == [Lane(w1, 7300, (0, 3, 5)), Lane(w2, 7304, (1,)), Lane(w3, 7306, (2, 4))]
    assert alone == [6]


def test_a_lanes_points_are_placed_on_its_node_alone_with_ports_no_other_lane_uses():
    nodes = _three_edge_nodes()
    cloud = nodes[0]
    spread, _ = lanes([4, 2, 4], nodes, 7300)
    ports = []
    for lane, agents in zip(spread, (["a", "b", "c", "d"], ["e", "f"], ["g", "h", "i", "j"])):
        where = place(agents, [cloud, lane.node], lane.first_port)
        assert where.cluster and where.cloud == cloud and where.nodes() == [lane.node]
        ports += where.cloud_port.values()
    assert sorted(ports) == list(range(7300, 7310))


def test_a_lab_in_a_box_or_a_cluster_without_a_cloud_node_spreads_nothing():
    local = alive_nodes([_row("n0", "127.0.0.1", cloud=1, edge=4)])
    assert lanes([2, 2], local, 7300) == ([], [0, 1])
    assert lanes([1], [Node("w", "10.0.0.2", 0, 4)], 7300) == ([], [0])
