"""The ``physai`` command line (also ``python -m physai``)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys


# Each module adds its subcommand with add_parser(commands) and imports its heavy dependencies only when run.
_COMMAND_MODULES = ("physai.lego.cli", "physai.experiments.eos", "physai.experiments.width_transfer",
                    "physai.sweep", "physai.experiments.criticality", "physai.experiments.threshold",
                    "physai.experiments.lego_transformer", "physai.experiments.catapult")


def _info(args: argparse.Namespace) -> int:
    from physai import native_info

    print(json.dumps(native_info(), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    """A tour: LEGO sentences with their answers, then the edge-of-stability experiment (JSON + figure)."""
    status = main(["lego", "--demo", "-n", "3"])
    print()
    return status or main(["eos", "--json", args.json, "--plot", args.plot])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="physai", description="physics-of-AI experiments, fast")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="describe the native build")
    info.set_defaults(run=_info)
    demo = commands.add_parser("demo", help="a quick tour: LEGO sentences, then the edge-of-stability experiment")
    demo.add_argument("--json", default="eos.json")
    demo.add_argument("--plot", default="eos.png")
    demo.set_defaults(run=_demo)
    for module in _COMMAND_MODULES:
        importlib.import_module(module).add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        # Values argparse cannot judge (a group name, a combination of sizes) reach the library's checks, and output
        # paths the file system: usage errors, not crashes.
        print(f"physai {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
