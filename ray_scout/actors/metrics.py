"""Ray custom metrics of the testbed: stable names that the dashboards read.

What lives here: the metric names (``ray_scout_*``; Ray's Prometheus exporter adds its own
``ray_`` prefix), their tags, and two small emitters the actors call once per request or per
batch. What it leaves to others: when to emit (the actors) and plotting (dashboards).
Names and tags are part of the interface: docs/TESTBED.md lists them; change them only there
and in the dashboards together.
"""

from __future__ import annotations

import functools

from ray.util import metrics

from ray_scout.core.modes import Mode

MODE_CODES = {m: i for i, m in enumerate(Mode)}  # gauge value of ray_scout_agent_mode
LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32]


class _AgentSeries:
    """The agent metrics of one process, made once: an edge host's agents share them."""

    def __init__(self):
        keys = ("agent", "policy", "allocator")
        self.mode = metrics.Gauge("ray_scout_agent_mode", "mode of the latest request "
                                  "(0 bf16, 1 int8, 2 int4, 3 mixed_int4, 4 scout, 5 local)",
                                  tag_keys=keys)
        self.granted = metrics.Gauge("ray_scout_agent_granted_rate_bps",
                                     "rate the allocator granted, bit/s", tag_keys=keys)
        self.estimated = metrics.Gauge("ray_scout_agent_estimated_rate_bps",
                                       "rate the agent's estimator planned with, bit/s",
                                       tag_keys=keys)
        self.measured = metrics.Gauge("ray_scout_agent_measured_rate_bps",
                                      "throughput of the latest transfer, bit/s", tag_keys=keys)
        self.bytes_sent = metrics.Counter("ray_scout_agent_payload_bytes_total",
                                          "payload bytes sent", tag_keys=keys + ("mode",))
        self.requests = metrics.Counter("ray_scout_agent_requests_total",
                                        "finished requests by outcome (hit, miss, error)",
                                        tag_keys=keys + ("mode", "outcome"))
        self.latency = metrics.Histogram("ray_scout_agent_latency_seconds",
                                         "end-to-end latency of answered requests",
                                         boundaries=LATENCY_BOUNDARIES_S,
                                         tag_keys=keys + ("mode",))
        self.quality = metrics.Gauge("ray_scout_agent_quality",
                                     "quality of the latest request (0 on a miss)",
                                     tag_keys=keys)


@functools.lru_cache(maxsize=1)
def _agent_series() -> _AgentSeries:
    return _AgentSeries()


class AgentMetrics:
    """Per-agent series, tagged ``agent`` (and ``mode`` / ``outcome`` where they vary)."""

    def __init__(self, agent: str, policy: str, allocator: str):
        self.tags = {"agent": agent, "policy": policy, "allocator": allocator}
        series = _agent_series()
        self.mode, self.granted, self.estimated = series.mode, series.granted, series.estimated
        self.measured, self.bytes_sent = series.measured, series.bytes_sent
        self.requests, self.latency, self.quality = (series.requests, series.latency,
                                                     series.quality)

    def grant(self, rate_bps: float) -> None:
        self.granted.set(rate_bps, tags=self.tags)

    def request(self, mode: Mode, outcome: str, payload_bytes: int, latency_s: float,
                quality: float, estimate_bps: float, measured_bps: float | None) -> None:
        tagged = {**self.tags, "mode": mode.value}
        self.mode.set(MODE_CODES[mode], tags=self.tags)
        self.estimated.set(estimate_bps, tags=self.tags)
        if measured_bps is not None:
            self.measured.set(measured_bps, tags=self.tags)
        if payload_bytes:
            self.bytes_sent.inc(payload_bytes, tags=tagged)
        self.requests.inc(1, tags={**tagged, "outcome": outcome})
        if outcome != "error" and latency_s == latency_s:
            self.latency.observe(latency_s, tags=tagged)
        if quality == quality:
            self.quality.set(quality, tags=self.tags)


class CloudMetrics:
    """Per-cloud series, tagged ``cloud``."""

    def __init__(self, cloud: str):
        self.tags = {"cloud": cloud}
        self.queue_depth = metrics.Gauge("ray_scout_cloud_queue_depth",
                                         "requests waiting for the cloud's compute",
                                         tag_keys=("cloud",))
        self.batch_size = metrics.Histogram("ray_scout_cloud_batch_size",
                                            "requests served per compute step",
                                            boundaries=BATCH_BOUNDARIES, tag_keys=("cloud",))
        self.queue_s = metrics.Histogram("ray_scout_cloud_queue_seconds",
                                         "time a request waited for compute",
                                         boundaries=LATENCY_BOUNDARIES_S, tag_keys=("cloud",))
        self.compute_s = metrics.Histogram("ray_scout_cloud_compute_seconds",
                                           "compute time of one batch",
                                           boundaries=LATENCY_BOUNDARIES_S, tag_keys=("cloud",))

    def depth(self, n: int) -> None:
        self.queue_depth.set(n, tags=self.tags)

    def served(self, batch: int, queue_s: list[float], compute_s: float) -> None:
        self.batch_size.observe(batch, tags=self.tags)
        for q in queue_s:
            self.queue_s.observe(q, tags=self.tags)
        self.compute_s.observe(compute_s, tags=self.tags)
