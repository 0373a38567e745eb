"""The netem lab: a real Linux kernel with sch_netem, booted under QEMU to run one command.

What lives here: finding a bootable kernel whose modules include ``sch_netem`` (Debian's
``linux-image-amd64``), building a small initramfs (``busybox-static`` and the virtio/9p
modules, written as a newc cpio by this module), and running one command in the guest with
the host's root shared read-only over 9p, so the guest runs the host's Python on this tree.
The console streams back; the command's exit code is the run's.

What it knows: the guest has only a loopback interface, so every namespace, veth and qdisc a
test makes stays inside it. Writable places in the guest are tmpfs (``/tmp``, ``/run``,
``/dev/shm``) plus the host paths given as ``writable`` (shared read-write over 9p at the same
path; a working directory under ``/tmp`` or ``/run`` is shared read-only the same way, so a
checkout there stays visible). Kernel modules load on demand from the host's ``/lib/modules`` (the guest's
``kernel.modprobe`` helper chroots into the host root). TCG, not KVM: on these machines
``/dev/kvm`` is a nested hypervisor in which guests hang in early boot, and TCG slows the
guest's clock-sensitive work; ``guest_timer_error`` measures how much (its figures go beside
every timing taken in the lab).

What it leaves to others: what the command does (tests, benchmarks), and the netem code under
test (``shaping``, ``backends``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ray_scout.net.errors import CapabilityError

IN_LAB_ENV = "RAY_SCOUT_IN_LAB"  # set to "1" inside the guest
KERNEL_ENV = "RAY_SCOUT_LAB_KERNEL"  # a vmlinuz path, to pick one kernel among several
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ray-scout" / "lab"
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
QBOOT = Path("/usr/share/qemu/qboot.rom")  # minimal firmware: jumps to the kernel without SeaBIOS's probing
START_MARK = "RS-LAB-START"
ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")
# What mounting the host root needs (with their dependencies from modules.dep); everything
# else loads on demand in the guest.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
# Host environment the command keeps; everything else is dropped (the guest is another machine).
KEPT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TERM", "PYTHONPATH", "VIRTUAL_ENV", "PYENV_VERSION")
SETUP_HINT = ("install the lab's packages with `bash scripts/setup.sh` as root (qemu-system-x86, "
              "linux-image-amd64, busybox-static)")


class LabUnavailable(CapabilityError):
    """QEMU, a netem-capable kernel or busybox is missing here; the message says which."""


@dataclass(frozen=True)
class LabKernel:
    """A bootable kernel image and the module tree that belongs to it."""

    vmlinuz: Path
    release: str

    @property
    def modules(self) -> Path:
        return Path("/lib/modules") / self.release


@dataclass(frozen=True)
class LabRun:
    """What one lab run did: the command's exit code, and where the time went."""

    returncode: int
    boot_s: float  # QEMU start to the guest starting the command
    wall_s: float  # QEMU start to QEMU gone
    console: str


def in_lab() -> bool:
    """True inside the guest (the command's environment says so)."""
    return os.environ.get(IN_LAB_ENV) == "1"


def _has_netem(release: str) -> bool:
    base = Path("/lib/modules") / release / "kernel" / "net" / "sched"
    return any(base.glob("sch_netem.ko*"))


def find_kernel() -> LabKernel:
    """The newest ``/boot/vmlinuz-*`` whose modules include sch_netem (or ``$RAY_SCOUT_LAB_KERNEL``)."""
    chosen = os.environ.get(KERNEL_ENV)
    candidates = [Path(chosen)] if chosen else sorted(Path("/boot").glob("vmlinuz-*"), reverse=True)
    for vmlinuz in candidates:
        release = vmlinuz.name.removeprefix("vmlinuz-")
        if vmlinuz.is_file() and _has_netem(release):
            return LabKernel(vmlinuz, release)
    where = chosen or "/boot/vmlinuz-*"
    raise LabUnavailable(f"no kernel with sch_netem among {where} (modules under /lib/modules/<release>); "
                         f"{SETUP_HINT}")


def check_lab() -> LabKernel:
    """Raise ``LabUnavailable`` saying what is missing, else return the kernel the lab boots."""
    if shutil.which(QEMU) is None:
        raise LabUnavailable(f"{QEMU} is not installed; {SETUP_HINT}")
    if not BUSYBOX.is_file():
        raise LabUnavailable(f"{BUSYBOX} (busybox-static) is not installed; {SETUP_HINT}")
    kernel = find_kernel()
    if not os.access(kernel.vmlinuz, os.R_OK):
        raise LabUnavailable(f"{kernel.vmlinuz} is not readable by this user; run the lab as root")
    return kernel


def _module_files(kernel: LabKernel) -> list[Path]:
    """The boot modules and what they depend on, in load order (built-ins are absent from
    modules.dep and need nothing). modules.dep lists a module's dependencies last-loaded first."""
    deps: dict[str, list[str]] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        path, _, needs = line.partition(":")
        deps[path] = needs.split()
    by_name = {re.sub(r"\.ko(\..*)?$", "", Path(path).name): path for path in deps}
    order: list[str] = []
    for name in BOOT_MODULES:
        if name in by_name:
            path = by_name[name]
            order += [p for p in [*reversed(deps[path]), path] if p not in order]
    return [kernel.modules / path for path in order]


