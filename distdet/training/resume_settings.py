"""What a checkpoint's weights were trained with, and what a resume with other flags does.

Each checkpoint keeps ``run_settings.json``: the model, the optimizer, ``--min-size/--max-size``
and a fingerprint of the training data (name, size and mtime of every image and annotation
file of the split's training part; ``min_size`` is the one size or the list). On resume:

- another ``--model`` or ``--optimizer`` is refused, naming what the checkpoint holds (the
  saved tensors would not fit);
- another ``--repeat-factor-threshold`` is refused too: the checkpoint's position in its epoch,
  and the learning-rate clock's epoch lengths, are counted in the epoch lists it makes;
- another ``--min-size/--max-size`` or other data contents are accepted with a warning;
- optimizer hyperparameters given anew (``--lr``, ``--momentum``, ``--weight-decay``,
  ``--scale-lr-from-batch`` ...) are APPLIED from the resumed step on, over the values saved in
  ``optimizer.bin``, and each change is logged and recorded (``resume_changes`` in
  ``config.json`` and the ``resumed`` event). Schedule flags apply anyway: the schedule is a
  function of the step (see :func:`distdet.training.optim.build_scheduler`).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from distdet.data.records import ImageRecord
from distdet.modeling.multiscale import size_record
from distdet.training.checkpoint_files import CheckpointError
from distdet.training.config import TrainConfig

logger = logging.getLogger(__name__)

#: Per-group optimizer hyperparameters a resume takes from the current flags.
HYPERPARAMETERS = ("initial_lr", "momentum", "weight_decay", "dampening", "nesterov", "betas", "eps")


def data_fingerprint(records: Iterable[ImageRecord]) -> str:
    """SHA-256 over (file name, size, mtime) of every image and annotation, in stem order."""
    sha = hashlib.sha256()
    for record in sorted(records, key=lambda r: r.stem):
        for path in (record.image_path, record.annotation_path):
            stat = Path(path).stat()
            sha.update(f"{Path(path).name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return sha.hexdigest()


def run_settings(cfg: TrainConfig, train_records: Iterable[ImageRecord]) -> dict[str, Any]:
    return {"model": cfg.model, "optimizer": cfg.optimizer, "min_size": size_record(cfg.min_size),
            "max_size": cfg.max_size, "repeat_factor_threshold": cfg.repeat_factor_threshold,
            "data_fingerprint": data_fingerprint(train_records)}


def compare_settings(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a resume whose model, optimizer or repeat factors differ from the checkpoint's; warn about the rest."""
    for key, flag in (("model", "--model"), ("optimizer", "--optimizer")):
        if saved.get(key) != current[key]:
            raise CheckpointError(f"checkpoint {checkpoint} holds a {saved.get(key)!r} {key}, but {flag} is "
                                  f"{current[key]!r}; resume with {flag} {saved.get(key)} or start a new run")
    threshold, wanted = saved.get("repeat_factor_threshold"), current.get("repeat_factor_threshold")  # absent: off
    if threshold != wanted:
        raise CheckpointError(f"checkpoint {checkpoint} was trained with --repeat-factor-threshold "
                              f"{threshold if threshold is not None else 'off'}, this run has "
                              f"{wanted if wanted is not None else 'it off'}: the epoch lists depend on it; "
                              f"resume with the checkpoint's value or start a new run")
    for key in ("min_size", "max_size"):
        if saved.get(key) != current[key]:
            logger.warning("resuming %s with --%s %s (the checkpoint was trained with %s)", checkpoint,
                           key.replace("_", "-"), current[key], saved.get(key))
    if saved.get("data_fingerprint") != current["data_fingerprint"]:
        logger.warning("resuming %s on training data whose files differ (names, sizes or times) from those the "
                       "checkpoint was trained on", checkpoint)


def group_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: group[k] for k in HYPERPARAMETERS if k in group} for group in optimizer.param_groups]


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                          wanted: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Put the current flags' hyperparameters ``wanted`` back over the loaded ones; return
    ``{name: [saved, now]}`` for each that changed (nothing is touched when none did)."""
    loaded = group_hyperparameters(optimizer)
    changes = {key: [old[key], new[key]] for old, new in zip(loaded, wanted) for key in new
               if key in old and old[key] != new[key]}
    if not changes:
        return {}
    for group, new in zip(optimizer.param_groups, wanted):
        group.update(new)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    logger.warning("resume applies changed optimizer settings: %s",
                   ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items()))
    return changes
