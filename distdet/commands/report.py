"""``distdet report RUN_DIR``: PNG plots of losses, learning rate and evaluation metrics."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distdet.commands.arguments import add_output


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="plot a run's losses, learning rate and evaluation metrics as PNG files",
        description=(
            "Read RUN_DIR/metrics.jsonl and write PNG plots (losses.png, lr.png, eval_metrics.png) "
            "of the loss components and learning rate over steps and of the evaluation metrics over "
            "epochs. Works while a run is still going and after it ended."
        ),
        allow_abbrev=False,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="run folder holding metrics.jsonl")
    add_output(parser, "--output-dir", "folder for the plots (default: RUN_DIR/plots)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from distdet.training.report import write_training_plots

    try:
        paths = write_training_plots(args.run_dir, args.output_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"distdet report: error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
