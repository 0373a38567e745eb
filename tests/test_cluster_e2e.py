"""`ray up` / `ray down` of clusters/lab.yaml for real, against a private sshd on loopback.

The node is this machine, seen through a throwaway sshd on 127.0.0.1:22 (own config, host
key, user key, all in a temp dir) that runs in its own PID and mount namespaces: `ray stop`
(which `ray up` and `ray down` run on the node) then sees only the Ray it started, never
another Ray on this machine, and the node's /tmp/ray is private, so no other driver on this
machine can stumble onto the cluster. The session's HOME is a temp dir too, so everything the
launcher syncs and installs there (~/ray-scout, the venv, ~/ray_bootstrap_*.yaml) goes away
with it. The config is clusters/lab.yaml retargeted (addresses, key, ports), nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from ray_scout import cluster

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
HEAD_IP = "127.0.0.1"
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


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root: a private sshd with root login by key, PID/mount namespaces"
    for tool in ("/usr/sbin/sshd", "ssh", "ssh-keygen", "rsync", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} missing: scripts/setup.sh installs openssh-server and rsync"
    with socket.socket() as s:
        if s.connect_ex((HEAD_IP, 22)) == 0:
            return f"{HEAD_IP}:22 is taken; the test's sshd needs it"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Node:
    """A private sshd on ``ip``:22 in fresh PID and mount namespaces; root login by key."""

    def __init__(self, root: Path, ip: str, authorized_key: Path):
        self.root, self.ip = root, ip
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
            AllowUsers root@127.0.0.1
            SetEnv HOME={self.home} RAY_SCOUT_CACHE={_cache_dir()}
            """))
        log = open(root / "sshd.log", "wb")
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
             "--propagation", "private", "sh", "-c",
             'mount --bind "$1" /tmp/ray && shift && exec "$@"', "sh", str(self.ray_tmp),
             sys.executable, "-c", REAPER, "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
            stdout=log, stderr=log, start_new_session=True)
        self.ns = self._wait_for_sshd()

    def _wait_for_sshd(self) -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.root / 'sshd.log').read_text()}")
            with socket.socket() as s:
                if s.connect_ex((self.ip, 22)) == 0:
                    children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
                    return _pid_ns(int(children.read_text().split()[0]))
            time.sleep(0.2)
        raise RuntimeError("sshd did not listen within 20 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _cache_dir() -> str:
    from ray_scout.core.models import cache_dir
    return str(cache_dir())


def _ray(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


# Runs on the head through `ray exec`: places a task on the `cloud` resource and reports
# where it ran and which ray_scout it imported.
DRIVER = textwrap.dedent("""
    import ray, ray_scout
    ray.init(address="auto")
    @ray.remote(num_cpus=0, resources={"cloud": 1})
    def where():
        return ray.get_runtime_context().get_node_id(), ray_scout.__file__
    node, module = ray.get(where.remote())
    print("CLOUD", node == ray.get_runtime_context().get_node_id(), module)
    print("RESOURCES", ray.cluster_resources().get("cloud"))
""")


def test_ray_up_runs_a_task_on_the_cloud_node_and_ray_down_leaves_no_ray():
    reason = _missing()
    if reason:
        pytest.skip(reason)
    # Not pytest's tmp_path, which outlives the test: every file made here goes at the end.
    tmp_path = Path(tempfile.mkdtemp(prefix="ray-scout-cluster-"))
    made_ray_tmp = not Path("/tmp/ray").exists()
    made_run_sshd = not Path("/run/sshd").exists()
    Path("/tmp/ray").mkdir(exist_ok=True)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    control_dirs_before = set(Path("/tmp").glob("ray_ssh_*"))
    key = tmp_path / "user_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    head = None
    config_path = tmp_path / "lab-loopback.yaml"
    env = {**os.environ, "TMPDIR": str(tmp_path / "launcher-tmp"),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "launcher-tmp").mkdir()
    try:
        head = Node(tmp_path / "head", HEAD_IP, key.with_suffix(".pub"))
        ports = {flag: _free_port() for flag in cluster.PORT_FLAGS}
        config = cluster.retarget(cluster.load(REPO / "clusters" / "lab.yaml"),
                                  head_ip=HEAD_IP, worker_ips=[], ssh_user="root",
                                  ssh_private_key=str(key), head_ports=ports)
        cluster.check_lab(config)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))

        up = _ray("up", "-y", "--no-config-cache", str(config_path), env=env, timeout=420)
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        assert _ray_processes_in(head.ns), "ray up returned 0 but no Ray runs on the node"

        run = _ray("exec", str(config_path), f"python -c '{DRIVER}'", env=env, timeout=180)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        assert "CLOUD True " in run.stdout and "RESOURCES 1.0" in run.stdout, run.stdout
        assert f"CLOUD True {head.home / 'ray-scout'}" in run.stdout, (
            "the cloud task must import the ray_scout that setup installed on the node: "
            + run.stdout)

        down = _ray("down", "-y", str(config_path), env=env, timeout=180)
        assert down.returncode == 0, down.stdout[-4000:] + down.stderr[-4000:]
        deadline = time.monotonic() + 15
        while _ray_processes_in(head.ns) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_processes_in(head.ns), (
            "ray down returned 0 but Ray survives on the node:\n"
            + "\n".join(_ray_processes_in(head.ns)))
    finally:
        if head is not None:
            head.stop()
        for d in set(Path("/tmp").glob("ray_ssh_*")) - control_dirs_before:
            shutil.rmtree(d, ignore_errors=True)
        if made_ray_tmp:
            shutil.rmtree("/tmp/ray", ignore_errors=True)
        if made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)
        shutil.rmtree(tmp_path, ignore_errors=True)
        shutil.rmtree(tmp_path, ignore_errors=True)
