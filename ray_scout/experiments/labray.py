"""``scout run`` inside the netem lab: Ray 2.60 started so that TCG's slow processes make it.

Why this exists: under QEMU TCG (the lab; KVM hangs on these machines) every Python process
Ray starts spends 10-30 s importing before it does anything (docs/LINKS.md, "Ray in the
lab"). Ray 2.60 has two start-up waits that no setting changes: the raylet (C++) waits 15 s
for each of its agents' port files and aborts when one is missing (``WaitForDashboardAgentPorts``),
and ``ray.init`` waits 30 s for the raylet to register (``raylet_start_wait_time_s`` in
``ray/_private/node.py``). The dashboard agent writes its port files only once its modules
have loaded, past 15 s in the guest, so a plain ``ray.init`` there never starts.

What this does, in this process only and only inside the lab (``in_lab``): the agents get
fixed ports before the head starts (as ``ray start --dashboard-agent-grpc-port
--runtime-env-agent-port --metrics-export-port`` gives them, which ``ray.init`` cannot), so the
raylet takes their ports from its command line instead of waiting for files; and the one port
file it waits for however it is started (the dashboard agent's HTTP port, never passed to the
raylet) is written before the raylet starts, with the port the agent is told to bind, the
value the agent itself writes there once it is up. The raylet then registers in seconds and
the agents come up behind it. Ray's own settable waits are raised (``LAB_RAY_ENV``). Ray's
files are not touched (the host's root is read-only in the guest anyway). Then it runs
``scout run`` with the arguments given: ``scout net lab-kernel -- python3 -m
ray_scout.experiments.labray run SPEC --out DIR``.
"""

from __future__ import annotations

import os
import sys

from ray_scout.net.errors import NetError
from ray_scout.net.labkernel import in_lab

# The guest's own network stack holds nothing else: any free ports serve.
AGENT_PORTS = {"metrics_agent_port": 50101, "metrics_export_port": 50102, "runtime_env_agent_port": 50103,
               "dashboard_agent_listen_port": 50104}
# Ray's settable waits, raised past what TCG needs (each measured in docs/LINKS.md): the
# dashboard head's start (default 60 s), a worker's registration (60 s), the runtime-env agent.
LAB_RAY_ENV = {"RAY_DASHBOARD_STARTUP_TIMEOUT_S": "600", "RAY_worker_register_timeout_seconds": "600",
               "RAY_agent_register_timeout_ms": "600000",
               # Workers started ahead for tasks: the runner's actors need their own (a runtime
               # env), so these would only take CPU from them.
               "RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0"}


def start_ray_for_tcg() -> None:
    """Apply the measures above to the Ray this process will start (before ``ray.init``)."""
    if not in_lab():
        raise NetError("ray_scout.experiments.labray is for the netem lab's guest only (it works "
                       "around Ray's fixed start-up waits under TCG); on this machine run "
                       "`scout run` itself")
    os.environ.update(LAB_RAY_ENV)
    from ray._private.node import Node
    from ray._raylet import DASHBOARD_AGENT_LISTEN_PORT_NAME, persist_port

    start_head, start_raylet = Node.start_head_processes, Node.start_raylet

    def head_with_agent_ports(self):
        for name, port in AGENT_PORTS.items():
            setattr(self._ray_params, name, port)
        return start_head(self)

    def raylet_with_listen_port_known(self, *args, **kwargs):
        persist_port(self._session_dir, self._node_id, DASHBOARD_AGENT_LISTEN_PORT_NAME,
                     self._ray_params.dashboard_agent_listen_port)
        return start_raylet(self, *args, **kwargs)

    Node.start_head_processes = head_with_agent_ports
    Node.start_raylet = raylet_with_listen_port_known


def main(argv: list[str] | None = None) -> int:
    from ray_scout.cli import main as scout

    start_ray_for_tcg()
    return scout(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
