"""The lab cluster: check a ``ray up`` YAML before anyone waits on ssh, retarget it, and
take it down for real.

What lives here: loading an on-prem (``provider: type: local``) cluster YAML, Ray's own
validation of it (the autoscaler's ``prepare_config`` + ``validate_config``, the first thing
``ray up`` does), the checks Ray cannot know about (the ``cloud``/``edge`` custom resources
on the ``ray start`` lines, fixed ports for the metrics exporter and the dashboard, usage
stats off, the autoscaler that can start local-provider workers), ``retarget`` (the same
lab at other addresses, key and ports: what the end-to-end test runs), ``down`` (`ray down`
plus the workers' `ray stop` that it leaves out) and ``scout cluster check|down``. What it
leaves to others: starting the cluster (``ray up``), placing actors on the resources (the
experiment runner), shaping the links (the LinkManager).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

# The flags on `ray start` lines whose values are ports; `retarget` rewrites exactly these.
PORT_FLAGS = ("--port", "--dashboard-port", "--dashboard-agent-listen-port",
              "--metrics-export-port")
HEAD_ADDRESS = "$RAY_HEAD_IP"
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")
# `ray up` (Ray >= 2.50) exports RAY_enable_autoscaler_v2=1 before the head's `ray start`;
# v2 never marks a local provider's head as running (v1 records it on the head, v2 does
# not), so it never scales, and the workers never start.
AUTOSCALER_V2 = "RAY_enable_autoscaler_v2"
# What `ray stop` says on a node where none of Ray's processes run.
NO_RAY_LEFT = "Did not find any active Ray processes."


class ClusterConfigError(ValueError):
    """A cluster YAML that `ray up` would reject, or that would start a lab the testbed
    cannot use; the message lists every problem and what to change."""


@dataclass(frozen=True)
class LabPlan:
    """What a checked lab YAML starts: who is where, with which resources and ports."""

    cluster_name: str
    head_ip: str
    worker_ips: tuple[str, ...]
    cloud_per_head: float
    edge_per_worker: float
    gcs_port: int
    dashboard_port: int
    metrics_export_port: int

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head_ip}:{self.dashboard_port}"


def load(path: str | Path) -> dict:
    """The YAML at ``path`` as a dict (a clear error for a missing or non-mapping file)."""
    path = Path(path)
    if not path.is_file():
        raise ClusterConfigError(f"{path}: no such file; copy clusters/lab.yaml and edit it")
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict):
        raise ClusterConfigError(f"{path}: expected a YAML mapping (a `ray up` config)")
    return doc


def ray_validate(config: dict) -> dict:
    """Run Ray's own checks on ``config``; return the config as ``ray up`` would use it.

    Ray's local provider aborts (through its CLI logger) on fields it does not support, e.g.
    ``available_node_types``: the per-node resources of an on-prem lab belong on the
    ``ray start`` lines instead.
    """
    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ClusterConfigError(f"Ray rejects the config at {where}: {e.message}") from None
    # Ray's local provider aborts through cli_logger.abort, which raises a ClickException.
    except (ValueError, RuntimeError, KeyError, click.ClickException) as e:
        raise ClusterConfigError(f"Ray rejects the config: {e}") from None
    return prepared


def _ray_start(command: str) -> tuple[dict[str, str], list[str]] | None:
    """The environment assignments in front of the ``ray start`` in a shell line and the
    words after ``ray start``, or None when the line starts no Ray."""
    for part in re.split(r"&&|;|\|\|", command):
        words = shlex.split(part)
        env: dict[str, str] = {}
        while words and ENV_ASSIGNMENT.fullmatch(words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if len(words) >= 2 and words[0] == "ray" and words[1] == "start":
            return env, words[2:]
    return None


def ray_start_flags(command: str) -> dict[str, str] | None:
    """The ``--flag=value`` options of the ``ray start`` inside a shell line, or None.

    A bare flag maps to ``"true"``; ``--flag value`` and ``--flag=value`` both work, and
    shell quoting is honoured (``--resources='{"cloud": 1}'``). Environment assignments in
    front of it (``VAR=value ray start ...``) are skipped; ``ray_start_env`` has them.
    """
    found = _ray_start(command)
    if found is None:
        return None
    rest = found[1]
    flags: dict[str, str] = {}
    i = 0
    while i < len(rest):
        word = rest[i]
        if word.startswith("--") and "=" in word:
            key, value = word.split("=", 1)
            flags[key] = value
        elif word.startswith("--"):
            takes_value = i + 1 < len(rest) and not rest[i + 1].startswith("--")
            flags[word] = rest[i + 1] if takes_value else "true"
            i += takes_value
        i += 1
    return flags


def ray_start_env(command: str) -> dict[str, str] | None:
    """The ``VAR=value`` assignments in front of the ``ray start`` in a shell line, or None."""
    found = _ray_start(command)
    return None if found is None else found[0]


def _start_flags(config: dict, key: str, problems: list[str]) -> dict[str, str]:
    found = [f for f in (ray_start_flags(c) for c in config.get(key) or []) if f is not None]
    if len(found) != 1:
        problems.append(f"{key}: expected exactly one `ray start` line, found {len(found)}")
        return {}
    return found[0]


def _resources(flags: dict[str, str], key: str, name: str, problems: list[str]) -> float:
    text = flags.get("--resources")
    if text is None:
        problems.append(f"{key}: `ray start` needs --resources='{{\"{name}\": N}}' (the local "
                        "provider ignores per-node resources in the YAML)")
        return 0.0
    try:
        resources = json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(f"{key}: --resources is not JSON ({e}); write it as "
                        f"--resources='{{\"{name}\": 1}}'")
        return 0.0
    value = resources.get(name) if isinstance(resources, dict) else None
    if not isinstance(value, (int, float)) or value <= 0:
        problems.append(f"{key}: --resources must give \"{name}\" a positive amount, got {text}")
        return 0.0
    return float(value)


def _port(flags: dict[str, str], flag: str, key: str, problems: list[str]) -> int:
    text = flags.get(flag)
    if text is None or not text.isdigit() or not 0 < int(text) < 65536:
        problems.append(f"{key}: `ray start` needs a fixed {flag}=PORT (got {text!r}) so "
                        "Prometheus and firewalls know where to look")
        return 0
    return int(text)


def check_lab(config: dict) -> LabPlan:
    """Ray's validation plus ray-scout's; raise ClusterConfigError listing every problem."""
    problems: list[str] = []
    provider = config.get("provider") or {}
    if provider.get("type") != "local":
        raise ClusterConfigError("provider.type must be `local` (an on-prem lab); cloud "
                                 "providers are not what clusters/lab.yaml describes")
    ray_validate(config)
    head = _start_flags(config, "head_start_ray_commands", problems)
    worker = _start_flags(config, "worker_start_ray_commands", problems)
    worker_ips = tuple(provider.get("worker_ips") or ())
    on_head = "head_start_ray_commands"
    plan = LabPlan(
        cluster_name=str(config.get("cluster_name", "default")),
        head_ip=str(provider.get("head_ip")),
        worker_ips=worker_ips,
        cloud_per_head=_resources(head, on_head, "cloud", problems) if head else 0.0,
        edge_per_worker=(_resources(worker, "worker_start_ray_commands", "edge", problems)
                         if worker else 0.0),
        gcs_port=_port(head, "--port", on_head, problems) if head else 0,
        dashboard_port=_port(head, "--dashboard-port", on_head, problems) if head else 0,
        metrics_export_port=(_port(head, "--metrics-export-port", on_head, problems)
                             if head else 0),
    )
    head_env = [e for e in (ray_start_env(c) for c in config.get(on_head) or []) if e is not None]
    if head_env and head_env[0].get(AUTOSCALER_V2) != "0":
        problems.append(f"head_start_ray_commands: start the head with {AUTOSCALER_V2}=0 in "
                        "front of `ray start`: `ray up` of Ray >= 2.50 runs autoscaler v2 "
                        "otherwise, which never starts the workers of a local provider")
    if head:
        if "--head" not in head:
            problems.append("head_start_ray_commands: the `ray start` line needs --head")
        if head.get("--include-dashboard", "true").lower() != "true":
            problems.append("head_start_ray_commands: the dashboard must be on "
                            "(--include-dashboard=true)")
        if "--disable-usage-stats" not in head:
            problems.append("head_start_ray_commands: add --disable-usage-stats")
    if worker:
        if "--disable-usage-stats" not in worker:
            problems.append("worker_start_ray_commands: add --disable-usage-stats")
        _port(worker, "--metrics-export-port", "worker_start_ray_commands", problems)
        address = worker.get("--address", "")
        if plan.gcs_port and address != f"{HEAD_ADDRESS}:{plan.gcs_port}":
            problems.append(f"worker_start_ray_commands: --address must be "
                            f"{HEAD_ADDRESS}:{plan.gcs_port} (the head's --port), got {address!r}")
    if not config.get("setup_commands"):
        problems.append("setup_commands: empty; every node must install ray-scout "
                        "(cd ~/ray-scout && bash clusters/node_setup.sh)")
    if problems:
        raise ClusterConfigError("cluster config problems:\n  - " + "\n  - ".join(problems))
    return plan


def _set_ports(command: str, ports: dict[str, int]) -> str:
    for flag, port in ports.items():
        if flag not in PORT_FLAGS:
            raise ValueError(f"{flag} is not a port flag; choose from {PORT_FLAGS}")
        command = re.sub(rf"{re.escape(flag)}=\d+\b", f"{flag}={port}", command)
    return command


def retarget(config: dict, *, head_ip: str, worker_ips: list[str], ssh_user: str,
             ssh_private_key: str, head_ports: dict[str, int] | None = None,
             worker_ports: dict[str, int] | None = None) -> dict:
    """The same lab at other addresses, with another key and other ports.

    ``head_ports`` / ``worker_ports`` map a flag of PORT_FLAGS to its new value on the head's
    / workers' ``ray start`` line; a new head ``--port`` also moves the workers' --address.
    Everything else (setup, resources, dashboard, usage stats) stays as the lab has it.
    """
    out = copy.deepcopy(config)
    out["provider"] = {**out["provider"], "head_ip": head_ip, "worker_ips": list(worker_ips)}
    out["auth"] = {**out.get("auth", {}), "ssh_user": ssh_user,
                   "ssh_private_key": ssh_private_key}
    head_ports = dict(head_ports or {})
    worker_ports = dict(worker_ports or {})
    out["head_start_ray_commands"] = [_set_ports(c, head_ports)
                                      for c in out["head_start_ray_commands"]]
    workers = [_set_ports(c, worker_ports) for c in out["worker_start_ray_commands"]]
    if "--port" in head_ports:
        workers = [re.sub(rf"{re.escape(HEAD_ADDRESS)}:\d+",
                          f"{HEAD_ADDRESS}:{head_ports['--port']}", c) for c in workers]
    out["worker_start_ray_commands"] = workers
    return out


@dataclass(frozen=True)
class NodeStop:
    """What a node's own `ray stop` found after ``down``: nothing (``clean``) or survivors."""

    ip: str
    clean: bool
    output: str


