"""CloudActor: a data-plane server in the cloud namespace in front of one FIFO compute queue.

What lives here: the transport ``Server`` that accepts framed payloads from every agent at
once, the request queue between it and ``slots`` compute threads (1 = one GPU stream), and
the answer each request gets back: its text, mode, model and the cloud's own queue and
compute times, so agents can split their latency. Work whose deadline passed while it waited
is dropped, not computed (it would only delay the next request). What it leaves to others:
what computing means (a service of ``core.stages``: ``profiled.ProfiledService`` sleeps a
profile's time, ``full.FullService`` runs ``CloudStage`` on real models), and the agents'
timelines.

Micro-batching: each compute thread takes the first waiting request, then collects more
until it holds ``max_batch`` or ``batch_window_s`` has passed since it took the first, and
computes them as one batch (``max_batch`` 1, the default, is one request at a time). A
service with a ``batch_key(body)`` (the profiled one: the request's cloud model) gets batches
of one key only: a GPU runs one model's batch at a time, and a batch that mixed the three
models of a cell would take their three times in a row; the others stay queued, in order,
for the next free slot. Every
member reports the batch's size, its own queue time (arrival to the batch's start, so the
window's wait counts as queueing) and the batch's compute time as its own: a request in a
batch is not done before the batch is. Full fidelity batches for real
(``CloudStage.answer_batch``); profiled fidelity sleeps ``ProfiledCloud.batch_service_s``,
a documented model of a batch's cost, not a measurement.
"""

from __future__ import annotations

import collections
import dataclasses
from concurrent.futures import Future
import json
import threading
import time
from typing import Callable, Hashable, Sequence

from ray_scout.transport.server import Request, Server

# A service answers a batch of request bodies: slot i holds body i's answer or its error.
Service = Callable[[list[bytes]], list]


class CloudBusy(RuntimeError):
    """A request that the cloud dropped because its deadline passed while it queued."""


@dataclasses.dataclass
class _Job:
    body: bytes | bytearray
    arrived_unix_s: float
    deadline_unix_s: float | None
    # The answer's bytes or the error, set by the compute thread, which the transport then
    # sends from that thread (no handler thread waits per request).
    reply: Future = dataclasses.field(default_factory=Future)
    key: Hashable = None  # what the service batches by (its ``batch_key``), if anything


class _Jobs:
    """The cloud's FIFO: a compute thread takes the oldest job, then collects others of its
    key (any job, where the service has no key) until its window ends.

    Two conditions on one lock so that a job wakes one idle thread, not all of them: with
    tens of slots, waking every thread per arrival would cost the box more than the work.
    """

    def __init__(self, by_key: bool):
        self.by_key = by_key
        self._jobs: collections.deque[_Job] = collections.deque()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._collecting = threading.Condition(self._lock)
        self._closed = False

    def put(self, job: _Job) -> None:
        with self._lock:
            self._jobs.append(job)
            self._idle.notify()
            self._collecting.notify_all()

    def qsize(self) -> int:
        return len(self._jobs)

    def first(self) -> _Job | None:
        """The oldest job, waiting for one; None once closed and empty."""
        with self._lock:
            while not self._jobs and not self._closed:
                self._idle.wait()
            return self._jobs.popleft() if self._jobs else None

    def take(self, key: Hashable, until_monotonic: float) -> _Job | None:
        """The oldest job of ``key``, waiting for one until ``until_monotonic``."""
        with self._lock:
            while True:
                for i, job in enumerate(self._jobs):
                    if not self.by_key or job.key == key:
                        del self._jobs[i]
                        return job
                left = until_monotonic - time.monotonic()
                if left <= 0 or self._closed:
                    return None
                self._collecting.wait(left)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._idle.notify_all()
            self._collecting.notify_all()