INIT_SCRIPT = r"""#!/bin/busybox sh
# ray-scout netem lab: mount the host root read-only, give it writable scratch, run the job.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for module in /modules/*.ko; do insmod "$module" || echo "rs-lab: insmod $module failed"; done
H=/host
mkdir -p $H
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose rsroot $H || {
    echo "rs-lab: cannot mount the host root over 9p"; poweroff -f; }
for dir in run tmp; do mount -t tmpfs -o mode=1777 tmpfs $H/$dir; done
mount -t proc proc $H/proc; mount -t sysfs sys $H/sys; mount -t devtmpfs dev $H/dev
mkdir -p $H/dev/pts $H/dev/shm $H/run/netns $H/run/rs-lab
mount -t devpts devpts $H/dev/pts; mount -t tmpfs -o mode=1777 tmpfs $H/dev/shm
mount -t cgroup2 cgroup2 $H/sys/fs/cgroup 2>/dev/null
mount -t debugfs debugfs $H/sys/kernel/debug 2>/dev/null
mount -t bpf bpf $H/sys/fs/bpf 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 rsjob $H/run/rs-lab
while read -r tag access path; do
    mkdir -p "$H$path"
    mount -t 9p -o "trans=virtio,version=9p2000.L,msize=524288,$access" "$tag" "$H$path"
done < $H/run/rs-lab/shares
# Modules (qdiscs, veth, ...) load on demand from the host's /lib/modules.
printf '#!/bin/busybox sh\nexec /bin/busybox chroot /host /sbin/modprobe "$@"\n' > /bin/rs-modprobe
chmod 755 /bin/rs-modprobe; echo /bin/rs-modprobe > /proc/sys/kernel/modprobe
ip link set lo up; hostname rs-lab
echo "RS-LAB-START $(cut -d' ' -f1 /proc/uptime)"
chroot $H /bin/sh /run/rs-lab/command.sh < /dev/console
echo $? > $H/run/rs-lab/rc
sync; poweroff -f
"""


def _cpio_entry(out: io.BytesIO, name: str, mode: int, data: bytes = b"", ino: int = 0) -> None:
    """One newc cpio record (the format the kernel unpacks into its initramfs)."""
    name_bytes = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_bytes), 0]
    out.write(b"070701" + b"".join(f"{value:08x}".encode() for value in fields))
    out.write(name_bytes + b"\0" * (-(110 + len(name_bytes)) % 4))
    out.write(data + b"\0" * (-len(data) % 4))


