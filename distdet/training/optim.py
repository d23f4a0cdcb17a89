"""Optimizer and learning-rate schedule from a :class:`~distdet.training.config.TrainConfig`.

``--lr`` is the rate for the global batch: gradients are averaged over every image of an
optimizer step (all processes, all accumulated batches), so the same ``--lr`` means the same
update whatever the process count. With ``--scale-lr-from-batch REF`` the rate is instead
scaled linearly: ``lr * global_batch / REF``.

The schedule is one :class:`torch.optim.lr_scheduler.LambdaLR` stepped once per optimizer
step: a linear warmup from ``lr * warmup_factor`` to ``lr``, multiplied by a multistep decay
(milestones in epochs) or followed by a cosine decay to zero at the end of training.
"""
from __future__ import annotations

import math
from collections.abc import Callable

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


def lr_factor_fn(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of the base rate after ``step`` optimizer steps."""
    warmup = resolve_warmup_steps(cfg, steps_per_epoch)
    total = cfg.epochs * steps_per_epoch
    milestones = [m * steps_per_epoch for m in cfg.lr_milestones]

    def factor(step: int) -> float:
        value = 1.0
        if step < warmup:
            alpha = step / warmup
            value = cfg.warmup_factor * (1.0 - alpha) + alpha
        if cfg.lr_schedule == "multistep":
            value *= cfg.lr_gamma ** sum(step >= m for m in milestones)
        elif step >= warmup:  # cosine after warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            value *= 0.5 * (1.0 + math.cos(math.pi * progress))
        return value

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step.

    The factor is a plain function, so a checkpoint stores only the step count: resuming with
    changed schedule flags applies the new schedule from the saved step.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(cfg, steps_per_epoch))
