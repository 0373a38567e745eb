"""The language-model side: what a model computes and what its KV cache looks like in bytes.

Models load and state their KV facts; generation prefills (fused on a GPU) and decodes, and
latency profiles say how long that takes; selection scores context positions; codecs and the
wire format turn a KV snapshot into checked bytes and back (the bottleneck diagnosis picks
the layers mixed INT4 keeps in 16 bits); scout turns a selection into a few hundred bytes of
indices. It knows tensors and bytes, not deadlines or links: when a mode is worth sending is
``control``'s call, who sends it is the actors'.
"""