class CloudActor:
    """Serves on ``addresses`` inside ``netns``; ``stats()`` and ``close()`` for the driver.

    Every address feeds the same queue. A lab node tells its agents apart on its real
    interface by the cloud port each one sends to, so on a cluster each agent gets its own.
    """

    def __init__(self, name: str, addresses: Sequence[tuple[str, int]], netns: str | None,
                 service: Service, *, slots: int = 1, connections: int = 64,
                 max_batch: int = 1, batch_window_s: float = 0.0, token: bytes | None = None):
        from ray_scout.actors.metrics import CloudMetrics

        if max_batch < 1 or batch_window_s < 0:
            raise ValueError(f"max_batch must be >= 1 and batch_window_s >= 0, got "
                             f"{max_batch} and {batch_window_s}")
        self.name = name
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.service = service
        prepare = getattr(service, "prepare", None)
        if prepare is not None:  # full fidelity: load the models before serving anyone
            prepare()
        self.metrics = CloudMetrics(name)
        self.batch_key = getattr(service, "batch_key", None)
        self.jobs = _Jobs(by_key=self.batch_key is not None)
        self.served = 0
        self.dropped = 0
        self.last_batch = 0
        self.threads = [threading.Thread(target=self._compute_loop, name=f"cloud-compute-{i}",
                                         daemon=True) for i in range(slots)]
        for thread in self.threads:
            thread.start()
        # One server worker per connection: a request must reach the queue at once, or it
        # would wait in the transport's pool, where no one measures it. The worker hands the
        # job over and is free; the compute thread sends the answer (``_Job.reply``).
        if not addresses:
            raise ValueError("CloudActor needs at least one address to serve on")
        self.servers: list[Server] = []
        try:
            for host, port in addresses:
                # Every agent of an edge node shares its address: the per-peer cap is the
                # agents' count, not the transport's default.
                self.servers.append(Server(self._handle, host=host, port=port, netns=netns,
                                           workers=connections, token=token,
                                           max_connections=max(256, 2 * connections),
                                           max_connections_per_peer=connections,
                                           # every agent connects as its trial starts
                                           backlog=max(128, connections)))
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        """The cloud in a few words (Ray's Actors table shows it as the actor starts)."""
        return (f"{self.name}: queue {self.jobs.qsize()}, batch {self.last_batch}/"
                f"{self.max_batch}, served {self.served}, dropped {self.dropped}")

    def ready(self) -> list[tuple[str, int]]:
        """The bound addresses, in the order given (port 0 resolved)."""
        return [server.address for server in self.servers]

    def _handle(self, request: Request) -> Future:
        # The transport made this buffer for this frame alone: no copy (a copy of a KV
        # payload holds the GIL for milliseconds, which every other connection would wait).
        body = request.body
        job = _Job(body, request.last_byte_unix_s, request.deadline_unix_s,
                   key=self.batch_key(body) if self.batch_key is not None else None)
        self.jobs.put(job)
        self.metrics.depth(self.jobs.qsize())
        return job.reply

    def _collect(self) -> tuple[list[_Job], bool]:
        """The next batch (blocking for its first job) and whether close() was asked."""
        first = self.jobs.first()
        if first is None:
            return [], True
        batch = [first]
        window_end = time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch:
            job = self.jobs.take(first.key, window_end)
            if job is None:
                break
            batch.append(job)
        return batch, False

    def _compute_loop(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._collect()
            if not batch:
                return
            start = time.time()
            self.metrics.depth(self.jobs.qsize())
            live = []
            for job in batch:
                if job.deadline_unix_s is not None and start >= job.deadline_unix_s:
                    self.dropped += 1
                    job.reply.set_exception(CloudBusy(
                        f"deadline passed after {start - job.arrived_unix_s:.3f} s in the cloud "
                        "queue; dropped unserved"))
                else:
                    live.append(job)
            if not live:
                continue
            try:
                answers = self.service([job.body for job in live])
            except Exception as exc:  # the batch failed as a whole: every member gets it
                answers = [exc] * len(live)
            end = time.time()
            self.last_batch = len(live)
            queued = [start - job.arrived_unix_s for job in live]
            for job, answer, queue_s in zip(live, answers, queued):
                if isinstance(answer, Exception):  # the agent gets it as a HANDLER error
                    job.reply.set_exception(answer)
                else:
                    answer.update(cloud=self.name, cloud_queue_s=queue_s,
                                  cloud_compute_s=end - start, batch_size=len(live))
                    self.served += 1
                    job.reply.set_result(json.dumps(answer).encode())
            self.metrics.served(len(live), queued, end - start)

    def stats(self) -> dict:
        counts = [dataclasses.asdict(server.stats()) for server in self.servers]
        return {"served": self.served, "dropped": self.dropped, "queued": self.jobs.qsize(),
                **{f"server_{k}": sum(c[k] for c in counts) for k in counts[0]}}

    def close(self) -> None:
        for server in self.servers:
            server.close()
        self.jobs.close()
