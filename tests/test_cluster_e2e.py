"""`ray up` / `ray down` of clusters/lab.yaml for real: a cloud head and an edge worker.

Each lab node is this machine seen through a throwaway sshd (own config, host key, user key,
all in a temp dir) that runs in its own network, PID and mount namespaces:

- network: the node's namespace is joined to a bridge on this host by a veth; the bridge
  holds the launcher's address (.254), the head is .1 and the worker .2 of a free
  10.78.N.0/24, and each node's default route points at the launcher, as a lab machine's
  points at its router. Both Rays use lab.yaml's fixed ports (6379, 8265, 52365, 8080)
  without meeting each other or any other Ray on this machine. Nothing is forwarded beyond
  the bridge: the nodes reach the package index (setup pip-installs ray-scout) through
  ``IndexProxy``, a CONNECT proxy on the launcher's address;
- PID: `ray stop` (which `ray up` and `ray down` run on the node) sees only that node's Ray,
  and the test can tell for each node whether a Ray process is left;
- mount: the node's /tmp/ray is private (the head's autoscaler state, logs and session dirs
  live in ``Node.ray_tmp``), and so is its /etc/passwd, which gives root the node's own HOME
  (a temp dir): sshd sets HOME from it and ssh expands ``~`` in ``-i ~/ray_bootstrap_key.pem``
  from it. What the launcher and the head's autoscaler sync and install there (~/ray-scout,
  the venv, ~/ray_bootstrap_*) is readable from this host under ``Node.home`` and goes with
  the test.

The config is clusters/lab.yaml retargeted (addresses and key), nothing else. Namespaces and
host links carry the ``rs-<run>-`` mark: a killed run is cleaned by
``python3 -m ray_scout.cli net cleanup``, and each node's processes die with the test process
(the node's PID 1 gets SIGKILL when its parent goes).

``two_node_lab()`` (and the ``lab`` fixture) brings the lab up and hands over a ``Lab``: the
config path, the launcher's environment, ``Lab.ray``/``Lab.exec``/``Lab.scout`` to drive it,
both ``Node``s; everything goes again on the way out, failure or not.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pyroute2 import IPRoute, netns

from ray_scout import cluster
from ray_scout.net import PREFIX
from ray_scout.net.namespaces import add_veth, address_up, create_netns, netns_path
from ray_scout.net.topology import pid_run_id

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
NODE_IFINDEX = 2  # the node's one veth (lo is 1)
NODE_IFNAME = "eth0"
LAUNCHER_HOST = 254  # the bridge's (this host's) address in the lab's /24
NODE_HOSTS = {"head": 1, "worker": 2}
NODES_ALIVE_TIMEOUT_S = 240
# PID 1 of the node's namespace: starts sshd, reaps every orphan (Ray daemonizes), and ends
# when sshd ends, which makes the kernel kill whatever else is left in the namespace.
REAPER = textwrap.dedent("""
    import os, signal, subprocess, sys
    sshd = subprocess.Popen(sys.argv[1:])
    signal.signal(signal.SIGTERM, lambda *_: sshd.terminate())
    while True:
        pid, _ = os.wait()
        if pid == sshd.pid:
            break
""")


def _missing_tool() -> str | None:
    for tool in ("/usr/sbin/sshd", "ssh", "ssh-keygen", "rsync", "unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            return (f"{tool} missing: scripts/setup.sh installs openssh-server and rsync; "
                    "unshare, nsenter and setpriv come with util-linux")
    return None


def _pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _ray_processes_in(ns: str) -> list[str]:
    """Command lines of Ray processes (raylet, gcs_server, dashboard, workers) in ``ns``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or _pid_ns(int(entry.name)) != ns:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        # Ray's daemons are raylet, gcs_server and Python scripts under site-packages/ray/;
        # matching "ray" alone would also catch this test's own temp paths.
        if (comm in ("raylet", "gcs_server") or comm.startswith("ray::")
                or "/ray/" in cmd or "ray.scripts" in cmd):
            found.append(f"{entry.name} {comm}: {cmd[:160]}")
    return found


