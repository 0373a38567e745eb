"""CloudActor: a data-plane server in the cloud namespace in front of one FIFO compute queue.

What lives here: the transport ``Server`` that accepts framed payloads from every agent at
once, the request queue between it and ``slots`` compute threads (1 = one GPU stream), and
the answer each request gets back: its text, mode, model and the cloud's own queue and
compute times, so agents can split their latency. Work whose deadline passed while it waited
is dropped, not computed (it would only delay the next request). What it leaves to others:
what computing means (``compute.ProfiledCloud`` sleeps a profile's time; full fidelity calls
``core.pipeline.CloudStage``), and the agents' timelines.

Micro-batching: not done. Profiled fidelity has no measured cost of a batch to sleep, and the
pipeline's cloud stage answers one payload at a time; each compute step is one request
(``ray_scout_cloud_batch_size`` is therefore 1) and contention shows as queue time.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from typing import Callable

from ray_scout.transport.server import Request, Server

Service = Callable[[bytes], dict]


class CloudBusy(RuntimeError):
    """A request that the cloud dropped because its deadline passed while it queued."""


@dataclasses.dataclass
class _Job:
    body: bytes
    arrived_unix_s: float
    deadline_unix_s: float | None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    answer: dict | None = None
    error: BaseException | None = None


def profiled_service(timings: dict) -> Service:
    """Sleep the cloud model's profiled time for the request's mode and sizes."""
    from ray_scout.actors.compute import ProfiledCloud, ProfiledRequest

    cloud = ProfiledCloud(timings)

    def serve(body: bytes) -> dict:
        request = ProfiledRequest.from_body(body)
        seconds = cloud.service_s(request)
        time.sleep(seconds)
        return {"text": "", "mode": request.mode.value, "model_id": request.cloud_model,
                "prefill_s": 0.0, "decode_s": seconds}

    return serve


class FullService:
    """Full fidelity: the pipeline's ``CloudStage`` over real models, loaded in the actor.

    ``sources`` maps a model id as payloads name it to a ``load_model`` source;
    ``documents`` are the contexts the cloud already holds (scout payloads name them by hash).
    """

    def __init__(self, sources: dict[str, str], documents: list[str], max_new_tokens: int):
        self.sources = dict(sources)
        self.documents = list(documents)
        self.max_new_tokens = max_new_tokens
        self.stage = None

    def prepare(self) -> None:
        from ray_scout.core.models import load_model
        from ray_scout.core.pipeline import CloudStage
        from ray_scout.core.scout import DocumentStore

        store = DocumentStore()
        for text in self.documents:
            store.put(text)
        models = {}
        for model_id, source in self.sources.items():
            lm = load_model(source)
            models[model_id] = models[lm.model_id] = lm
        self.stage = CloudStage(models, documents=store, max_new_tokens=self.max_new_tokens)

    def __call__(self, body: bytes) -> dict:
        answer = self.stage.answer(body)
        return {"text": answer.text, "mode": answer.mode.value, "model_id": answer.model_id,
                "prefill_s": answer.prefill_s, "decode_s": answer.decode_s}


class CloudActor:
    """Serves on ``address`` inside ``netns``; ``stats()`` and ``close()`` for the driver."""

    def __init__(self, name: str, address: tuple[str, int], netns: str | None,
                 service: Service, *, slots: int = 1, connections: int = 64):
        from ray_scout.actors.metrics import CloudMetrics

        self.name = name
        self.service = service
        prepare = getattr(service, "prepare", None)
        if prepare is not None:  # full fidelity: load the models before serving anyone
            prepare()
        self.metrics = CloudMetrics(name)
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.served = 0
        self.dropped = 0
        self.threads = [threading.Thread(target=self._compute_loop, name=f"cloud-compute-{i}",
                                         daemon=True) for i in range(slots)]
        for thread in self.threads:
            thread.start()
        # One server worker per connection: a request must reach the queue at once, or it
        # would wait in the transport's pool, where no one measures it.
        self.server = Server(self._handle, host=address[0], port=address[1], netns=netns,
                             workers=connections)

    def ready(self) -> tuple[str, int]:
        return self.server.address

    def _handle(self, request: Request) -> bytes:
        job = _Job(bytes(request.body), request.last_byte_unix_s, request.deadline_unix_s)
        self.jobs.put(job)
        self.metrics.depth(self.jobs.qsize())
        job.done.wait()
        if job.error is not None:
            raise job.error
        return json.dumps(job.answer).encode()

    def _compute_loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            start = time.time()
            self.metrics.depth(self.jobs.qsize())
            if job.deadline_unix_s is not None and start >= job.deadline_unix_s:
                self.dropped += 1
                job.error = CloudBusy(f"deadline passed after {start - job.arrived_unix_s:.3f} s "
                                      "in the cloud queue; dropped unserved")
                job.done.set()
                continue
            try:
                answer = self.service(job.body)
            except Exception as exc:  # the agent gets it as a HANDLER error with this text
                job.error = exc
            else:
                end = time.time()
                answer.update(cloud=self.name, cloud_queue_s=start - job.arrived_unix_s,
                              cloud_compute_s=end - start, batch_size=1)
                job.answer = answer
                self.served += 1
                self.metrics.served(1, [start - job.arrived_unix_s], end - start)
            job.done.set()

    def stats(self) -> dict:
        s = self.server.stats()
        return {"served": self.served, "dropped": self.dropped, "queued": self.jobs.qsize(),
                **{f"server_{k}": v for k, v in dataclasses.asdict(s).items()}}

    def close(self) -> None:
        self.server.close()
        for _ in self.threads:
            self.jobs.put(None)
