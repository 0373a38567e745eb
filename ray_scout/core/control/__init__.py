"""The decision side: which mode a request takes and how a shared bottleneck is split.

The adaptive policy picks a mode from a bandwidth estimate, a deadline and the quality and
latency profiles; estimators turn observed transfers into that estimate; queueing says how
likely a request is to meet its deadline behind its agent's own queue; allocators split
capacity among agents with it; capacity traces say how a link moves. Numbers in, decisions
out: no torch, no models, no sockets, so the simulator and the testbed run the very same
objects.
"""
