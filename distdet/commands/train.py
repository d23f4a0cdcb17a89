"""``distdet train``: the same trainer as ``train.py`` (see :mod:`distdet.training.trainer`)."""
from __future__ import annotations

import argparse

from distdet.training.config import add_arguments, config_from_namespace


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
    from distdet.training.trainer import run_training

    try:
        cfg = config_from_namespace(args, None)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"distdet train: error: {exc}") from exc
    return run_training(cfg)
