"""The ``scout`` command as a new user meets it: help that explains, errors that say what to
write, names that are found, and records of what ran."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from ray_scout.cli import COMMANDS, build_parser, main
from ray_scout.experiments.spec import (
    REPO_ROOT, SpecError, load_spec, parse_spec, spec_path, spec_text_as_run,
)
from ray_scout.net.errors import NetError
from ray_scout.net.profiles import parse_rate_bps, profile_from_dict


def _options_without_help(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                missing += _options_without_help(child, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_option_of_every_subcommand_has_help_text():
    assert _options_without_help(build_parser(), "scout") == []


def test_run_help_explains_the_three_fidelities(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for fidelity, words in (("full", "real models"), ("profiled", "slept"),
                            ("simulated", "modelled")):
        assert fidelity in text and words in text


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in COMMANDS])
def test_help_answers_without_importing_torch_or_ray(argv):
    # A fresh interpreter per command: what --help imported is what sys.modules holds after.
    code = ("import sys\nfrom ray_scout.cli import main\ntry:\n    main(%r)\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))" % argv)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: scout" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_net_profiles_prints_a_table_in_the_units_of_the_yaml(capsys):
    assert main(["net", "profiles"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| profile | direction | rate (Mbit/s)")
    # netem/lab.yaml: 50mbit, rate only.
    assert "| lab | up | 50 | 0 | 0 | - | 0.00% |" in "\n".join(lines)
    assert not any("LinkProfile(" in line for line in lines)


# --- rates: one spelling, bits ---------------------------------------------------------
@pytest.mark.parametrize("text", ["50 Mbps", "50MBps", "50mbps", "2gbps", "800kbps", "9bps"])
def test_ambiguous_rate_units_are_refused_with_the_spelling_to_use(text):
    with pytest.raises(NetError, match=r"ambiguous.*write \d+[kmg]?bit"):
        parse_rate_bps(text)


@pytest.mark.parametrize("text, rate_bps", [("50mbit", 50_000_000), ("50 Mbit/s", 50_000_000),
                                            ("1.5Gbit", 1_500_000_000), ("64kbit", 64_000)])
def test_rates_in_bits_are_read(text, rate_bps):
    assert parse_rate_bps(text) == rate_bps


def test_an_ambiguous_rate_is_refused_in_a_profile_a_spec_and_the_cli(capsys):
    with pytest.raises(NetError, match="write 20mbit"):
        profile_from_dict({"rate": "20Mbps"})
    doc = yaml.safe_load((REPO_ROOT / "experiments" / "adaptive_vs_static.yaml").read_text())
    doc["capacity"] = {"kind": "constant", "rate": "50MBps"}
    with pytest.raises(SpecError, match="capacity.rate.*write 50mbit"):
        parse_spec(doc)
    with pytest.raises(SystemExit):
        main(["net", "up", "--rate", "50Mbps"])
    assert "write 50mbit" in capsys.readouterr().err


# --- specs ------------------------------------------------------------------------------
def test_a_spec_given_by_bare_name_is_found_in_experiments():
    assert spec_path("adaptive_vs_static") == REPO_ROOT / "experiments" / "adaptive_vs_static.yaml"
    assert load_spec("adaptive_vs_static").name == "adaptive_vs_static"
    with pytest.raises(SpecError, match="adaptive_vs_static"):  # the message lists them
        spec_path("adaptive_vs_statc")


@pytest.mark.parametrize("section, typo, known", [
    ("cloud", {"slot": 2}, "max_batch, models, slots"),
    ("capacity", {"kind": "constant", "rate": "50mbit", "step": 1}, "kind, path, rate"),
    ("network", {"bottleneck": "lab", "borow": True}, "access_rate, borrow"),
])
def test_a_nested_key_typo_lists_the_known_keys(section, typo, known):
    doc = yaml.safe_load((REPO_ROOT / "experiments" / "adaptive_vs_static.yaml").read_text())
    doc[section] = typo
    with pytest.raises(SpecError, match=f"{section}: unknown keys.*known: .*{known}"):
        parse_spec(doc)


def test_an_agent_key_typo_lists_the_known_keys():
    doc = yaml.safe_load((REPO_ROOT / "experiments" / "adaptive_vs_static.yaml").read_text())
    doc["agents"][0]["deadline"] = 1.0
    with pytest.raises(SpecError, match=r"agents\[0\]: unknown keys \['deadline'\]; known: .*"
                                        r"deadline_s"):
        parse_spec(doc)


def test_the_saved_spec_says_the_fidelity_that_ran_and_keeps_the_comments():
    text = (REPO_ROOT / "experiments" / "allocation_congestion.yaml").read_text()
    assert yaml.safe_load(text)["fidelity"] == "profiled"
    saved = spec_text_as_run(text, "simulated")
    assert yaml.safe_load(saved)["fidelity"] == "simulated"
    assert saved.splitlines()[0] == text.splitlines()[0]  # the leading comment stays
    assert {k: v for k, v in yaml.safe_load(saved).items() if k != "fidelity"} == \
        {k: v for k, v in yaml.safe_load(text).items() if k != "fidelity"}
    assert spec_text_as_run(text, "profiled") == text


def test_scout_run_saves_the_spec_that_ran_and_tables_with_headers(tmp_path):
    spec = tmp_path / "tiny.yaml"
    doc = yaml.safe_load((REPO_ROOT / "experiments" / "adaptive_vs_static.yaml").read_text())
    doc.update(duration_s=20, policies=["adaptive"])
    spec.write_text("# a comment\n" + yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "out"
    assert main(["run", str(spec), "--fidelity", "simulated", "--out", str(out),
                 "--no-progress"]) == 0
    assert yaml.safe_load((out / "spec.yaml").read_text())["fidelity"] == "simulated"
    # No link changed and nothing restarted in a simulated run: empty tables, with headers.
    for table, column in (("rate_changes", "rate_bps"), ("events", "event")):
        frame = pd.read_csv(out / f"{table}.csv")
        assert frame.empty and column in frame.columns
