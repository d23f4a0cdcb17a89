"""The command-line vocabulary every command shares, without importing torch.

One place for the mixed-precision choices, the default collective timeout, the argparse value
types (positive integers, probabilities, ...) and the hidden aliases that keep old flag
spellings working. :mod:`distdet.training.config` (``train``) and every module of
:mod:`distdet.commands` take them from here, so ``--help`` can be built without torch.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable

#: ``--mixed-precision`` values: none, float16 autocast (CUDA only) and bfloat16 autocast.
MIXED_PRECISION_CHOICES: tuple[str, ...] = ("no", "fp16", "bf16")

#: ``--tf32`` values (see :mod:`distdet.runtime.tf32`): PyTorch's default, TF32 on, TF32 off.
TF32_MODES: tuple[str, ...] = ("torch", "on", "off")

#: ``--malloc`` values (see :mod:`distdet.runtime.malloc`): keep freed memory in the process, or
#: the C library's defaults.
MALLOC_MODES: tuple[str, ...] = ("keep", "system")

#: Seconds a collective waits for the other ranks before failing (``--dist-timeout``): long
#: enough for rank 0 to build the synthetic default data or write evaluation outputs, short
#: enough that a dead rank ends a job within a minute instead of torch's 30-minute default.
DEFAULT_DIST_TIMEOUT_S = 60.0


def _number(kind: Callable[[str], float], text: str) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {'whole ' if kind is int else ''}number, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(_number(int, text))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    value = int(_number(int, text))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (``nan`` and ``inf`` are refused)."""
    value = _number(float, text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def probability(text: str) -> float:
    """argparse type: a number within [0, 1]."""
    value = _number(float, text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {value}")
    return value


def old_spelling(help: str, old: str) -> str:
    """``help`` followed by the note that names an option's old spelling (kept for one release)."""
    return f"{help} (old spelling: {old})"


def add_hidden_alias(container: argparse._ActionsContainer, old: str, dest: str, **kwargs) -> None:
    """Accept the old spelling ``old`` for the option stored in ``dest``, without listing it as an option.

    ``container`` is a parser, an argument group or a mutually exclusive group; ``kwargs``
    repeat what the option needs to parse a value (``type``, ``choices``, ``nargs``, ``action``).
    The new option's help names the old spelling through :func:`old_spelling`.
    """
    container.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
