"""The ``distdet`` command line: one subcommand per module in :mod:`distdet.commands`."""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Subcommand modules; each defines ``register(subparsers)`` that adds its parser and
#: sets ``func(args) -> int`` as the parser default.
COMMAND_MODULES: tuple[str, ...] = (
    "check_data",
    "convert",
    "evaluate",
    "export",
    "make_synthetic",
    "predict",
    "report",
    "train",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distdet",
        description="Fine-tune, evaluate and run Faster R-CNN on face-mask (PASCAL VOC) data.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"distdet.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; return its exit status after the one exit
    policy of :func:`distdet.runtime.accelerator.finish_process`."""
    args = build_parser().parse_args(argv)
    status = int(args.func(args) or 0)
    from distdet.runtime.accelerator import finish_process  # after parsing: --help needs no torch

    return finish_process(status)


if __name__ == "__main__":
    sys.exit(main())