def _free_subnet() -> str:
    """A 10.78.N (/24) that no address or route of this host touches yet."""
    with IPRoute() as ipr:
        used = {r.get_attr("RTA_DST") for r in ipr.get_routes(family=socket.AF_INET)}
        used |= {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)}
    taken = {".".join(str(ip).split(".")[:3]) for ip in used if ip}
    start = os.getpid() % 250
    for k in range(250):
        subnet = f"10.78.{(start + k) % 250 + 1}"
        if subnet not in taken:
            return subnet
    raise RuntimeError("no free 10.78.N.0/24 on this host; remove leftovers with "
                       "`python3 -m ray_scout.cli net cleanup`")


class LabNet:
    """A bridge on this host (the launcher's address) and one namespace per node behind it.

    Names: namespaces ``rs-<run>-lab-<node>``, host links ``rs-<run>-lab`` (the bridge) and
    ``rs-<run>-l<n>`` (the host ends of the veths), all found by ``scout net cleanup``.
    """

    def __init__(self, run_id: str):
        self.prefix = f"{PREFIX}{run_id}-"
        self.bridge = f"{self.prefix}lab"
        self.subnet = _free_subnet()
        self.launcher_ip = f"{self.subnet}.{LAUNCHER_HOST}"
        self.ips = {node: f"{self.subnet}.{host}" for node, host in NODE_HOSTS.items()}
        self.namespaces = {node: f"{self.prefix}lab-{node}" for node in NODE_HOSTS}
        self._made: list[str] = []  # namespaces and host links, in the order made

    def build(self) -> None:
        clash = set(self.namespaces.values()) & set(netns.listnetns())
        if clash:
            raise RuntimeError(f"namespace {sorted(clash)[0]} exists already; remove "
                               f"leftovers with `python3 -m ray_scout.cli net cleanup`")
        with IPRoute() as host:
            host.link("add", ifname=self.bridge, kind="bridge")
            self._made.append(self.bridge)
            bridge = host.link_lookup(ifname=self.bridge)[0]
            address_up(host, bridge, self.launcher_ip)
            for n, (node, ns) in enumerate(self.namespaces.items()):
                inside = create_netns(ns)
                self._made.append(ns)
                try:
                    end = f"{self.prefix}l{n}"
                    add_veth(host, end, 0, ns, NODE_IFNAME, NODE_IFINDEX)
                    self._made.append(end)
                    host.link("set", index=host.link_lookup(ifname=end)[0], master=bridge,
                              state="up")
                    address_up(inside, NODE_IFINDEX, self.ips[node])
                    # Without a default route Ray cannot find the node's address and
                    # advertises 127.0.0.1 (docs/LAB_GUIDE.md).
                    inside.route("add", dst="0.0.0.0/0", gateway=self.launcher_ip)
                finally:
                    inside.close()

    def teardown(self) -> None:
        """Remove what ``build`` made: namespaces (their veths go with them), then links."""
        namespaces = set(self.namespaces.values())
        existing = set(netns.listnetns())
        for ns in [n for n in self._made if n in namespaces and n in existing]:
            netns.remove(ns)
        with IPRoute() as host:
            for name in [n for n in self._made if n not in namespaces]:
                for index in host.link_lookup(ifname=name):
                    host.link("del", index=index)
        self._made.clear()


