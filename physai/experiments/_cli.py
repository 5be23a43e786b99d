"""The ``physai <experiment>`` subcommand every experiment shares: one flag per config field, a run with a progress
bar, the result's report, the result as standard JSON and the figure as PNG."""
from __future__ import annotations

import argparse
import sys
import time

from physai._argtypes import add_config_arguments, config_from_args


def add_experiment_parser(commands, name: str, module, *, help: str, description: str) -> None:
    """Register ``physai <name>`` for an experiment module that follows the protocol of
    ``physai.experiments._base`` (module-level ``Config``, ``run`` and ``Result``)."""
    parser = commands.add_parser(name, help=help, description=description)
    add_config_arguments(parser, module.Config)
    stem = name.replace("-", "_")
    parser.add_argument("--json", default=f"{stem}.json", help="where to write the result (standard JSON)")
    parser.add_argument("--plot", default=f"{stem}.png", help="where to write the figure ('' to skip)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=lambda args: _main(module, args))


def experiment_command(name: str, module_name: str, *, help: str, description: str):
    """The ``add_parser(commands)`` of experiment module ``module_name``, registering ``physai <name>`` through
    :func:`add_experiment_parser` (the module is complete by the time the CLI calls it)."""
    def add_parser(commands) -> None:
        add_experiment_parser(commands, name, sys.modules[module_name], help=help, description=description)

    add_parser.__doc__ = f"Register the ``physai {name}`` command on the CLI's subparsers."
    return add_parser


def _main(module, args: argparse.Namespace) -> int:
    config = config_from_args(module.Config, args).validated()
    start = time.perf_counter()
    result = module.run(config, progress=not args.quiet)
    print(f"physai {args.command}: {time.perf_counter() - start:.1f} s")
    print(result.report())
    result.save(args.json)
    print(f"result: {args.json}")
    if args.plot:
        try:
            result.plot(args.plot)
            print(f"figure: {args.plot}")
        except ImportError:
            print("matplotlib is not installed (pip install physai[plot]); no figure written")
    return 0
