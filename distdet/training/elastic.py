"""Resuming on another layout: other process count, batch size, accumulation, grouping or seed.

A checkpoint's :class:`~distdet.training.checkpoints.TrainerState` holds the layout its steps
were taken with. Those numbers and the step in the epoch determine exactly which samples of
the interrupted epoch were trained (:mod:`distdet.training.sampling`), so a resume on another
layout does, for that epoch:

1. the epoch list (``seed``, ``epoch``);
2. minus what each earlier stretch of the epoch trained, stretch by stretch (a run can be
   resumed on several layouts within one epoch; ``TrainerState.earlier_segments`` keeps them);
3. sharded over the new processes and cut into the new batches.

The new layout's stretch starts at ``step_in_epoch = 0``. Every sample of the epoch is trained
once, apart from the padding repeats each stretch's even split adds (see ``sampling``); the
following epochs are those of a fresh run with the new layout. With repeat factors a sample is
one repeat of an image: the epoch list holds each repeat as its own entry, so the arithmetic
counts repeats (``--repeat-factor-threshold`` itself cannot change on resume:
:func:`~distdet.training.resume_settings.compare_settings` refuses it). The learning-rate clock is
re-anchored (:func:`~distdet.training.optim.rebase_scheduler`) so the schedule continues from the
progress in epochs reached, and the base rate follows the global-batch rule (``--lr`` is for the
global batch; with ``--scale-lr-from-batch`` it scales with the new global batch).

Random state: Accelerate's ``load_state`` restores ``random_states_<rank>.pkl`` for each rank
that exists in both layouts. A rank the checkpoint has no file for keeps the state
``set_seed(--seed)`` gave it at startup, as every rank of a fresh run has (Accelerate logs
"Could not load random states" at INFO level and goes on); the files of ranks that no longer
exist are not read. This is no loss of reproducibility: augmentation is seeded per sample from
``(seed, epoch, index)``, and the remaining global draws (the detector's proposal sampling)
are a function of the checkpoint, ``--seed`` and the new layout. Hence nothing is warned about.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

from torch.optim.lr_scheduler import LambdaLR

from distdet.training.checkpoints import TrainerState
from distdet.training.config import TrainConfig
from distdet.training.optim import ScheduleClock, rebase_scheduler
from distdet.training.sampling import (
    BatchLayout, EpochBatchSampler, TrainedStretch, aspect_ratio_groups, steps_per_epoch,
)

logger = logging.getLogger(__name__)

#: the TrainerState fields that decide which samples a step takes
LAYOUT_FIELDS = ("seed", "world_size", "batch_size", "grad_accum_steps", "aspect_ratio_group_factor")


def layout_fields(cfg: TrainConfig, world_size: int) -> dict[str, int]:
    """This run's layout, as TrainerState fields."""
    return {"seed": cfg.seed, "world_size": world_size, "batch_size": cfg.batch_size,
            "grad_accum_steps": cfg.grad_accum_steps, "aspect_ratio_group_factor": cfg.aspect_ratio_group_factor}


def batch_layout(layout: dict[str, int], aspect_ratios: list[float]) -> BatchLayout:
    """The sampler arithmetic's view of a saved layout."""
    factor = layout["aspect_ratio_group_factor"]
    groups = tuple(aspect_ratio_groups(aspect_ratios, factor)) if factor >= 0 else None
    return BatchLayout(layout["world_size"], layout["batch_size"], layout["grad_accum_steps"], groups)


def global_batch(layout: dict[str, int]) -> int:
    return layout["world_size"] * layout["batch_size"] * layout["grad_accum_steps"]


def _plural(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


@dataclass(frozen=True)
class LayoutChange:
    """What a resume on another layout changed; logged, and recorded in events.jsonl and config.json."""

    checkpoint: str
    epoch: int
    steps_in_epoch: int
    samples_left: int
    old: dict[str, int]
    new: dict[str, int]
    old_lr: float
    new_lr: float
    old_steps_per_epoch: int
    new_steps_per_epoch: int
    schedule: dict[str, Any]

    def message(self) -> str:
        return (f"resuming {_plural(self.new['world_size'])} from a {self.old['world_size']}-process checkpoint at "
                f"epoch {self.epoch}, step {self.steps_in_epoch}: {self.samples_left} samples left in this epoch")

    def details(self) -> str:
        changed = ", ".join(f"{k} {self.old[k]} -> {self.new[k]}" for k in LAYOUT_FIELDS if self.old[k] != self.new[k])
        return (f"layout change: {changed}; global batch {global_batch(self.old)} -> {global_batch(self.new)}, "
                f"lr {self.old_lr:.6g} -> {self.new_lr:.6g}, steps per epoch {self.old_steps_per_epoch} -> "
                f"{self.new_steps_per_epoch}; the schedule continues at {self.schedule['anchor_epochs']:.4f} epochs")

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "epoch": self.epoch, "steps_in_epoch": self.steps_in_epoch,
                "samples_left": self.samples_left, "old_layout": self.old, "new_layout": self.new,
                "old_global_batch": global_batch(self.old), "new_global_batch": global_batch(self.new),
                "old_lr": self.old_lr, "new_lr": self.new_lr, "old_steps_per_epoch": self.old_steps_per_epoch,
                "new_steps_per_epoch": self.new_steps_per_epoch, "schedule": self.schedule}


