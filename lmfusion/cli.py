"""The ``lmfusion`` command line.

Each subcommand lives with its code: a module exposes ``add_subparser(subparsers)``, which adds its parser(s) and
sets ``run=<function(args) -> int | None>`` with ``set_defaults``. To add a command, append that module's
``add_subparser`` to :data:`SUBCOMMANDS`. User errors (:data:`lmfusion.errors.USER_ERRORS`: ``UserError``,
``FileNotFoundError``, ``FileExistsError``) print one line to stderr and exit with status 2, without a traceback;
anything else (a plain ``ValueError`` or ``AssertionError`` included) is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from lmfusion import hf, quickstart
from lmfusion.evaluation import cli as evaluation_cli
from lmfusion.inference import cli as inference_cli
from lmfusion.errors import USER_ERRORS
from lmfusion.training import cli as training_cli

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

SUBCOMMANDS: list[Callable[["argparse._SubParsersAction"], None]] = [
    hf.add_subparser,  # convert-hf, export-hf
    inference_cli.add_subparser,  # generate, caption, chat
    evaluation_cli.add_subparser,  # eval generation|caption|text
    training_cli.add_subparser,  # train, flops, plot, export-ckpt
    quickstart.add_subparser,  # quickstart
]
USER_ERROR_EXIT = 2  # argparse's status for usage errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmfusion", description="LMFusion (arXiv 2412.15188) on megatron-core")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_subparser in SUBCOMMANDS:
        add_subparser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
    except USER_ERRORS as e:
        message = " ".join(str(e).split())  # one line, whatever the exception text holds
        print(f"lmfusion {args.command}: error: {message}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
