"""Run ownership: a live run's namespaces are never taken by a cleanup; a dead run's are
(SIGKILL included), and nothing of unknown origin is called stale."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from pyroute2 import netns

from ray_scout.net import owner
from ray_scout.net.errors import NetError
from ray_scout.net.topology import pid_run_id


def claim_in_child(prefix: str, owners_dir: str, namespace: str | None = None) -> subprocess.Popen:
    """A process that claims ``prefix`` (and makes ``namespace``), says so, then waits to be
    killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from ray_scout.net import owner
        owner.OWNERS_DIR = {owners_dir!r}
        claim = owner.Ownership({prefix!r})
        if {namespace!r}:
            from ray_scout.net.namespaces import create_netns
            create_netns({namespace!r}).close()
        print("claimed", flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert child.stdout.readline().strip() == "claimed"
    return child


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(10)


def test_a_live_claim_is_never_stale_and_a_sigkilled_one_is(tmp_path, monkeypatch):
    monkeypatch.setattr(owner, "OWNERS_DIR", str(tmp_path))
    mine = owner.Ownership("rs-aaaa01-")
    child = claim_in_child("rs-bbbb02-", str(tmp_path))
    try:
        assert sorted(owner.live_prefixes()) == ["rs-aaaa01-", "rs-bbbb02-"]
        assert list(owner.stale_prefixes()) == []
        with pytest.raises(NetError, match=f"live process \\(pid {child.pid}\\)"):
            owner.Ownership("rs-bbbb02-")
    finally:
        kill(child)
    # The kernel dropped the dead child's lock: its prefix is stale, once; its file goes.
    assert owner.live_prefixes() == ["rs-aaaa01-"]
    assert list(owner.stale_prefixes()) == ["rs-bbbb02-"]
    assert sorted(os.listdir(tmp_path)) == ["rs-aaaa01-.lock"]
    mine.release(forget=True)
    assert os.listdir(tmp_path) == [] and owner.live_prefixes() == []


def test_a_claim_on_a_dead_owners_prefix_inherits_it(tmp_path, monkeypatch):
    monkeypatch.setattr(owner, "OWNERS_DIR", str(tmp_path))
    child = claim_in_child("rs-cccc03-", str(tmp_path))
    kill(child)
    again = owner.Ownership("rs-cccc03-")
    assert again.inherited == str(child.pid)
    again.release(forget=True)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_SYS_ADMIN) to create namespaces")
def test_stale_cleanup_takes_a_dead_runs_namespaces_only_and_cleanup_spares_live_runs(capsys):
    from ray_scout.cli import main
    from ray_scout.net.cleanup import cleanup, remove_stale
    from ray_scout.net.namespaces import create_netns

    run = pid_run_id()
    dead, live, unowned = (f"rs-{run}{tag}-" for tag in "dlu")
    child = claim_in_child(dead, owner.OWNERS_DIR, dead + "x")
    kill(child)
    mine = owner.Ownership(live)
    create_netns(live + "x").close()
    create_netns(unowned + "x").close()
    try:
        removed = remove_stale()
        assert removed[dead].namespaces == (dead + "x",)
        assert {live + "x", unowned + "x"} <= set(netns.listnetns())
        assert dead + "x" not in netns.listnetns()
        # A plain cleanup takes what has no owner, never a live run's; the CLI says which.
        assert cleanup(f"rs-{run}").namespaces == (unowned + "x",)
        assert main(["net", "cleanup", "--prefix", f"rs-{run}"]) == 0
        out = capsys.readouterr().out
        assert "removed: 0 namespaces" in out and f"{live}* pid {os.getpid()}" in out
        assert live + "x" in netns.listnetns()
    finally:
        for name in (dead + "x", live + "x", unowned + "x"):
            if name in netns.listnetns():
                netns.remove(name)
        mine.release(forget=True)


def test_a_run_whose_stale_cleanup_fails_says_so_in_one_line_and_goes_on(monkeypatch):
    import io

    from ray_scout.experiments import runner
    from ray_scout.net import cleanup

    def refuse():
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(cleanup, "remove_stale", refuse)
    said = io.StringIO()
    runner._remove_stale_links(said)
    assert said.getvalue().count("\n") == 1
    assert "could not remove what a dead run left" in said.getvalue()
    assert "scout net cleanup --stale" in said.getvalue()