def build_initramfs(kernel: LabKernel, cache_dir: Path = CACHE_DIR) -> Path:
    """The lab's initramfs (gzip'd newc cpio), cached by its content; built in well under a second."""
    modules = _module_files(kernel)
    entries: list[tuple[str, int, bytes]] = [(d, stat.S_IFDIR | 0o755, b"")
                                             for d in ("bin", "dev", "proc", "sys", "modules", "host")]
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes()))
    entries.append(("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()))
    entries += [(f"modules/{n:02d}-{path.name}", stat.S_IFREG | 0o644, path.read_bytes())
                for n, path in enumerate(modules)]
    digest = hashlib.sha256()
    for name, mode, data in entries:
        digest.update(name.encode() + mode.to_bytes(4, "little") + hashlib.sha256(data).digest())
    target = cache_dir / f"initramfs-{kernel.release}-{digest.hexdigest()[:16]}.cpio.gz"
    if target.is_file():
        return target
    raw = io.BytesIO()
    for ino, (name, mode, data) in enumerate(entries, start=1):
        _cpio_entry(raw, name, mode, data, ino)
    _cpio_entry(raw, "TRAILER!!!", 0)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.part")
    partial.write_bytes(gzip.compress(raw.getvalue(), compresslevel=6))
    partial.replace(target)
    return target


def _command_script(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    kept = {key: os.environ[key] for key in KEPT_ENV if key in os.environ}
    kept.update({IN_LAB_ENV: "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}, **env)
    exports = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in sorted(kept.items()))
    return f"{exports}cd {shlex.quote(str(cwd))} || exit 125\n{shlex.join(command)}\n"


def qemu_command(kernel: LabKernel, initramfs: Path, job_dir: Path,
                 shares: list[tuple[Path, bool]], *, memory_mib: int, cpus: int) -> list[str]:
    """The QEMU invocation: TCG, no network device, serial console on stdio, 9p shares
    (``shares``: host directories mounted at the same path, each with whether it is writable).

    ``-cpu max``: every feature TCG emulates. numpy 2.x needs x86-64-v2 (SSE4.2, POPCNT);
    under ``-cpu qemu64`` the guest's Python died of SIGILL importing it.
    """
    share = "local,security_model=none,multidevs=remap"
    command = [QEMU, "-accel", "tcg", "-cpu", "max", "-m", str(memory_mib), "-smp", str(cpus),
               "-nographic", "-no-reboot", "-nic", "none",
               "-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs),
               *(["-bios", str(QBOOT)] if QBOOT.is_file() else []),
               "-append", "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init tsc=reliable clocksource=tsc",
               "-virtfs", f"{share},path=/,mount_tag=rsroot,readonly=on",
               "-virtfs", f"{share},path={job_dir},mount_tag=rsjob"]
    for n, (path, writable) in enumerate(shares):
        command += ["-virtfs", f"{share},path={path},mount_tag=rsw{n}"
                    + ("" if writable else ",readonly=on")]
    return command


# The guest mounts its own tmpfs here, over what the host has there.
GUEST_TMPFS = (Path("/tmp"), Path("/run"))


def _shares(cwd: Path, writable: list[Path]) -> list[tuple[Path, bool]]:
    """The writable directories, plus ``cwd`` read-only where the guest's tmpfs would hide it
    (a checkout under /tmp) and no writable share holds it."""
    hidden = any(cwd.is_relative_to(tmp) for tmp in GUEST_TMPFS)
    held = any(cwd.is_relative_to(path) for path in writable)
    return [(path, True) for path in writable] + ([(cwd, False)] if hidden and not held else [])


def run_in_lab(command: list[str], *, cwd: Path | str | None = None, writable: tuple[Path | str, ...] = (),
               env: dict[str, str] | None = None, memory_mib: int = 2048, cpus: int = 2,
               timeout_s: float = 600.0, console: TextIO | None = sys.stdout) -> LabRun:
    """Boot the lab, run ``command`` in ``cwd`` (default: here) as root, return its exit code.

    ``writable``: host directories the command may write (shared read-write at the same path);
    the rest of the host is read-only in the guest. ``console`` receives the guest's console as
    it comes (None: keep it only in the result). A command still running at ``timeout_s`` is
    killed with the guest and the run returns 124.
    """
    if not command:
        raise ValueError("give the command to run in the lab, e.g. ['python3', '-m', 'pytest', 'tests/']")
    kernel = check_lab()
    initramfs = build_initramfs(kernel)
    cwd = Path(cwd or os.getcwd()).resolve()
    writable_dirs = [Path(p).resolve() for p in writable]
    for path in writable_dirs:
        if not path.is_dir():
            raise ValueError(f"writable path {path} is not a directory on this host; create it first")
    shares = _shares(cwd, writable_dirs)
    with tempfile.TemporaryDirectory(prefix="rs-lab-") as job:
        job_dir = Path(job)
        (job_dir / "command.sh").write_text(_command_script(command, cwd, env or {}))
        (job_dir / "shares").write_text("".join(
            f"rsw{n} {'rw' if writable else 'ro'} {path}\n"
            for n, (path, writable) in enumerate(shares)))
        qemu = qemu_command(kernel, initramfs, job_dir, shares, memory_mib=memory_mib, cpus=cpus)
        start = time.monotonic()
        process = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
        timer = threading.Timer(timeout_s, process.kill)
        timer.start()
        lines, boot_s = [], float("nan")
        try:
            for raw in process.stdout:
                # Firmware and console resets send terminal escapes; the log keeps text only.
                line = ESCAPES.sub("", raw.decode(errors="replace").replace("\r", ""))
                if boot_s != boot_s and START_MARK in line:
                    boot_s = time.monotonic() - start
                lines.append(line)
                if console is not None:
                    console.write(line)
                    console.flush()
            qemu_rc = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
        wall_s = time.monotonic() - start
        rc_file = job_dir / "rc"
        text = "".join(lines)
        if rc_file.is_file():
            returncode = int(rc_file.read_text().strip() or 125)
        elif wall_s >= timeout_s:
            returncode = 124
        else:
            raise LabUnavailable(f"the lab guest stopped before the command finished (qemu exit {qemu_rc}); "
                                 f"its console ended with:\n{text[-3000:]}")
    return LabRun(returncode, boot_s, wall_s, text)


@dataclass(frozen=True)
class TimerError:
    """How late the kernel wakes a sleeper for ``target_s`` (hrtimers, as netem's watchdog uses).

    Measured where it runs (in the guest, TCG's cost shows here): overshoot beyond the target.
    """

    target_s: float
    samples: int
    median_s: float
    p99_s: float
    max_s: float
    clocksource: str

    def as_row(self) -> dict:
        return dict(self.__dict__)


def timer_error(target_s: float = 0.001, samples: int = 500) -> TimerError:
    """Sleep ``samples`` times for ``target_s`` and report the overshoot (median, p99, max)."""
    overshoot = []
    for _ in range(samples):
        start = time.monotonic_ns()
        time.sleep(target_s)
        overshoot.append((time.monotonic_ns() - start) / 1e9 - target_s)
    overshoot.sort()
    try:
        clocksource = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource").read_text().strip()
    except OSError:
        clocksource = "unknown"
    return TimerError(target_s, samples, overshoot[samples // 2], overshoot[min(samples - 1, int(0.99 * samples))],
                      overshoot[-1], clocksource)
