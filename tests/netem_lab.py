"""Tests marked ``netem`` run where sch_netem is: on this host if its kernel has it, otherwise
all together in one boot of the netem lab (``ray_scout.net.labkernel``), each reported here
under its own name with the outcome, output and traceback it had in the guest.

Two halves of one plugin. On the host (``tests/conftest.py`` imports the hooks): collect the
marked tests, boot the lab once, run them there with this module as the guest's reporter,
then replay every guest report as this session's own. In the guest (``-p netem_lab`` with
``--noconftest``: the conftest imports torch, minutes under TCG): write each report as one JSON
line to the file ``RAY_SCOUT_LAB_REPORT`` names.

A test skips with the reason only where neither runs: not root (qdiscs need it), or no netem
here and the lab cannot start (QEMU, kernel or busybox missing: scripts/setup.sh installs them).
In CI (``CI=true``) a lab that cannot start fails every marked test with that reason instead:
CI must run them, so a broken install cannot pass as skipped tests.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from _pytest.reports import TestReport
from ci import in_ci

from ray_scout.net.labkernel import LabUnavailable, check_lab, in_lab, run_in_lab

REPORT_ENV = "RAY_SCOUT_LAB_REPORT"
LAB_TIMEOUT_S = 1800.0  # the lab tests together; `scout run` in the guest alone takes 10-14 min (docs/LINKS.md)
_ITEMS = pytest.StashKey[list]()
_RESULTS = pytest.StashKey[dict]()


def _host_has_netem() -> bool:
    from ray_scout.net.probe import probe

    return probe().netem


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("netem")]
    if not marked or in_lab():
        return
    if os.geteuid() != 0:
        reason = "needs root: netem qdiscs need CAP_NET_ADMIN, and the netem lab reads /boot"
    elif _host_has_netem():
        return  # this kernel has netem: the tests run here, as any other
    else:
        try:
            check_lab()
        except LabUnavailable as error:
            reason = f"this kernel has no sch_netem and the netem lab cannot start: {error}"
            if in_ci():  # run them anyway: the lab's own error fails each one (see _run_lab)
                config.stash[_ITEMS] = marked
                return
        else:
            config.stash[_ITEMS] = marked
            return
    for item in marked:
        item.add_marker(pytest.mark.skip(reason=reason))


def _run_lab(config) -> dict:
    """Run every lab test in one guest; return {nodeid: [report dicts]} plus the run's facts."""
    out = Path(tempfile.mkdtemp(prefix="rs-labrep-"))
    report = out / "reports.jsonl"
    root = str(config.rootpath)
    nodeids = [item.nodeid for item in config.stash[_ITEMS]]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
               "-p", "netem_lab", *nodeids]
    # Entry-point plugins (hypothesis, Ray's, ...) cost a minute of imports under TCG; none is needed.
    env = {REPORT_ENV: str(report), "PYTHONPATH": f"{root}:{root}/tests", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    with open(out / "console.log", "w") as console:
        try:
            run = run_in_lab(command, cwd=root, writable=(out,), env=env, console=console,
                             timeout_s=LAB_TIMEOUT_S)
            facts = {"returncode": run.returncode, "boot_s": run.boot_s, "wall_s": run.wall_s,
                     "summary": next((line for line in reversed(run.console.splitlines())
                                      if " in " in line and ("passed" in line or "failed" in line)), "")}
        except LabUnavailable as error:
            facts = {"returncode": None, "error": f"the netem lab cannot start: {error}"
                     + (" (CI=true: these tests must run in CI)" if in_ci() else "")}
    reports: dict[str, list] = {}
    if report.is_file():
        for line in report.read_text().splitlines():
            record = json.loads(line)
            reports.setdefault(record["nodeid"], []).append(record)
    facts["console_tail"] = (out / "console.log").read_text()[-4000:]
    return {"reports": reports, "facts": facts, "dir": out}


def _replay(item, records: list[dict]) -> None:
    keywords = {name: 1 for name in item.keywords}
    for record in records:
        longrepr = record["longrepr"]
        if record["outcome"] == "skipped" and isinstance(longrepr, list):
            longrepr = tuple(longrepr)
        item.ihook.pytest_runtest_logreport(report=TestReport(
            item.nodeid, item.location, keywords, record["outcome"], longrepr, record["when"],
            sections=[tuple(section) for section in record["sections"]], duration=record["duration"]))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if item not in item.config.stash.get(_ITEMS, ()):
        return None
    if _RESULTS not in item.config.stash:
        item.config.stash[_RESULTS] = _run_lab(item.config)
    results = item.config.stash[_RESULTS]
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    records = results["reports"].get(item.nodeid)
    if not records:
        facts = results["facts"]
        records = [{"when": "call", "outcome": "failed", "duration": 0.0, "sections": [],
                    "longrepr": f"the netem lab did not report this test (guest exit {facts.get('returncode')}, "
                                f"{facts.get('error', '')}); its console ended with:\n{facts['console_tail']}"}]
    _replay(item, records)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def pytest_terminal_summary(terminalreporter):
    results = terminalreporter.config.stash.get(_RESULTS, None)
    if results is None:
        return
    facts = results["facts"]
    # The console log is kept for a run that failed, removed otherwise.
    failed = facts.get("returncode") != 0
    if not failed:
        shutil.rmtree(results["dir"], ignore_errors=True)
    terminalreporter.write_line(
        f"netem lab: {len(results['reports'])} tests ran in the guest kernel; command started "
        f"{facts.get('boot_s', float('nan')):.1f} s after QEMU, whole run {facts.get('wall_s', float('nan')):.1f} s; "
        f"guest said: {facts.get('summary') or facts.get('error', '')}"
        + (f" (console: {results['dir']}/console.log)" if failed else ""))


# --- guest half -------------------------------------------------------------------------

def pytest_runtest_logreport(report):
    path = os.environ.get(REPORT_ENV)
    if not path or not in_lab():
        return
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):
        longrepr = list(longrepr)
    elif longrepr is not None:
        longrepr = str(longrepr)
    record = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome, "longrepr": longrepr,
              "duration": report.duration, "sections": [list(section) for section in report.sections]}
    with open(path, "a") as out:
        out.write(json.dumps(record) + "\n")
