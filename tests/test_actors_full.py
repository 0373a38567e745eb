"""Full fidelity without Ray or namespaces: an EdgeAgent and a CloudActor over loopback TCP
run the real pipeline on the embedded model and score the answer."""

from __future__ import annotations

import string
import time

import pytest

pytestmark = pytest.mark.model


def squad_f1(prediction: str, gold: str) -> float:
    """SQuAD's token F1, written out here (lowercase, no punctuation or articles) so the
    agent's score is checked against an implementation that is not the one it uses."""
    def tokens(text):
        kept = "".join(ch for ch in text.lower() if ch not in string.punctuation)
        return [w for w in kept.split() if w not in ("a", "an", "the")]

    p, g = tokens(prediction), tokens(gold)
    common = sum(min(p.count(w), g.count(w)) for w in set(p))
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


class _Recorder:
    class _Add:
        def __init__(self):
            self.rows = []

        def remote(self, table, row):
            self.rows.append((table, row))

    def __init__(self):
        self.add = self._Add()


def test_an_agent_sends_real_payloads_and_the_cloud_answers_them(embedded_model):
    from ray_scout.actors.cloud import CloudActor
    from ray_scout.core.stages.full import FullService
    from ray_scout.actors.edge import AgentConfig, EdgeAgent
    from ray_scout.experiments.runner import request_shapes, samples, workloads
    from ray_scout.experiments.spec import parse_spec, quality_profile

    spec = parse_spec({
        "name": "full", "fidelity": "full", "duration_s": 30, "seed": 0,
        "capacity": {"kind": "constant", "rate": "50mbit"},
        "cloud": {"models": {"embedded": {"timing": "paper_b"}}},
        "agents": [{"name": "e", "count": 1, "model": "embedded", "context_tokens": [128],
                    "deadline_s": 60, "arrival_rate_hz": 0.2, "quality": "paper_b:3b-7b"}],
        "policies": ["static:int8"], "allocators": ["equal"]})
    shapes, work = request_shapes(spec), workloads(spec)
    texts = samples(spec, work)
    arrival = work["e0"][0]
    cloud = CloudActor("c", [("127.0.0.1", 0)], None,
                       FullService({"embedded": "embedded"}, [texts["e0"][0][0]], 24))
    try:
        for policy in ("static:int8", "static:scout"):
            cfg = AgentConfig(
                name="e0", netns=None, cloud_address=cloud.ready()[0], policy=policy,
                allocator="equal", quality=quality_profile(spec, spec.agents[0]),
                shapes=shapes["e"], cloud_model="embedded", deadline_s=60,
                arrivals=(arrival,), initial_bps=50e6, model="embedded",
                edge_options=dict(scout_retention=0.5, protected_layers=(0,)),
                samples=texts["e0"])
            row = EdgeAgent(cfg, _Recorder()).serve(arrival, time.time() - arrival.t_s)
            assert row["outcome"] == "hit", row["error"]
            assert row["mode"] == policy.split(":")[1]
            gold = texts["e0"][0][2]
            # The row's F1 is SQuAD's for the answer the cloud sent back (best over the gold
            # answers), computed here independently; full fidelity's quality is that F1.
            assert row["answer"]
            assert row["f1"] == pytest.approx(max(squad_f1(row["answer"], g) for g in gold))
            assert row["quality"] == row["f1"]
            assert row["prefill_s"] > 0 and row["cloud_s"] > 0 and row["tx_s"] > 0
        assert cloud.stats()["served"] == 2
    finally:
        cloud.close()
