"""`scout run`'s console holds the project's own lines and progress bars only: Ray's messages
(its C++ core worker's, its loggers', the actors' output) go to the run's log, on a normal
run, on Ctrl-C and on SIGTERM; `-v` puts them on the terminal instead.

Each case runs the real command on a short profiled spec (two agents, 3 s of arrivals) in
its own session and process group, as a terminal would. Once the first request is recorded,
Ctrl-C goes to the whole group (as a terminal sends it; the local Ray's daemons, started by
the run, are in it and ignore SIGINT) and SIGTERM to the driver alone (as `kill` and
`ray job stop` send it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="the run builds namespaces: "
                                 "needs root")]

REPO = Path(__file__).resolve().parents[1]
SPEC = {"name": "quiet", "fidelity": "profiled", "duration_s": 3, "seed": 0, "epoch_s": 0.5,
        "network": {"bottleneck": "lab", "impairment": "none"},
        "capacity": {"kind": "constant", "rate": "50mbit"},
        "cloud": {"slots": 2, "models": {"qwen2.5-7b": {"timing": "paper_b"}}},
        "agents": [{"name": "a", "count": 2, "model": "qwen2.5-7b", "context_tokens": [64],
                    "deadline_s": 1.5, "arrival_rate_hz": 1, "quality": "paper_b:3b-7b"}],
        "policies": ["static:int4"], "allocators": ["equal"]}
# What Ray says on its own: its C++ log lines ("[2026-... E 123 123] core_worker.cc:..."),
# its loggers, the actors' lines it forwards ("(a0 pid=...)"), the token banner, tracebacks.
RAY_INTERNALS = re.compile(r"\.cc:\d+|\bE\d{4}|Token authentication|retries remaining|"
                           r"\bpid=\d+|WARNING|INFO|Traceback|\bray\b|Ray ", re.IGNORECASE)
PROGRESS = re.compile(r"static:int4 / equal: +\d+%")


def _console_lines(text: str) -> list[str]:
    """Console text as a terminal shows it: tqdm redraws with carriage returns."""
    return [part.strip() for line in text.splitlines() for part in line.split("\r")
            if part.strip()]


def _run(tmp_path: Path, stop: signal.Signals | None,
         *flags: str) -> tuple[int, list[str], Path, int]:
    spec = tmp_path / "quiet.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.Popen([sys.executable, "-m", "ray_scout.cli", "run", str(spec),
                            "--out", str(out), *flags], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if stop is not None:
            rows = out / "raw" / "00_static-int4_equal" / "requests.jsonl"
            deadline = time.monotonic() + 180
            while not rows.exists() and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert rows.exists(), "no request was recorded within 180 s"
            if stop == signal.SIGINT:
                os.killpg(run.pid, stop)
            else:
                os.kill(run.pid, stop)
        console, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    return run.returncode, _console_lines(console.decode(errors="replace")), out, run.pid


def _own_lines_only(lines: list[str]) -> list[str]:
    return [line for line in lines if RAY_INTERNALS.search(line) and not PROGRESS.match(line)]


def test_a_normal_run_prints_progress_and_the_results_line_only(tmp_path):
    rc, lines, out, _ = _run(tmp_path, None)
    assert rc == 0, lines
    assert not _own_lines_only(lines), lines
    assert [line for line in lines if not PROGRESS.match(line)] == [
        f"results in {out} (summary.md)"], lines
    log = (out / "run.log").read_text()
    # The actors' own lines went to the run's log: the agents' status, the allocator's split.
    assert re.search(r"a0 qwen2.5-7b static:int4/equal: mode int4, grant 25\.0 Mbit/s, "
                     r"hits \d+/\d+", log), log[-3000:]
    assert "Allocator equal: 50.0 Mbit/s split at t=0.0 s" in log, log[-3000:]
    # Actors with restarts get other actors by name: no #53727 warning, even in the log.
    assert "constructor arguments in the object store" not in log, log[-3000:]


def test_verbose_puts_the_actors_lines_on_the_terminal_instead(tmp_path):
    rc, lines, out, _ = _run(tmp_path, None, "-v")
    assert rc == 0, lines
    console = "\n".join(lines)
    assert re.search(r"a0 qwen2.5-7b static:int4/equal: mode int4, grant 25\.0 Mbit/s, "
                     r"hits \d+/\d+", console), console[-3000:]
    assert "Allocator equal: 50.0 Mbit/s split at t=0.0 s" in console, console[-3000:]
    assert f"results in {out} (summary.md)" in lines, lines[-5:]
    assert not (out / "run.log").exists()


@pytest.mark.parametrize("stop, rc, said", [
    (signal.SIGINT, 130, "scout run: interrupted; links and actors were torn down"),
    (signal.SIGTERM, 143, "scout run: stopped (SIGTERM); links and actors were torn down")])
def test_ctrl_c_and_sigterm_tear_down_and_say_so_in_one_line(tmp_path, stop, rc, said):
    from pyroute2 import netns

    code, lines, out, pid = _run(tmp_path, stop)
    assert code == rc, lines
    assert not _own_lines_only(lines), lines
    own = [line for line in lines if not PROGRESS.match(line)]
    assert len(own) == 1 and own[0].startswith(said + ", the rows of finished requests are in"), \
        lines
    assert "`scout run --resume" in own[0]
    # The runner names its namespaces rs-<pid % 0xFFFF as 4 hex><trial>-...
    assert not [n for n in netns.listnetns() if n.startswith(f"rs-{pid % 0xFFFF:04x}")]
