"""Options several commands share, spelled and documented once (the README's flag vocabulary).

- a *model folder* (``model.pt`` + ``model_card.json``) is ``--model-dir`` (old: ``--checkpoint``;
  a *checkpoint* is a resumable ``checkpoints/step_*`` folder of a run, see ``train --resume``);
- an output folder is ``--output-dir`` and an output file ``--output-file`` (old: ``--out``);
- ``--mixed-precision`` and ``--dist-timeout`` mean what they mean for ``train``.

Old spellings stay accepted as hidden aliases (:func:`distdet.runtime.options.add_hidden_alias`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distdet.runtime.options import (
    DEFAULT_DIST_TIMEOUT_S,
    MALLOC_MODES,
    MIXED_PRECISION_CHOICES,
    add_hidden_alias,
    old_spelling,
    positive_float,
)

MODEL_DIR_METAVAR = "MODEL_DIR"
MODEL_DIR_HELP = ("model folder (model.pt + model_card.json: a run folder or its best/) or a model.pt "
                  "with model_card.json beside it")


def add_model_dir(container: argparse._ActionsContainer, *, required: bool) -> None:
    """``--model-dir`` (hidden old spelling ``--checkpoint``); with ``required`` one of them must be given."""
    group = container.add_mutually_exclusive_group(required=required) if required else container
    group.add_argument("--model-dir", metavar=MODEL_DIR_METAVAR, help=old_spelling(MODEL_DIR_HELP, "--checkpoint"))
    add_hidden_alias(group, "--checkpoint", "model_dir")


def add_output(parser: argparse.ArgumentParser, option: str, help: str, *, required: bool = False) -> None:
    """``option`` (``--output-dir`` or ``--output-file``, a Path) with the hidden old spelling ``--out``."""
    dest = option.lstrip("-").replace("-", "_")
    metavar = "DIR" if option == "--output-dir" else "FILE"
    group = parser.add_mutually_exclusive_group(required=True) if required else parser
    group.add_argument(option, type=Path, metavar=metavar, help=old_spelling(help, "--out"),
                       **({} if required else {"default": None}))
    add_hidden_alias(group, "--out", dest, type=Path)


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """``--mixed-precision`` (default no), ``--dist-timeout`` and ``--malloc`` for a command that runs a model."""
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION_CHOICES, default="no",
                        help="autocast precision for inference: no, fp16 (CUDA only) or bf16 (default: no)")
    parser.add_argument("--dist-timeout", type=positive_float, default=DEFAULT_DIST_TIMEOUT_S, metavar="SECONDS",
                        help="seconds a collective waits for the other processes before failing "
                             f"(default: {DEFAULT_DIST_TIMEOUT_S:g})")
    parser.add_argument("--malloc", choices=MALLOC_MODES, default="keep",
                        help="CPU memory: keep (glibc reuses freed blocks; faster on CPU) or system (the C "
                             "library's defaults); as for train (default: keep)")


def build_command_accelerator(args: argparse.Namespace, command: str, *, cpu: bool = False):
    """The runtime's Accelerator for ``args``; None (after printing why) when the launch is refused."""
    from distdet.runtime.accelerator import LaunchError, build_accelerator

    try:
        return build_accelerator(cpu=cpu, mixed_precision=args.mixed_precision, dist_timeout=args.dist_timeout,
                                 malloc=args.malloc)
    except LaunchError as exc:
        print(f"distdet {command}: error: {exc}", file=sys.stderr)
        return None