def node_command(config: dict, ip: str, command: str) -> list[str]:
    """The ssh argv that runs ``command`` on node ``ip`` as `ray up` runs its commands: the
    config's ssh user and key, a login shell after ~/.bashrc (where the venv's ``ray`` is)."""
    auth = config["auth"]
    return ["ssh", "-i", str(Path(auth["ssh_private_key"]).expanduser()),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            # as `ray up` itself, which has already trusted these hosts on first contact
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            f"{auth['ssh_user']}@{ip}",
            "bash --login -c -i " + shlex.quote(f"source ~/.bashrc; {command}")]


def down(config_path: str | Path, timeout_s: float = 120) -> list[NodeStop]:
    """`ray down`, then `ray stop` on every worker, then each node's `ray stop` as a check.

    `ray down` of a local-provider cluster runs `ray stop` on the head only: the workers are
    just marked terminated, their raylet gives up on the GCS a minute later and their log
    monitor never does. `ray down` also exits 0 when its `ray stop` failed. Hence the
    workers' stop here, after the head's autoscaler is gone (it would start them again),
    and a second `ray stop` on every node, which must find nothing.
    """
    from ray.autoscaler.sdk import teardown_cluster

    config = load(config_path)
    provider = config.get("provider") or {}
    head = str(provider.get("head_ip"))
    workers = [str(ip) for ip in provider.get("worker_ips") or []]
    teardown_cluster(str(config_path))

    def ray_stop(ip: str) -> str:
        done = subprocess.run(node_command(config, ip, "ray stop"), capture_output=True,
                              text=True, timeout=timeout_s)
        return done.stdout + done.stderr

    for ip in workers:
        ray_stop(ip)
    stops = []
    for ip in [head, *workers]:
        output = ray_stop(ip)
        stops.append(NodeStop(ip, NO_RAY_LEFT in output, output))
    return stops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cluster_command", required=True)
    check = sub.add_parser("check", help="validate a `ray up` YAML (Ray's checks + the lab's) "
                                         "before any ssh")
    check.add_argument("config", help="cluster YAML, e.g. clusters/lab.yaml")
    stop = sub.add_parser("down", help="`ray down`, then stop Ray on every worker, and check "
                                       "that no Ray process is left on any node")
    stop.add_argument("config", help="the cluster YAML that `ray up` started")


def run(args: argparse.Namespace) -> int:
    if args.cluster_command == "down":
        stops = down(args.config)
        for stop in stops:
            if stop.clean:
                print(f"{stop.ip}: no Ray process left")
            else:
                print(f"{stop.ip}: not confirmed free of Ray (ssh failed, or Ray survived "
                      f"`ray stop`); log in and run `ray stop --force`. It said:\n"
                      f"{stop.output[-2000:]}", file=sys.stderr)
        return 0 if all(stop.clean for stop in stops) else 1
    try:
        plan = check_lab(load(args.config))
    except ClusterConfigError as e:
        print(f"{args.config}: {e}", file=sys.stderr)
        return 2
    print(f"{args.config}: ok (Ray's validation and the lab checks)")
    print(f"  cloud node (head): {plan.head_ip}  resources cloud={plan.cloud_per_head:g}")
    print(f"  edge nodes: {', '.join(plan.worker_ips) or 'none'}  "
          f"resources edge={plan.edge_per_worker:g} each")
    print(f"  dashboard: {plan.dashboard_url}  metrics: :{plan.metrics_export_port} on every "
          f"node  GCS: {plan.head_ip}:{plan.gcs_port}")
    return 0
