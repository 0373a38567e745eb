"""``scout net``: probe the kernel, list link profiles, remove leftovers, hold a topology up, run a
command in the netem lab.

Thin over ``probe``, ``profiles``, ``cleanup``, ``topology`` and ``labkernel``; prints, never decides.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ray_scout.net import PREFIX
from ray_scout.net.cleanup import cleanup, find_leftovers, of_live_runs, remove_stale
from ray_scout.net.errors import CapabilityError, NetError, require_root
from ray_scout.net.owner import live_prefixes, owner_of
from ray_scout.net.probe import probe
from ray_scout.net.profiles import LinkProfile, list_profiles, load_profile, parse_rate_bps
from ray_scout.net.topology import LabTopology


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="net_command", required=True)
    sub.add_parser("probe", help="which qdiscs/classifiers/congestion controls this kernel has")
    sub.add_parser("profiles", help="list the link profiles in netem/")
    clean = sub.add_parser("cleanup", help="remove namespaces, links and qdiscs the project left (like mn -c)")
    clean.add_argument("--prefix", default=PREFIX, help=f"only objects starting with this (default {PREFIX})")
    clean.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    clean.add_argument("--stale", action="store_true",
                       help="only what runs whose process died (SIGKILL, a crash) left; the next "
                            "`scout run` does this by itself")
    lab = sub.add_parser("lab-kernel", help="boot the netem lab (a real kernel under QEMU) and run a command in it",
                         description="Run COMMAND in a QEMU guest with sch_netem, the host's root read-only, "
                                     "this directory as the working directory; exit with its exit code.")
    lab.add_argument("--writable", action="append", default=[], metavar="DIR",
                     help="a host directory the command may write (repeatable); the rest is read-only")
    lab.add_argument("--memory-mib", type=int, default=2048, help="the guest's memory")
    lab.add_argument("--cpus", type=int, default=2, help="the guest's virtual CPUs")
    lab.add_argument("--timeout-s", type=float, default=600.0,
                     help="stop the guest after this long")
    lab.add_argument("lab_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                     help="the command to run inside the guest, after --")
    up = sub.add_parser("up", help="build the lab topology and hold it until Ctrl-C")
    up.add_argument("--edges", type=int, default=2, help="edge namespaces, one access link "
                    "each (default 2)")
    up.add_argument("--access", default="lab", help="access-link profile (name or YAML path)")
    up.add_argument("--rate", type=_rate_bps, help="access-link rate in both directions, "
                    "overriding the profile's, e.g. 50mbit")
    up.add_argument("--bottleneck", default="lab", help="bottleneck profile (name or YAML path)")


def _rate_bps(text: str) -> int:
    try:
        return parse_rate_bps(text)
    except NetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _mbit(rate_bps: int) -> str:
    return f"{rate_bps / 1e6:g}"


def profiles_table(profiles: list[LinkProfile]) -> str:
    """One row per profile and direction, in the words and units of the YAML files."""
    lines = ["| profile | direction | rate (Mbit/s) | delay (ms) | jitter (ms) | jitter "
             "distribution | loss | queue (bytes) | congestion control |",
             "|" + "---|" * 9]
    for p in profiles:
        for direction, d in (("up", p.up), ("down", p.down)):
            i = d.impairment
            lines.append(f"| {p.name} | {direction} | {_mbit(d.rate_bps)} | "
                         f"{i.delay_s * 1e3:g} | {i.jitter_s * 1e3:g} | "
                         f"{i.jitter_distribution if i.jitter_s else '-'} | {i.loss:.2%} | "
                         f"{d.queue_bytes:,} | {p.congestion_control} |")
    return "\n".join(lines)


def _up(args: argparse.Namespace) -> int:
    access = load_profile(args.access)
    if args.rate is not None:
        access = access.with_rate(args.rate)
    # The topology probes and picks netem or the TUN emulator if a profile has delay/jitter/loss.
    with LabTopology([access] * args.edges, load_profile(args.bottleneck)) as topo:
        print(f"built {len(topo.namespaces)} namespaces in {topo.build_s * 1e3:.0f} ms: {' '.join(topo.namespaces)}")
        for record in topo.shaping():
            print(record.as_row())
        # SIGTERM ends the wait like Ctrl-C, so the with-block tears the topology down.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    print(f"torn down in {topo.teardown_s * 1e3:.0f} ms")
    return 0


# sysexits.h EX_NOPERM: what `scout run` also returns without a needed privilege.
EXIT_NO_PRIVILEGE = 77


def _lab_kernel(args: argparse.Namespace) -> int:
    from ray_scout.net.labkernel import run_in_lab

    command = args.lab_command[1:] if args.lab_command[:1] == ["--"] else args.lab_command
    if not command:
        raise NetError("give the command after --, e.g. `scout net lab-kernel -- python3 -m pytest tests/test_net_netem.py`")
    result = run_in_lab(command, writable=tuple(args.writable), memory_mib=args.memory_mib, cpus=args.cpus,
                        timeout_s=args.timeout_s)
    print(f"scout net lab-kernel: exit {result.returncode}; command started {result.boot_s:.1f} s after "
          f"QEMU, whole run {result.wall_s:.1f} s", file=sys.stderr)
    return result.returncode


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CapabilityError as error:
        print(f"scout net {args.net_command}: {error}", file=sys.stderr)
        return EXIT_NO_PRIVILEGE
    except NetError as error:  # the message already says what to do; no traceback needed
        print(f"scout net {args.net_command}: {error}", file=sys.stderr)
        return 2


def _describe(found) -> str:
    return (f"{len(found.namespaces)} namespaces {list(found.namespaces)}, "
            f"{len(found.links)} links {list(found.links)}, {len(found.qdiscs)} qdiscs "
            f"{list(found.qdiscs)}, {len(found.rules)} emulator rules "
            f"{[str(rule) for rule in found.rules]}")


def _owners(live) -> list[str]:
    prefixes = sorted({p for p in live_prefixes()
                       if any(n.startswith(p) for n in live.namespaces + live.links)})
    return [f"{p}* {owner_of(p)}" for p in prefixes]


def _run(args: argparse.Namespace) -> int:
    if args.net_command == "probe":
        print(probe().summary())
    elif args.net_command == "profiles":
        print(profiles_table([load_profile(name) for name in list_profiles()]))
    elif args.net_command == "cleanup":
        if args.stale:
            if args.dry_run or args.prefix != PREFIX:
                raise NetError("--stale takes every dead run's leftovers: give it alone")
            runs = remove_stale()
            print(f"removed the leftovers of {len(runs)} dead runs" + "".join(
                f"\n  {prefix}*: {_describe(found)}" for prefix, found in runs.items()))
            return 0
        if not args.dry_run:
            require_root()
        found = find_leftovers(args.prefix)
        live = of_live_runs(found)
        if not args.dry_run:
            found = cleanup(args.prefix)
        print(f"{'found' if args.dry_run else 'removed'}: {_describe(found)}")
        if live.namespaces or live.links:
            print(f"kept {len(live.namespaces)} namespaces and {len(live.links)} links of runs "
                  f"whose process is alive ({', '.join(_owners(live))}): stop those runs first")
    elif args.net_command == "up":
        return _up(args)
    elif args.net_command == "lab-kernel":
        return _lab_kernel(args)
    return 0
