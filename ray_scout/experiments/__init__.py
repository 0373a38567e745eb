"""Experiments: a YAML spec in, tidy results (one row per request, one per epoch) out.

One spec runs at three fidelities: ``full`` and ``profiled`` drive the Ray testbed over
shaped links; ``simulated`` (``simulate.simulate``) models network and compute in a
discrete-event loop that calls the very same policy, estimator and allocator objects, so
the two can be compared on one spec. Plots and summaries read the tidy tables only.
"""
