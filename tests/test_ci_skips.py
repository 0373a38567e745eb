"""CI runs what it must: a missing required tool or module fails there instead of skipping."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def test_no_test_turns_a_broken_import_into_a_skip():
    # importorskip on a required dependency or on the project's own modules hides a broken
    # install or a deleted module as a skip; import them, and let a missing tool go through
    # the `missing` fixture, which fails in CI.
    users = [p.name for p in TESTS.glob("test_*.py")
             if re.search(r"importorskip\(", p.read_text()) and p.name != Path(__file__).name]
    assert users == []


def test_a_missing_tool_skips_on_a_dev_machine_and_fails_in_ci(missing, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        missing("frobnicator missing")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="frobnicator"):
        missing("frobnicator missing")


def test_ci_sets_ci_true():
    assert 'CI="${CI:-true}"' in (TESTS.parent / ".ci" / "run").read_text()


def test_ci_selects_every_marker_the_long_fuzz_included():
    # The `long` tests (10,000 fuzzed inputs per decoder) and the root/ray ones (Ctrl-C, faults,
    # 400 hostile connections) are CI's to run: neither `make test` nor pytest's options may
    # deselect a marker or a name.
    import tomllib

    root = TESTS.parent
    assert "make test" in (root / ".ci" / "run").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", (root / "Makefile").read_text(), re.M).group(1)
    arguments = recipe.split("pytest", 1)[1]  # what pytest is given (not python's own -m)
    options = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    for where in (arguments, str(options.get("addopts", ""))):
        assert not re.search(r"(^|\s)(-m|-k|--deselect|--ignore)\b", where), where


def test_in_ci_a_netem_lab_that_cannot_start_fails_the_netem_tests_instead_of_skipping(monkeypatch):
    import netem_lab

    from ray_scout.net.labkernel import LabUnavailable

    class Item:
        nodeid = "tests/test_x.py::test_netem"

        def __init__(self):
            self.markers = []

        def get_closest_marker(self, name):
            return name == "netem" or None

        def add_marker(self, marker):
            self.markers.append(marker)

    def no_lab():
        raise LabUnavailable("qemu-system-x86_64 is not installed")

    monkeypatch.setattr(netem_lab, "_host_has_netem", lambda: False)
    monkeypatch.setattr(netem_lab, "check_lab", no_lab)
    monkeypatch.setattr(netem_lab.os, "geteuid", lambda: 0)
    for ci, skipped in (("true", False), ("", True)):
        monkeypatch.setenv("CI", ci)
        config, item = type("Config", (), {"stash": pytest.Stash()})(), Item()
        netem_lab.pytest_collection_modifyitems(config, [item])
        assert bool(item.markers) is skipped
        assert (netem_lab._ITEMS in config.stash) is not skipped
    monkeypatch.setattr(netem_lab, "run_in_lab", lambda *args, **kwargs: no_lab())
    monkeypatch.setenv("CI", "true")
    config.rootpath, config.stash[netem_lab._ITEMS] = TESTS.parent, [item]
    results = netem_lab._run_lab(config)
    shutil.rmtree(results["dir"])
    facts = results["facts"]
    assert facts["returncode"] is None and "qemu-system-x86_64" in facts["error"] and "CI=true" in facts["error"]
