"""Experiments as Ray Jobs: submit a spec to a cluster, stop it, fetch its results.

What lives here: ``scout submit`` (Ray's Jobs API with the project as the job's
``working_dir``: the files git would commit, uncommitted edits included, plus the spec; the
entrypoint is ``scout run SPEC --address auto`` on the head node, so the Jobs tab shows it
with its log and status), ``scout stop`` (Ray's job stop: SIGTERM to the driver, which tears
links and actors down as on Ctrl-C, with time granted for it) and ``scout fetch`` (the
results directory the job wrote on the head, brought back with ``ray rsync-down`` or, when
the head is this machine, copied). What it leaves to others: the run itself
(``experiments.runner``), starting the cluster (``ray up``).
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ray_scout.experiments.spec import REPO_ROOT, SpecError, load_spec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # `ray dashboard clusters/lab.yaml` forwards it here
# Where a job writes its results on the head: beside the lab's synced checkout, where
# docs/LAB_GUIDE.md has `ray rsync-down` look.
RESULTS_ON_HEAD = "~/ray-scout/results"
SUBMITTED_SPECS = "experiments/submitted"  # where the packed project holds the job's spec
# Ray's job stop waits this long after SIGTERM before SIGKILL (Ray's default, 3 s, is less
# than a run needs to tear its links and actors down).
STOP_WAIT_S = 60
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60


class JobError(RuntimeError):
    """A job request that cannot be done; the message says what to do instead."""


def _client(address: str):
    import logging

    from ray.job_submission import JobSubmissionClient

    # Ray's INFO lines about packaging the working_dir are not the user's business.
    logging.getLogger("ray").setLevel(logging.WARNING)

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise JobError(f"no Ray dashboard at {address} ({exc}); on the launcher run "
                       "`ray dashboard clusters/lab.yaml` first, or pass --address") from None


def _when_agent_ready(call, timeout_s: float = AGENT_WAIT_S):
    """``call()``, again while the head says it has no job agent yet (a cluster just
    started: its dashboard answers before the agent that runs jobs has registered)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def job_id(spec_name: str, now: datetime.datetime | None = None) -> str:
    """A submission id that says which spec and when: ``scout-<spec>-<UTC time>``."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"scout-{re.sub(r'[^A-Za-z0-9_.-]', '-', spec_name)}-{now:%Y%m%d-%H%M%S}"


def project_files(root: Path = REPO_ROOT) -> list[str]:
    """The project as git sees it: tracked and untracked-but-not-ignored files that exist."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], cwd=root, capture_output=True,
                                check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise JobError(f"scout submit packs the project with `git ls-files`, which failed in "
                       f"{root} ({exc}); submit from a git checkout of ray-scout") from None
    return sorted({name for name in listed.decode().split("\0")
                   if name and (root / name).is_file()})


def pack(spec_path: Path, into: Path, root: Path = REPO_ROOT) -> str:
    """Copy the project and the spec into ``into``; returns the spec's path inside it."""
    for name in project_files(root):
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    inside = f"{SUBMITTED_SPECS}/{spec_path.name}"
    (into / SUBMITTED_SPECS).mkdir(parents=True, exist_ok=True)
    shutil.copy2(spec_path, into / inside)
    return inside


