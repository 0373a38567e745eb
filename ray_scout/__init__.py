"""ray-scout: a Ray testbed for bandwidth-adaptive KV-cache transport at the edge.

Layers, imports pointing downward only:
- ``core``: pure functions and small classes, no Ray and no root, in four rooms: ``llm``
  (models, KV codecs and the wire format, selection, scout), ``control`` (policy, estimators,
  allocation), ``stages`` (one request at each end) and ``evaluation`` (tasks, metrics,
  the quality harness).
- ``net``: links shaped by the kernel (pyroute2) and the userspace impairment path.
- ``transport``: framed TCP messages between edge agents and the cloud.
- ``actors``: thin Ray shells over the three layers above.
- ``experiments``: YAML spec in, tidy results, tables and plots out.
"""

__version__ = "0.1.0"