class IndexProxy:
    """An HTTP CONNECT proxy on the launcher's bridge address, to port 443 only.

    The nodes' namespaces route nowhere beyond the bridge (this host does not forward), but
    setup pip-installs ray-scout on each node, and pip's build isolation fetches setuptools
    from the package index: through this proxy (``PIP_PROXY``) the nodes reach the index
    the way this host does, as lab machines behind a proxy would.
    """

    def __init__(self, host: str):
        self.server = socket.create_server((host, 0))
        self.url = f"http://{host}:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed by stop()
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    @staticmethod
    def _tunnel(client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 8192:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            method, target, *_ = head.split(b"\r\n", 1)[0].decode(errors="replace").split()
            host, _, port = target.rpartition(":")
            if method != "CONNECT" or port != "443":
                client.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")
                return
            try:
                upstream = socket.create_connection((host, 443), timeout=30)
            except OSError:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
                return
            with upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                upstream.settimeout(None)
                back = threading.Thread(target=IndexProxy._pump, args=(upstream, client),
                                        daemon=True)
                back.start()
                IndexProxy._pump(client, upstream)
                back.join()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the other side went away; the tunnel ends either way

    def stop(self) -> None:
        self.server.close()


class Node:
    """A private sshd on ``ip``:22 in network namespace ``netns`` and fresh PID and mount
    namespaces; root login by key from the lab's /24 only."""

    def __init__(self, root: Path, ip: str, netns_name: str, allow_from: str,
                 authorized_key: Path, pip_proxy: str):
        self.root, self.ip, self.netns = root, ip, netns_name
        self.home = root / "home"
        self.ray_tmp = root / "ray-tmp"
        for d in (self.home, self.ray_tmp):
            d.mkdir(parents=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(root / "host_key")], check=True)
        shutil.copy(authorized_key, root / "authorized_keys")
        # The login shell of the ssh user must find the ray of the Python running this test,
        # as a lab node's ~/.bashrc would (clusters/node_setup.sh appends its venv after it).
        (self.home / ".bashrc").write_text(
            f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
        # The node's root has the node's HOME in its own /etc/passwd: ssh expands ~ in
        # `-i ~/ray_bootstrap_key.pem` (the head's autoscaler reaching a worker) from
        # passwd, not from $HOME, and sshd sets a session's HOME from it too.
        passwd = root / "passwd"
        passwd.write_text("".join(_with_home(line, "root", self.home) for line in
                                  Path("/etc/passwd").read_text().splitlines(keepends=True)))
        config = root / "sshd_config"
        config.write_text(textwrap.dedent(f"""\
            ListenAddress {ip}:22
            HostKey {root}/host_key
            PidFile none
            AuthorizedKeysFile {root}/authorized_keys
            PermitRootLogin prohibit-password
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            StrictModes no
            AllowUsers root@{allow_from}
            SetEnv RAY_SCOUT_CACHE={_cache_dir()} PIP_PROXY={pip_proxy}
            """))
        self._log = open(root / "sshd.log", "wb")
        # setpriv: the node's PID 1 (unshare's child, killed by unshare's --kill-child) dies
        # with this test process even when the test is killed before its cleanup runs.
        self.proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "nsenter", f"--net={netns_path(netns_name)}",
             "unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
             "--propagation", "private", "sh", "-c",
             'mount --bind "$1" /tmp/ray && mount --bind "$2" /etc/passwd && shift 2 '
             '&& exec "$@"', "sh", str(self.ray_tmp), str(passwd),
             sys.executable, "-c", REAPER, "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
            stdout=self._log, stderr=self._log, start_new_session=True)
        self.ns = self._wait_for_sshd()

    def _wait_for_sshd(self) -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.root / 'sshd.log').read_text()}")
            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex((self.ip, 22)) == 0:
                    children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
                    return _pid_ns(int(children.read_text().split()[0]))
            time.sleep(0.2)
        raise RuntimeError(f"sshd on {self.ip} did not listen within 20 s")

    def ray_processes(self) -> list[str]:
        return _ray_processes_in(self.ns)

    def log(self, relative: str, tail_chars: int = 3000) -> str:
        """The tail of a file under the node's /tmp/ray, e.g. session_latest/logs/monitor.log."""
        # session_latest links to /tmp/ray/session_<time>, a path only the node sees.
        first, _, rest = relative.partition("/")
        link = self.ray_tmp / first
        if link.is_symlink():
            link = self.ray_tmp / Path(os.readlink(link)).relative_to("/tmp/ray")
        path = link / rest if rest else link
        return path.read_text(errors="replace")[-tail_chars:] if path.is_file() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def _with_home(passwd_line: str, user: str, home: Path) -> str:
    fields = passwd_line.split(":")
    if fields[0] != user or len(fields) != 7:
        return passwd_line
    fields[5] = str(home)
    return ":".join(fields)


def _cache_dir() -> str:
    from ray_scout.core.llm.models import cache_dir
    return str(cache_dir())


