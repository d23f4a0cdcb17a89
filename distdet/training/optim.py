"""Optimizer and learning-rate schedule from a :class:`~distdet.training.config.TrainConfig`.

``--lr`` is the rate for the global batch: gradients are averaged over every image of an
optimizer step (all processes, all accumulated batches), so the same ``--lr`` means the same
update whatever the process count. With ``--scale-lr-from-batch REF`` the rate is instead
scaled linearly: ``lr * global_batch / REF``.

The schedule is one :class:`torch.optim.lr_scheduler.LambdaLR` stepped once per optimizer
step: a linear warmup from ``lr * warmup_factor`` to ``lr``, multiplied by a multistep decay
(milestones in epochs) or followed by a cosine decay to zero at the end of training.

Its shape is a function of training progress in epochs, which a :class:`ScheduleClock` reads
off the scheduler's step count. A resume on a layout with another number of optimizer steps per
epoch (other process count, batch size or accumulation) re-anchors the clock at the resumed step
(:func:`rebase_scheduler`), so the factor continues where it was instead of jumping; the warmup
keeps the length in epochs that ``--warmup-steps`` gave it in the layout the run started with.

With repeat factors (``--repeat-factor-threshold``) the epochs differ in length: each epoch's
list is a fresh stochastic rounding, so its length varies around the mean (measured on the 683
tutorial training images at T = 0.5: 796 to 820 images over 30 epochs, 199 to 205 steps at
batch 4 on one process). The schedule therefore runs by the fraction of epochs done: step ``k``
of epoch ``e``, which has ``L_e`` steps, is at ``e + k / L_e`` epochs (the clock holds every
epoch's ``L_e``, a pure function of seed, epoch and layout). The alternative, fixing every
epoch's length, would mean dropping or adding samples, and an epoch's repeats would no longer
each be trained once. Epoch-based milestones then fall exactly on epoch starts and the cosine
reaches 0 at the end of the last epoch, whatever its length.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from distdet.training.config import TrainConfig

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def effective_lr(cfg: TrainConfig, global_batch: int) -> float:
    """The learning rate actually used for a global batch of ``global_batch`` images."""
    if cfg.scale_lr_from_batch is None:
        return cfg.lr
    return cfg.lr * global_batch / cfg.scale_lr_from_batch


def parameter_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    """Trainable parameters, split so norm weights and biases get no decay when asked."""
    if not no_decay_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if isinstance(module, _NORM_TYPES) or name == "bias" else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown --optimizer {cfg.optimizer!r}")


def resolve_warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """``--warmup-steps``, with -1 meaning the tutorial's min(1000, steps_per_epoch - 1)."""
    if cfg.warmup_steps >= 0:
        return cfg.warmup_steps
    return max(0, min(1000, steps_per_epoch - 1))


