"""``scout net``: probe the kernel, list link profiles, remove leftovers, hold a topology up.

Thin over ``probe``, ``profiles``, ``cleanup`` and ``topology``; prints, never decides.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ray_scout.net import PREFIX
from ray_scout.net.cleanup import cleanup, find_leftovers
from ray_scout.net.errors import CapabilityError, NetError
from ray_scout.net.probe import probe
from ray_scout.net.profiles import list_profiles, load_profile
from ray_scout.net.topology import LabTopology


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="net_command", required=True)
    sub.add_parser("probe", help="which qdiscs/classifiers/congestion controls this kernel has")
    sub.add_parser("profiles", help="list the link profiles in netem/")
    clean = sub.add_parser("cleanup", help="remove namespaces, links and qdiscs the project left (like mn -c)")
    clean.add_argument("--prefix", default=PREFIX, help=f"only objects starting with this (default {PREFIX})")
    clean.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    up = sub.add_parser("up", help="build the lab topology and hold it until Ctrl-C")
    up.add_argument("--edges", type=int, default=2)
    up.add_argument("--access", default="lab", help="access-link profile (name or YAML path)")
    up.add_argument("--bottleneck", default="lab", help="bottleneck profile (name or YAML path)")


def _up(args: argparse.Namespace) -> int:
    access = load_profile(args.access)
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


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CapabilityError as error:
        print(f"scout net {args.net_command}: {error}", file=sys.stderr)
        return EXIT_NO_PRIVILEGE
    except NetError as error:  # the message already says what to do; no traceback needed
        print(f"scout net {args.net_command}: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.net_command == "probe":
        print(probe().summary())
    elif args.net_command == "profiles":
        for name in list_profiles():
            print(name, load_profile(name))
    elif args.net_command == "cleanup":
        found = find_leftovers(args.prefix) if args.dry_run else cleanup(args.prefix)
        verb = "found" if args.dry_run else "removed"
        print(f"{verb}: {len(found.namespaces)} namespaces {list(found.namespaces)}, "
              f"{len(found.links)} links {list(found.links)}, {len(found.qdiscs)} qdiscs {list(found.qdiscs)}, "
              f"{len(found.rules)} emulator rules {[str(rule) for rule in found.rules]}")
    elif args.net_command == "up":
        return _up(args)
    return 0
