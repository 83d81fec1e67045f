"""The `warp-phys` command line. The only module that reads argv.

Known errors (`UserError`) become one line on stderr and exit code 2; anything else keeps
its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from warp_phys.errors import UserError


def cmd_systems(args: argparse.Namespace) -> int:
    from warp_phys.system import get_system, system_names

    for name in system_names():
        system = get_system(name)
        params = ", ".join(
            f"{n}={p.default:g}" + (f" [{p.train[0]:g}, {p.train[1]:g}]" if p.train else "")
            for n, p in system.params.items()
        )
        print(f"{name}  (state: {', '.join(system.state)}; T={system.n_steps} on {list(system.t_span)})")
        for eq in system.equations:
            print(f"    {eq}")
        print(f"    params: {params}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warp-phys", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("systems", help="list the registered systems with their equations")
    p.set_defaults(func=cmd_systems)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"warp-phys: error: {err}", file=sys.stderr)
        return 2
