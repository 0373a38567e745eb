"""Links shaped by the kernel, and the userspace impairment path where the kernel lacks netem.

Namespaces, veth pairs and qdiscs are driven through pyroute2 objects (never tc strings);
``emulator`` holds and drops real IP packets through a TUN device when ``sch_netem`` is
missing. Deciding which rate or profile a link gets is left to ``core`` and ``actors``.
"""