def submit(spec_path: Path, address: str, fidelity: str | None = None,
           submission_id: str | None = None, results: str = RESULTS_ON_HEAD) -> dict:
    """Submit ``spec_path`` as a Ray Job; returns its id, results path on the head, URL.

    The job writes to ``<results>/<job id>`` on the head (``~`` is the head's home)."""
    spec = load_spec(spec_path, fidelity)
    if spec.fidelity == "simulated":
        raise JobError("a simulated run needs no cluster: run it here with "
                       f"`scout run {spec_path} --fidelity simulated`")
    submission_id = submission_id or job_id(spec.name)
    out = f"{results.rstrip('/')}/{submission_id}"
    client = _client(address)
    with tempfile.TemporaryDirectory(prefix="scout-submit-") as staging:
        inside = pack(spec_path, Path(staging))
        entrypoint = " ".join(["python", "-m", "ray_scout.cli", "run", shlex.quote(inside),
                               "--address", "auto", "--out", out]
                              + (["--fidelity", fidelity] if fidelity else []))
        _when_agent_ready(lambda: client.submit_job(
            entrypoint=entrypoint, submission_id=submission_id,
            runtime_env={"working_dir": staging,
                         "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)}},
            # job_name: the Name column of the dashboard's Jobs tab.
            metadata={"job_name": spec.name, "ray_scout_spec": spec.name,
                      "spec_file": str(spec_path),
                      "fidelity": spec.fidelity, "results": out,
                      "trials": ", ".join(f"{i}: {p}/{a}"
                                          for i, (p, a) in enumerate(spec.combinations()))}))
    return {"job": submission_id, "results": out, "entrypoint": entrypoint,
            "dashboard": f"{address.rstrip('/')}/#/jobs/{submission_id}"}


def stop(submission_id: str, address: str, wait_s: float = STOP_WAIT_S + 10) -> str:
    """Stop a job and wait until Ray says it ended; returns its final status."""
    client = _client(address)
    client.stop_job(submission_id)
    deadline = time.monotonic() + wait_s
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in FINAL or time.monotonic() > deadline:
            return status
        time.sleep(1)


def results_path(submission_id: str, address: str) -> str:
    """Where the job wrote its results on the head (from the job's metadata)."""
    info = _client(address).get_job_info(submission_id)
    out = (info.metadata or {}).get("results")
    if not out:
        raise JobError(f"job {submission_id} was not submitted by `scout submit` (its "
                       "metadata names no results directory)")
    return out


def fetch(submission_id: str, address: str, to: Path, cluster: Path | None = None) -> Path:
    """Bring the job's results directory to ``to/<job>``: ``ray rsync-down`` from the head
    of ``cluster``, or a copy when the head is this machine."""
    remote = results_path(submission_id, address)
    target = to / submission_id
    target.parent.mkdir(parents=True, exist_ok=True)
    if cluster is None:
        local = Path(remote).expanduser()
        if not local.is_dir():
            raise JobError(f"{remote} is not on this machine; pass the cluster YAML "
                           f"(--cluster clusters/lab.yaml) to copy it from the head")
        shutil.copytree(local, target, dirs_exist_ok=True)
        return target
    down = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "rsync-down",
                           str(cluster), remote + "/", str(target) + "/"],
                          capture_output=True, text=True, timeout=600)
    if down.returncode != 0:
        raise JobError(f"ray rsync-down failed:\n{(down.stdout + down.stderr)[-2000:]}")
    return target


# --- CLI: three commands of `scout` -----------------------------------------------------
def _address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=DEFAULT_ADDRESS,
                        help=f"the Ray dashboard (default {DEFAULT_ADDRESS}, where "
                        "`ray dashboard clusters/lab.yaml` forwards the lab's)")


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, help="experiments/<name>.yaml")
    parser.add_argument("--fidelity", choices=("full", "profiled"),
                        help="override the spec's fidelity")
    parser.add_argument("--results", default=RESULTS_ON_HEAD,
                        help=f"folder on the head the job writes <job id>/ into (default "
                        f"{RESULTS_ON_HEAD})")
    _address(parser)


def add_stop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="the id `scout submit` printed")
    _address(parser)


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="the id `scout submit` printed")
    parser.add_argument("--cluster", type=Path,
                        help="the cluster YAML that `ray up` started (omit when the head is "
                        "this machine)")
    parser.add_argument("--to", type=Path, default=REPO_ROOT / "results",
                        help="local folder; results land in <to>/<job> (default results/)")
    _address(parser)


def run_submit(args: argparse.Namespace) -> int:
    try:
        job = submit(args.spec, args.address, args.fidelity, results=args.results)
    except (JobError, SpecError) as exc:
        print(f"scout submit: {exc}", file=sys.stderr)
        return 2
    print(f"submitted {job['job']}: {job['entrypoint']}")
    print(f"  watch: {job['dashboard']}  (or: ray job logs -f {job['job']} "
          f"--address {args.address})")
    print(f"  stop:  scout stop {job['job']}")
    print(f"  fetch: scout fetch {job['job']} --cluster clusters/lab.yaml   "
          f"(on the head: {job['results']})")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    try:
        status = stop(args.job, args.address)
    except JobError as exc:
        print(f"scout stop: {exc}", file=sys.stderr)
        return 2
    print(f"{args.job}: {status}")
    return 0 if status in FINAL else 1


def run_fetch(args: argparse.Namespace) -> int:
    try:
        where = fetch(args.job, args.address, args.to, args.cluster)
    except JobError as exc:
        print(f"scout fetch: {exc}", file=sys.stderr)
        return 2
    print(f"results of {args.job} in {where}")
    return 0