@dataclass(frozen=True)
class ScheduleClock:
    """Turns the scheduler's step count into training progress in epochs, and into a position
    in optimizer steps of the current layout.

    ``steps_per_epoch`` is the current layout's; ``warmup_steps_per_epoch`` that of the layout
    the run started with (``--warmup-steps`` counts its steps). After a resume on another layout
    at scheduler step ``anchor_step`` with ``anchor_epochs`` done, the rest of that epoch takes
    the steps up to ``boundary_step``, where epoch ``boundary_epoch`` begins: progress is
    interpolated linearly in between (the stretch's last step may be a short one), then counts
    ``1 / steps_per_epoch`` per step, so epoch boundaries stay whole numbers. Without a layout
    change (all anchors 0) the position is the step count itself: exactly the factors of a run
    that never changed layout.

    ``epoch_steps`` (repeat factors: epochs of different lengths) holds the steps of every epoch
    by its number: from ``boundary_step`` on, each step counts ``1 / epoch_steps[e]`` of its
    epoch ``e`` (``1 / steps_per_epoch`` past the last one listed); ``steps_per_epoch`` is then
    epoch 0's count, the unit positions are measured in.
    """

    steps_per_epoch: int
    warmup_steps_per_epoch: int
    anchor_step: int = 0
    anchor_epochs: float = 0.0
    boundary_step: int = 0
    boundary_epoch: int = 0
    epoch_steps: tuple[int, ...] | None = None

    @classmethod
    def fresh(cls, steps_per_epoch: int, epoch_steps: tuple[int, ...] | None = None) -> "ScheduleClock":
        return cls(steps_per_epoch, steps_per_epoch, epoch_steps=epoch_steps)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ScheduleClock":
        epoch_steps = data.get("epoch_steps")
        return cls(int(data["steps_per_epoch"]), int(data["warmup_steps_per_epoch"]), int(data["anchor_step"]),
                   float(data["anchor_epochs"]), int(data["boundary_step"]), int(data["boundary_epoch"]),
                   tuple(int(steps) for steps in epoch_steps) if epoch_steps is not None else None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def epochs(self, step: int) -> float:
        """Training progress in epochs at scheduler step ``step``."""
        if step < self.boundary_step:
            done = (step - self.anchor_step) / (self.boundary_step - self.anchor_step)
            return self.anchor_epochs + done * (self.boundary_epoch - self.anchor_epochs)
        epoch, start = self.boundary_epoch, self.boundary_step
        lengths = self.epoch_steps or ()
        while epoch < len(lengths) and step >= start + lengths[epoch]:
            start, epoch = start + lengths[epoch], epoch + 1
        return epoch + (step - start) / (lengths[epoch] if epoch < len(lengths) else self.steps_per_epoch)

    def total_steps(self, epochs: int) -> int:
        """Optimizer steps of ``epochs`` whole epochs of a fresh run (the progress bar's length)."""
        if self.epoch_steps is None:
            return epochs * self.steps_per_epoch
        return sum(self.epoch_steps[:epochs]) + max(0, epochs - len(self.epoch_steps)) * self.steps_per_epoch

    def position(self, step: int) -> float:
        """Optimizer steps of the current layout that correspond to the progress at ``step``."""
        if self == ScheduleClock.fresh(self.steps_per_epoch):
            return step
        return self.epochs(step) * self.steps_per_epoch

    def warmup(self, cfg: TrainConfig) -> float:
        """The warmup length in optimizer steps of the current layout."""
        steps = resolve_warmup_steps(cfg, self.warmup_steps_per_epoch)
        if self.steps_per_epoch == self.warmup_steps_per_epoch:
            return steps
        return steps * self.steps_per_epoch / self.warmup_steps_per_epoch

    def rebased(self, step: int, epoch: int, steps_left: int, steps_per_epoch: int,
                epoch_steps: tuple[int, ...] | None = None) -> "ScheduleClock":
        """The clock of a layout with ``steps_per_epoch`` steps per epoch (each epoch's in
        ``epoch_steps``, when they differ), taking over at ``step`` in epoch ``epoch``, of which it
        has ``steps_left`` steps to train."""
        return ScheduleClock(steps_per_epoch, self.warmup_steps_per_epoch, step, self.epochs(step),
                             step + steps_left, epoch + 1, epoch_steps)


def lr_factor_fn(cfg: TrainConfig, steps_per_epoch: int,
                 epoch_steps: tuple[int, ...] | None = None) -> Callable[[int], float]:
    """The multiplier of the base rate after ``step`` optimizer steps of a run on one layout."""
    return schedule_factor_fn(cfg, ScheduleClock.fresh(steps_per_epoch, epoch_steps))


def schedule_factor_fn(cfg: TrainConfig, clock: ScheduleClock) -> Callable[[int], float]:
    """The multiplier of the base rate at scheduler step ``step``, read through ``clock``."""
    warmup = clock.warmup(cfg)
    total = cfg.epochs * clock.steps_per_epoch
    milestones = [m * clock.steps_per_epoch for m in cfg.lr_milestones]

    def factor(step: int) -> float:
        position = clock.position(step)
        value = 1.0
        if position < warmup:
            alpha = position / warmup
            value = cfg.warmup_factor * (1.0 - alpha) + alpha
        if cfg.lr_schedule == "multistep":
            value *= cfg.lr_gamma ** sum(position >= m for m in milestones)
        elif position >= warmup:  # cosine after warmup
            progress = min(1.0, (position - warmup) / max(1, total - warmup))
            value *= 0.5 * (1.0 + math.cos(math.pi * progress))
        return value

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                    epoch_steps: tuple[int, ...] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step (``epoch_steps``: each epoch's steps, when they differ).

    The factor is a plain function, so a checkpoint stores only the step count: resuming with
    changed schedule flags applies the new schedule from the saved step.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(cfg, steps_per_epoch, epoch_steps))


def rebase_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig, clock: ScheduleClock,
                     base_lr: float) -> None:
    """After loading a checkpoint of another layout: read the schedule through ``clock`` from the
    loaded step on, with ``base_lr`` (the global-batch rule's rate for the new layout) as the base.

    ``load_state`` restored the old base rate and step count; this replaces the factor function
    and base rates and sets each group's current rate, as the scheduler's next step would.
    """
    factor = schedule_factor_fn(cfg, clock)
    scheduler.lr_lambdas = [factor] * len(scheduler.optimizer.param_groups)
    scheduler.base_lrs = [base_lr] * len(scheduler.optimizer.param_groups)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
