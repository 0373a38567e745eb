"""The pure core: everything that decides or computes, nothing that needs Ray or root.

Models and their KV facts, KV codecs and the wire format, position selection and scout,
tasks and metrics, the adaptive policy and the allocators live here as plain functions and
small classes. Links, sockets and actors are left to ``net``, ``transport`` and ``actors``.
"""
