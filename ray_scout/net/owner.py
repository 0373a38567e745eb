"""Who owns a run's namespaces: one lock file per run prefix, held by the process that built them.

The kernel drops an flock when its holder dies, SIGKILL included, so a run's lock that can be
taken means that no live process will tear that run's namespaces down: they are leftovers
(*stale*). A live run's lock cannot be taken, so nothing here ever touches a live run's
objects, and a reused pid cannot fool it (the lock is the process's open file, not its number).
Namespaces without a lock file (made by other tools, or by ray-scout before these locks) are
never called stale: only an explicit ``scout net cleanup`` removes them.

What it knows: the lock directory and the lock protocol. What it leaves to others: what a
prefix holds (``topology``) and removing it (``cleanup``).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

from ray_scout.net.errors import NetError

OWNERS_DIR = "/run/ray-scout/owners"  # tmpfs: gone at reboot, as the namespaces are
SUFFIX = ".lock"


def _path(prefix: str) -> str:
    return os.path.join(OWNERS_DIR, prefix + SUFFIX)


def _lock(path: str, *, create: bool) -> int | None:
    """An fd holding ``path``'s exclusive lock, or None while another process holds it
    (or, without ``create``, when there is no such file).

    The file is checked to still be the one at ``path`` once locked: a cleaner removes a
    stale lock file while holding its lock, and a lock on the removed file would guard
    nothing."""
    while True:
        try:
            # flock needs no write access: anyone may ask whether a run is alive.
            fd = os.open(path, os.O_CLOEXEC | (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY),
                         0o644)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
        if not create:
            return None


class Ownership:
    """This process's claim on ``prefix``: taken before its namespaces are made, released
    (with its file) once they are gone. Making one fails while a live process holds it."""

    def __init__(self, prefix: str):
        os.makedirs(OWNERS_DIR, exist_ok=True)
        self.prefix = prefix
        self._fd = _lock(_path(prefix), create=True)
        if self._fd is None:
            raise NetError(f"run prefix {prefix!r} belongs to a live process ({owner_of(prefix)}): "
                           "pick another run_id, or stop that run first")
        # A pid already written is a dead owner's: what carries the prefix is its leftovers.
        self.inherited = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self, *, forget: bool) -> None:
        """Give the claim up. ``forget``: the namespaces are gone, so the file goes too; else
        it stays, unlocked, and the next stale cleanup removes what is left."""
        if self._fd is None:
            return
        if forget:
            try:
                os.unlink(_path(self.prefix))
            except FileNotFoundError:
                pass
        os.close(self._fd)
        self._fd = None


def owner_of(prefix: str) -> str:
    """The pid written in ``prefix``'s lock file, in words (for messages)."""
    try:
        with open(_path(prefix)) as file:
            return f"pid {file.read().strip() or '?'}"
    except OSError:
        return "pid unknown"


def _lock_files() -> list[str]:
    try:
        return sorted(name for name in os.listdir(OWNERS_DIR) if name.endswith(SUFFIX))
    except FileNotFoundError:
        return []


def live_prefixes() -> list[str]:
    """The run prefixes whose owner is alive (their lock is held)."""
    live = []
    for name in _lock_files():
        fd = _lock(os.path.join(OWNERS_DIR, name), create=False)
        if fd is None:
            if os.path.exists(os.path.join(OWNERS_DIR, name)):
                live.append(name[:-len(SUFFIX)])
        else:
            os.close(fd)
    return live


def stale_prefixes() -> Iterator[str]:
    """Yield each run prefix whose owner is gone, holding its lock meanwhile: the caller
    removes what carries the prefix, then the lock file goes (the caller's loop body runs
    between the two). A live run's prefix is never yielded."""
    for name in _lock_files():
        path = os.path.join(OWNERS_DIR, name)
        fd = _lock(path, create=False)
        if fd is None:
            continue  # a live run's (or removed meanwhile by another cleaner)
        try:
            yield name[:-len(SUFFIX)]
            os.unlink(path)
        finally:
            os.close(fd)