@dataclass
class Lab:
    """A running two-node lab: the retargeted config, the launcher's env, the nodes.

    What a command on a node writes under its ~ is readable here under ``head.home`` or
    ``worker.home`` (e.g. a run's ``--out`` dir below ~/ray-scout).
    """

    config_path: Path
    env: dict
    head: Node
    worker: Node
    plan: cluster.LabPlan

    def ray(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """The `ray` CLI on the launcher (this host), e.g. ``lab.ray("status", ...)``."""
        return self._launcher("ray.scripts.scripts", args, timeout)

    def scout(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """ray-scout's CLI on the launcher, e.g. ``lab.scout("cluster", "down", ...)``."""
        return self._launcher("ray_scout.cli", args, timeout)

    def _launcher(self, module: str, args: tuple[str, ...], timeout: float):
        return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def exec(self, command: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """``ray exec <config> command``: ``command`` runs on the head in its login shell."""
        return self.ray("exec", str(self.config_path), command, timeout=timeout)

    def diagnostics(self) -> str:
        """What the head's autoscaler said, and who knocked at the worker's sshd: the first
        things to read when a worker is missing."""
        logs = "session_latest/logs"
        said = [f"--- head {name}:\n{self.head.log(f'{logs}/{name}')}"
                for name in ("monitor.log", "monitor.err", "monitor.out")]
        sshd = (self.worker.root / "sshd.log").read_text(errors="replace")[-3000:]
        return "\n".join(said + [f"--- worker sshd.log:\n{sshd}"])


# Runs on the head (``python ~/nodes_alive.py N TIMEOUT_S``): waits until N nodes are alive.
NODES_ALIVE = textwrap.dedent("""
    import sys, time, ray
    want, timeout_s = int(sys.argv[1]), float(sys.argv[2])
    ray.init(address="auto", logging_level="ERROR")
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
        if len(alive) >= want or time.monotonic() > deadline:
            break
        time.sleep(1)
    print("ALIVE", len(alive), sorted(alive))
""")


def _wait_for_nodes(lab: Lab, want: int) -> None:
    (lab.head.home / "nodes_alive.py").write_text(NODES_ALIVE)
    started = time.monotonic()
    run = lab.exec(f"python ~/nodes_alive.py {want} {NODES_ALIVE_TIMEOUT_S}",
                   timeout=NODES_ALIVE_TIMEOUT_S + 60)
    alive = next((line for line in run.stdout.splitlines() if line.startswith("ALIVE")), "")
    if run.returncode != 0 or not alive.startswith(f"ALIVE {want} "):
        status = lab.exec("ray status", timeout=60)
        raise AssertionError(
            f"{want} nodes not alive {time.monotonic() - started:.0f} s after `ray up`: "
            f"{alive or run.stdout[-2000:] + run.stderr[-2000:]}\n--- ray status:\n"
            f"{status.stdout[-3000:]}\n{lab.diagnostics()}")


@contextlib.contextmanager
def two_node_lab(missing) -> Iterator[Lab]:
    """clusters/lab.yaml on this machine: `ray up` done and both nodes alive in Ray.

    Skips without root; a missing tool goes to ``missing`` (conftest: a skip on a developer's
    machine, a failure in CI, which must run this test). On the way out, whatever happened:
    the nodes' sshds stopped (and with them every process in their PID namespaces, Ray's
    included), the proxy closed, the namespaces and links removed, every file made here
    deleted.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root: network/PID/mount namespaces, a private sshd with root login "
                    "by key")
    reason = _missing_tool()
    if reason:
        missing(reason)
    # Not pytest's tmp_path, which outlives the test: every file made here goes at the end.
    tmp_path = Path(tempfile.mkdtemp(prefix="ray-scout-cluster-"))
    made_ray_tmp = not Path("/tmp/ray").exists()
    made_run_sshd = not Path("/run/sshd").exists()
    Path("/tmp/ray").mkdir(exist_ok=True)  # where each node bind-mounts its own
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    control_dirs_before = set(Path("/tmp").glob("ray_ssh_*"))
    net = LabNet(pid_run_id())
    nodes: list[Node] = []
    proxy = None
    try:
        key = tmp_path / "user_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        net.build()
        proxy = IndexProxy(net.launcher_ip)
        for node in ("head", "worker"):
            nodes.append(Node(tmp_path / node, net.ips[node], net.namespaces[node],
                              f"{net.subnet}.*", key.with_suffix(".pub"), proxy.url))
        head, worker = nodes
        config = cluster.retarget(cluster.load(REPO / "clusters" / "lab.yaml"),
                                  head_ip=head.ip, worker_ips=[worker.ip], ssh_user="root",
                                  ssh_private_key=str(key))
        plan = cluster.check_lab(config)
        config_path = tmp_path / "lab-namespaces.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {**os.environ, "TMPDIR": str(tmp_path / "launcher-tmp"),
               "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        (tmp_path / "launcher-tmp").mkdir()
        lab = Lab(config_path, env, head, worker, plan)

        up = lab.ray("up", "-y", "--no-config-cache", str(config_path), timeout=420)
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        assert head.ray_processes(), "ray up returned 0 but no Ray runs on the head"
        _wait_for_nodes(lab, 1 + len(plan.worker_ips))
        yield lab
    finally:
        # Stopping a node ends its PID namespace, and every Ray process in it with it.
        for node in nodes:
            node.stop()
        if proxy is not None:
            proxy.stop()
        net.teardown()
        for d in set(Path("/tmp").glob("ray_ssh_*")) - control_dirs_before:
            shutil.rmtree(d, ignore_errors=True)
        if made_ray_tmp:
            shutil.rmtree("/tmp/ray", ignore_errors=True)
        if made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def lab(missing) -> Iterator[Lab]:
    with two_node_lab(missing) as running:
        yield running


# Runs on the head: one task on `cloud`, one on `edge`; where each ran, what it imported.
PLACEMENT = textwrap.dedent("""
    import json, ray, ray_scout
    ray.init(address="auto", logging_level="ERROR")
    def where():
        return {"ip": ray.util.get_node_ip_address(), "module": ray_scout.__file__}
    cloud = ray.remote(num_cpus=0, resources={"cloud": 1})(where)
    edge = ray.remote(num_cpus=0, resources={"edge": 1})(where)
    print("PLACEMENT", json.dumps({"cloud": ray.get(cloud.remote()),
                                   "edge": ray.get(edge.remote()),
                                   "resources": ray.cluster_resources()}))
""")


def _placement(lab: Lab) -> dict:
    (lab.head.home / "placement.py").write_text(PLACEMENT)
    run = lab.exec("python ~/placement.py")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    line = next((s for s in run.stdout.splitlines() if s.startswith("PLACEMENT ")), None)
    assert line is not None, run.stdout[-4000:]
    return json.loads(line.removeprefix("PLACEMENT "))


def _installed_module(node: Node) -> str:
    return str(node.home / "ray-scout" / "ray_scout" / "__init__.py")


# A short congestion experiment for the lab: two agents on the worker share 20 Mbit/s
# (10 each under the equal split) and always send INT8 KV (Qwen2.5-7B at 64 tokens, 2.0 MB
# on the wire), so every transfer takes long enough on a 10 Mbit/s class (1.7 s) to show
# whether the worker's interface really shaped it. Rate-only profiles: this kernel may lack
# netem.
CLUSTER_SPEC = {
    "name": "cluster_e2e", "fidelity": "profiled", "duration_s": 12, "seed": 0, "epoch_s": 0.5,
    "network": {"bottleneck": "lab", "impairment": "auto", "borrow": False},
    "capacity": {"kind": "constant", "rate": "20mbit"},
    "cloud": {"slots": 2, "models": {"qwen2.5-7b": {"timing": "paper_b"}}},
    "agents": [{"name": "edge", "count": 2, "model": "qwen2.5-7b", "context_tokens": [64],
                "deadline_s": 6.0, "arrival_rate_hz": 0.3, "quality": "paper_b:3b-7b",
                "access": "lab"}],
    "policies": ["static:int8"], "allocators": ["equal"],
}


@contextlib.contextmanager
def forwarded_dashboard(lab: Lab) -> Iterator[str]:
    """`ray dashboard <config>` on a free local port: the head's Jobs API from here, as a lab
    user reaches it from the launcher (the head's dashboard listens on its 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tunnel = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "dashboard", "-p",
                               str(port), str(lab.config_path)], cwd=REPO, env=lab.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 60
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:  # noqa: BLE001 - the tunnel is not up yet
                assert tunnel.poll() is None, "ray dashboard exited"
                assert time.monotonic() < deadline, f"no dashboard at {address} within 60 s"
                time.sleep(1)
        yield address
    finally:
        os.killpg(tunnel.pid, signal.SIGTERM)
        tunnel.wait(30)


def _submit(lab: Lab, address: str, spec: dict, tmp: Path) -> str:
    """`scout submit` of ``spec`` from the launcher; returns the job's id."""
    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = lab.scout("submit", str(path), "--address", address, timeout=180)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout.split()[1].rstrip(":")


def _wait_for_job(address: str, job: str, timeout_s: float = 300) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job).value)) not in (
            "SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
        time.sleep(1)
    return status


def _job_log(address: str, job: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address).get_job_logs(job)


def _shaped(node: Node) -> str:
    """The node's qdiscs on its interface toward the head (HTB while a trial shapes it)."""
    from ray_scout.net.namespaces import netlink

    with netlink(node.netns) as ns:
        index = ns.link_lookup(ifname=NODE_IFNAME)[0]
        return " ".join(msg.get_attr("TCA_KIND") for msg in ns.get_qdiscs(index=index))


# 4 capacities x 2 replications x 2 policies = 16 simulated trials, more than the head's
# CPUs hold at once, so Ray hands some to the worker.
SWEEP_SPEC = {**CLUSTER_SPEC, "name": "cluster_sweep", "fidelity": "simulated",
              "duration_s": 60, "policies": ["adaptive", "static:int8"],
              "sweep": {"grid": {"capacity.rate": ["10mbit", "20mbit", "40mbit", "80mbit"]}},
              "replications": 2}


def _run_sweep(lab: Lab) -> pd.DataFrame:
    """`scout run --address auto` of ``SWEEP_SPEC`` on the head; returns its trials table."""
    (lab.head.home / "cluster_sweep.yaml").write_text(yaml.safe_dump(SWEEP_SPEC))
    run = lab.exec("cd ~/ray-scout && python -m ray_scout.cli run ~/cluster_sweep.yaml "
                   "--address auto --no-progress --out ~/cluster_sweep", timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return pd.read_csv(lab.head.home / "cluster_sweep" / "trials.csv")


def test_ray_up_places_cloud_on_head_and_edge_on_worker_and_cluster_down_leaves_no_ray(lab):
    placed = _placement(lab)
    assert placed["cloud"] == {"ip": lab.head.ip, "module": _installed_module(lab.head)}, placed
    assert placed["edge"] == {"ip": lab.worker.ip, "module": _installed_module(lab.worker)}, (
        placed)
    assert placed["resources"].get("cloud") == lab.plan.cloud_per_head, placed["resources"]
    assert placed["resources"].get("edge") == (
        lab.plan.edge_per_worker * len(lab.plan.worker_ips)), placed["resources"]

    with forwarded_dashboard(lab) as address:
        tmp = lab.config_path.parent
        job = _submit(lab, address, CLUSTER_SPEC, tmp)
        status = _wait_for_job(address, job)
        log = _job_log(address, job)
        assert status == "SUCCEEDED", log[-4000:]
        # The job's log is the run's console: its own lines only, Ray's went to run.log.
        assert "results in" in log and "core_worker" not in log and "pid=" not in log, log
        fetched = lab.scout("fetch", job, "--address", address, "--cluster",
                            str(lab.config_path), "--to", str(tmp / "fetched"), timeout=300)
        assert fetched.returncode == 0, fetched.stdout[-4000:] + fetched.stderr[-4000:]
        out = tmp / "fetched" / job

        # `scout stop` mid-trial: SIGTERM to the driver, which tears the worker's links and
        # the actors down as on Ctrl-C before Ray's job stop gives up on it.
        long_run = {**CLUSTER_SPEC, "name": "cluster_e2e_stop", "duration_s": 120}
        stopping = _submit(lab, address, long_run, tmp)
        rows = (lab.head.home / "ray-scout" / "results" / stopping / "raw"
                / "00_static-int8_equal" / "requests.jsonl")
        deadline = time.monotonic() + 180
        while not rows.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert rows.exists(), _job_log(address, stopping)[-4000:]
        assert "htb" in _shaped(lab.worker), "the trial runs but the worker is not shaped"
        stopped = lab.scout("stop", stopping, "--address", address, timeout=120)
        assert stopped.returncode == 0 and stopped.stdout.strip().endswith("STOPPED"), (
            stopped.stdout + stopped.stderr)
        said = "stopped (SIGTERM); links and actors were torn down"
        stop_log = _job_log(address, stopping)
        deadline = time.monotonic() + 20  # the job's log file may trail its status by a moment
        while said not in stop_log and time.monotonic() < deadline:
            time.sleep(1)
            stop_log = _job_log(address, stopping)
        run_log = rows.parents[2] / "run.log"
        assert said in stop_log, (stop_log[-4000:] + "\n--- run.log ---\n"
                                  + (run_log.read_text()[-4000:] if run_log.exists() else "none"))
        # Ray's own lines on SIGTERM (its logging.cc stack dump, task retries) went to run.log.
        assert not [s for s in ("core_worker", "logging.cc", "pid=", "retries remaining")
                    if s in stop_log], stop_log
        assert "htb" not in _shaped(lab.worker), _shaped(lab.worker)
        from ray.util.state import list_actors

        left = [(a.class_name, a.name) for a in list_actors(
            address=address, filters=[("state", "=", "ALIVE")], limit=1000)
            if (a.name or "").startswith("cluster_e2e_stop/")]
        assert left == [], f"actors of the stopped job still alive: {left}"

    trial = json.loads((out / "run.json").read_text())["trials"][0]
    assert trial["errors"] == [], trial["errors"]
    assert trial["placement"] == {
        "mode": "cluster", "cloud": lab.head.ip,
        "agents": {"edge0": lab.worker.ip, "edge1": lab.worker.ip},
        "cloud_ports": {"edge0": 7300, "edge1": 7301}}, trial["placement"]
    links = pd.read_csv(out / "links.csv")
    # The worker's one interface toward the head, one class per agent by its cloud port.
    assert sorted(links["link"]) == [f"{NODE_IFNAME}->{lab.head.ip}:7300[edge0]",
                                     f"{NODE_IFNAME}->{lab.head.ip}:7301[edge1]"]
    assert set(links["mechanisms"]) == {"htb"}
    requests = pd.read_csv(out / "requests.csv")
    sent = requests[(requests["mode"] == "int8") & requests["measured_bps"].notna()]
    assert len(sent) >= 4 and sent["deadline_met"].all(), requests.to_string()
    # TCP goodput through a class is its rate times 1448/1514: unshaped, a veth moves
    # these payloads at Gbit/s.
    ratio = (sent["measured_bps"] / sent["grant_bps"]).median()
    assert 0.85 <= ratio <= 1.0, f"measured/granted {ratio:.3f}\n{sent.to_string()}"

    # A small simulated sweep on the same cluster: its trials are Ray tasks on both nodes.
    trials = _run_sweep(lab)
    assert len(trials) == 16 and trials["n"].gt(0).all(), trials.to_string()
    assert set(trials["node"]) == {lab.head.ip, lab.worker.ip}, trials["node"].value_counts()

    config = str(lab.config_path)
    ray_down = lab.ray("down", "-y", config, timeout=180)
    assert ray_down.returncode == 0, ray_down.stdout[-4000:] + ray_down.stderr[-4000:]
    assert lab.worker.ray_processes(), (
        "Ray's `ray down` stopped the worker too: `scout cluster down` can become `ray down`")
    down = lab.scout("cluster", "down", config, timeout=300)
    assert down.returncode == 0, down.stdout[-4000:] + down.stderr[-4000:]
    for node in (lab.head, lab.worker):
        assert f"{node.ip}: no Ray process left" in down.stdout, down.stdout[-4000:]
    nodes = (lab.head, lab.worker)
    deadline = time.monotonic() + 30
    while any(n.ray_processes() for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {n.ip: n.ray_processes() for n in nodes if n.ray_processes()}
    assert not left, f"scout cluster down returned 0 but Ray survives: {left}"
