"""An actor by its name: what actors with restarts get instead of another actor's handle.

Ray keeps a handle passed to an actor's constructor in its object store, where it may be
gone by the time the actor restarts (ray-project/ray#53727, and a core_worker error line in
the run's log per such actor); a name is plain data. What it leaves to others: naming the
actors (``experiments.runner``: ``<spec>/<who>``).
"""

from __future__ import annotations


class ActorByName:
    """A named actor, looked up where it is used (picklable, holds no handle); its methods
    are the actor's own (``ref.add.remote(...)``)."""

    def __init__(self, name: str):
        self.name = name
        self._handle = None

    def __getstate__(self) -> dict:
        return {"name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["name"])

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        if self._handle is None:
            import ray

            self._handle = ray.get_actor(self.name)
        return getattr(self._handle, method)
