"""``distdet train`` and ``train.py``: one entry, one exit (see :mod:`distdet.training.trainer`)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from distdet.training.config import add_arguments, build_parser, config_from_namespace


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a Faster R-CNN (also under accelerate launch)",
        description="Fine-tune a torchvision Faster R-CNN on face-mask VOC data. Several CPU processes: "
        "accelerate launch --config_file launch/accelerate/cpu_2proc.yaml -m distdet train ...",
        allow_abbrev=False,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train with the parsed flags (and their ``--config`` file); the exit status, 2 for bad options."""
    from distdet.training.trainer import run_training

    try:
        cfg = config_from_namespace(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"distdet train: error: {exc}", file=sys.stderr)
        return 2
    return run_training(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """``train.py``: the ``train`` subcommand's parser (as ``train.py``), :func:`run` and the exit policy."""
    args = build_parser().parse_args(argv)
    from distdet.runtime.accelerator import finish_process  # after parsing: --help needs no torch

    return finish_process(run(args))
