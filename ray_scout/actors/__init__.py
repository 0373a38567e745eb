"""Ray actors of the testbed: thin shells over core, net and transport.

``EdgeAgent`` runs a workload and the policy and sends payloads over the data plane;
``CloudActor`` serves them behind a request queue; ``Allocator`` splits the bottleneck each
epoch; ``LinkManager`` owns the shaped links (the only actor that needs root); ``Recorder``
takes every finished row as it completes. What the compute of a request is lives in
``core.stages`` (no Ray there); what runs them is ``ray_scout.experiments.runner``.
"""
