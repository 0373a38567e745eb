"""Links: the kernel-shaped paths that real TCP connections of the testbed travel.

What lives here: a side-effect-free capability probe (``probe``), link profiles read from
``netem/*.yaml`` (``profiles``), HTB shaping with per-destination/per-agent classes, u32
filters and live rate changes on one interface (``shaping``), the lab-in-a-box namespace
topology (``topology``), capacity-trace replay onto a class (``replay``), removal of
anything the project left behind (``cleanup``), whether a run that made namespaces is
alive (``owner``: a lock held by the process that built them), the one way to enter and
build namespaces (``namespaces``), and the impairment backends for kernels without netem
with the choice among them (``backends``: the TUN emulator of ``emulator``, the eBPF loss of
``emulator_bpf``).

What it knows: rate is always HTB's job; delay, jitter and loss are an *impairment backend*'s
(netem where the kernel has it, otherwise a pluggable backend such as the userspace TUN
emulator), and every link records which mechanisms shaped it. Everything created here carries
the ``rs-`` prefix (namespaces, interfaces) or the HTB major ``0x7273`` ("rs") so that
``scout net cleanup`` can find it.

What it leaves to others: parsing capacity traces (``ray_scout.core.control.capacity``),
deciding rates (the allocator), and moving bytes (``ray_scout.transport``). No Ray here.
"""

PREFIX = "rs-"