@dataclass(frozen=True)
class ResumeContext:
    """What a resume on another layout needs from the new run besides the checkpoint."""

    cfg: TrainConfig
    sampler: EpochBatchSampler
    scheduler: LambdaLR
    base_lr: float
    aspect_ratios: list[float]


def saved_layout(saved: TrainerState, current: TrainerState) -> dict[str, int]:
    """The checkpoint's layout; fields an older checkpoint lacks are taken to be unchanged."""
    return {k: getattr(saved, k) if getattr(saved, k) is not None else getattr(current, k) for k in LAYOUT_FIELDS}


def continue_on_layout(saved: TrainerState, current: TrainerState, checkpoint: str,
                       context: ResumeContext) -> tuple[TrainerState, LayoutChange | None]:
    """The state to continue with under ``current``'s layout, after ``load_state`` of ``saved``.

    Tells the sampler which stretches of the interrupted epoch were trained already, and, when
    the layout changed, re-anchors the schedule. Returns the state and the change (None if the
    layout is the checkpoint's: then nothing differs from an uninterrupted run).
    """
    old, new = saved_layout(saved, current), {k: getattr(current, k) for k in LAYOUT_FIELDS}
    segments = [s for s in saved.earlier_segments if s["epoch"] == saved.epoch]
    if old == new:
        resumed = replace(saved, earlier_segments=segments, schedule=saved.schedule or current.schedule)
        _tell_sampler(context, saved.epoch, segments)
        return resumed, None
    if saved.step_in_epoch:
        segments.append({"epoch": saved.epoch, "steps": saved.step_in_epoch, **old})
    _tell_sampler(context, saved.epoch, segments)
    old_lr = context.scheduler.base_lrs[0]
    old_clock, clock = _continue_schedule(saved, old, current, context)
    resumed = replace(saved, **new, step_in_epoch=0, earlier_segments=segments, schedule=clock.to_json())
    change = LayoutChange(checkpoint, saved.epoch, sum(s["steps"] for s in segments),
                          len(context.sampler.epoch_list()), old, new, old_lr, context.base_lr,
                          old_clock.steps_per_epoch, clock.steps_per_epoch, clock.to_json())
    logger.info("%s", change.message())
    logger.info("%s", change.details())
    return resumed, change


def _continue_schedule(saved: TrainerState, old: dict[str, int], current: TrainerState,
                       context: ResumeContext) -> tuple[ScheduleClock, ScheduleClock]:
    """Re-anchor the scheduler for the new layout; return the old and the new clock.

    A checkpoint without a clock ran on its saved layout from step 0.
    """
    old_clock = (ScheduleClock.from_json(saved.schedule) if saved.schedule else
                 ScheduleClock.fresh(steps_per_epoch(context.sampler.dataset_size,
                                                     batch_layout(old, context.aspect_ratios), old["seed"])))
    steps_left = math.ceil(len(context.sampler.epoch_batches()) / current.grad_accum_steps)
    new_clock = ScheduleClock.from_json(current.schedule)
    clock = old_clock.rebased(context.scheduler.last_epoch, saved.epoch, steps_left, new_clock.steps_per_epoch,
                              new_clock.epoch_steps)
    rebase_scheduler(context.scheduler, context.cfg, clock, context.base_lr)
    return old_clock, clock


def _tell_sampler(context: ResumeContext, epoch: int, segments: list[dict[str, int]]) -> None:
    context.sampler.set_epoch(epoch)
    if segments:
        stretches = [TrainedStretch(batch_layout(s, context.aspect_ratios), s["steps"]) for s in segments]
        context.sampler.set_trained(epoch, segments[0]["seed"], stretches)
