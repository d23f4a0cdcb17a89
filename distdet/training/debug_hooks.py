"""The trainer's testing aids (``--debug-*`` flags) behind one small object.

The training loop calls :meth:`DebugHooks.poison` on every batch's loss and
:meth:`DebugHooks.record` on every batch's targets; with no ``--debug-*`` flag both return at
once, so the hot loop carries no testing logic of its own.

- ``--debug-nan-at-step N ...`` (with ``--debug-nan-rank R``, -1 = every rank) multiplies the
  loss by NaN at those global optimizer steps, to exercise the non-finite-step agreement;
- ``--debug-record-samples`` makes every rank append ``{"epoch", "step", "image_ids", "repeats"}``
  for each batch it trains on to ``debug/samples_rank<R>.jsonl`` (the sharding and resume tests
  read it); ``repeats`` says which repeat of each image it was (0 without repeat factors).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import IO

import torch

DEBUG_DIR = "debug"


class DebugHooks:
    """Testing aids of one rank; :meth:`close` flushes the sample record."""

    def __init__(self, nan_at_steps: list[int], nan_rank: int, record_samples: bool, run_dir: Path,
                 rank: int) -> None:
        self.nan_at_steps = frozenset(nan_at_steps)
        self.poisons_here = bool(self.nan_at_steps) and nan_rank in (-1, rank)
        self.samples: IO[str] | None = None
        if record_samples:
            (run_dir / DEBUG_DIR).mkdir(parents=True, exist_ok=True)
            self.samples = open(run_dir / DEBUG_DIR / f"samples_rank{rank}.jsonl", "a")

    def poison(self, loss: torch.Tensor, global_step: int) -> torch.Tensor:
        """``loss`` times NaN at a ``--debug-nan-at-step`` step on a chosen rank, else ``loss``."""
        if self.poisons_here and global_step in self.nan_at_steps:
            return loss * float("nan")
        return loss

    def record(self, epoch: int, global_step: int, targets: list[dict[str, torch.Tensor]]) -> None:
        """Note the image ids of a batch this rank trains on (``--debug-record-samples``)."""
        if self.samples is not None:
            image_ids = [int(t["image_id"]) for t in targets]
            repeats = [int(t["repeat"]) if "repeat" in t else 0 for t in targets]
            self.samples.write(json.dumps({"epoch": epoch, "step": global_step, "image_ids": image_ids,
                                           "repeats": repeats}) + "\n")

    def close(self) -> None:
        if self.samples is not None:
            self.samples.close()
            self.samples = None
