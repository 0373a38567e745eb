"""The pure core: everything that computes or decides, nothing that needs Ray or root.

Four rooms, imports pointing one way (``stages`` may use ``llm`` and ``control``,
``evaluation`` those and ``stages``; ``llm`` and ``control`` use neither each other nor the
rooms above them; ``net`` and ``transport`` use none of core; tests/test_layout.py holds it):

- ``llm``: the language-model trade: models, prefill and decoding, KV snapshots, codecs and
  the wire format, prompt layout, position selection (Q2C and baselines), scout payloads.
- ``control``: the decision trade: the adaptive policy, bandwidth estimators, allocators,
  capacity traces. Plain numbers in, a mode or a split out; no torch.
- ``stages``: one request at each end: what the edge does with a request and what the cloud
  does with a payload, in full fidelity (real models) and profiled fidelity (measured times).
- ``evaluation``: tasks, answer metrics and the quality harness that scores the modes.

``modes`` is the vocabulary all four share: the transport modes.
"""
