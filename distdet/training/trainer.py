"""The distdet training loop, to be read top to bottom.

:func:`run_training` builds the Accelerator, then :func:`_train` runs three functions, each a
screen long: :func:`_set_up` (steps 1b-4), :func:`_train_epochs` with :func:`_run_epoch` (step 5)
and :func:`_finish` (step 6). What is fixed for the run sits in :class:`Run`; what the loop
changes, in :class:`LoopState`. In order:

1. **Accelerator and run folder** - device (CPU when CUDA is absent), process group with a
   bounded collective timeout, mixed precision (fp16 refused on CPU), launch sanity checks; the
   run folder and the checkpoint to resume from.
2. **Data** - the train/val/test split (saved as ``split.json``), datasets, and a DataLoader
   whose batch sampler shards with ``DistributedSampler`` (NOT passed through
   ``accelerator.prepare``, which would shard it twice).
3. **Model, optimizer, schedule** - ``accelerator.prepare`` wraps model and optimizer (DDP
   when there are several processes); the scheduler is registered for checkpointing only, so it
   steps exactly once per optimizer step.
4. **Resume** - ``accelerator.load_state`` plus the trainer state; a mid-epoch resume skips
   the batches already trained on, keeping the remaining order; on another layout (process
   count, batch size, ...) it trains what the epoch has left (``training/elastic.py``).
5. **Epochs** - per batch: forward, a one-all-reduce agreement on "non-finite loss anywhere?" and
   "stop signal anywhere?", backward under ``accelerator.accumulate``; per optimizer step: clip,
   step, schedule, the weight EMA's update (``--ema-decay``, :mod:`distdet.training.ema`), logging,
   periodic checkpoint, stop handling. Per epoch: checkpoint, evaluation, best model (of the EMA
   weights when there is an EMA: they are validated, kept as ``best/`` and saved as ``model.pt``).
6. **Finish** - a checkpoint of the last step; then after a stop signal the interruption note
   (and a Slurm requeue), otherwise the final test evaluation, the final weights + model card
   (saved once, with the test metrics), ``report.json`` and the plots.

Exit status: 0 done, 75 stopped by SIGUSR1/SIGTERM after a checkpoint, 1 failed, 2 bad launch.
"""
from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from itertools import islice
from pathlib import Path
from typing import Any

import accelerate
import torch
import torchvision
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch.utils.data import DataLoader

import distdet
from distdet.classes import class_colours
from distdet.data import collate_detection
from distdet.eval import evaluate_model, scalar_metrics
from distdet.io_utils import WriteFailed, atomic_write_json
from distdet.modeling.model_card import ModelCard, save_detector
from distdet.modeling.models import build_model, uses_frozen_batchnorm
from distdet.modeling.multiscale import size_record
from distdet.modeling.weights import WeightsUnavailableError
from distdet.training.report import write_training_plots
from distdet.training.checkpoints import (
    CHECKPOINTS_DIR,
    CheckpointError,
    TrainerState,
    Trainables,
    complete_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from distdet.training.config import TrainConfig, eval_min_size
from distdet.training.ema import ModelEMA, build_ema, weights_info
from distdet.training.resume_settings import apply_hyperparameters, group_hyperparameters, run_settings
from distdet.training.run_lock import RunFolderLocked, lock_run_folder
from distdet.training.data_setup import SPLIT_NAME, TrainingData, prepare_data
from distdet.training.debug_hooks import DebugHooks
from distdet.training.elastic import LayoutChange, ResumeContext, continue_on_layout, layout_fields
from distdet.runtime.accelerator import LaunchError, agree_any, build_accelerator
from distdet.runtime.malloc import release_free_memory
from distdet.training.pictures import PREVIEW_BATCHES, write_start_pictures
from distdet.training.repeat_factors import RepeatFactors, run_repeat_factors
from distdet.training.results_csv import write_results_csv
from distdet.training.optim import ScheduleClock, build_optimizer, build_scheduler, effective_lr, resolve_warmup_steps
from distdet.training.run_logging import Progress, RunLog, configure_logging
from distdet.training.tracker_choice import resolve_trackers
from distdet.training.multiscale import attach_batch_scales, start_scale_epoch
from distdet.training.sampling import EpochBatchSampler, SeededSampleDataset, aspect_ratio_groups
from distdet.runtime.signals import (
    EXIT_INTERRUPTED,
    StopRequest,
    ignore_stop_signals_in_worker,
    requeue_slurm_job,
    slurm_job_id,
)

logger = logging.getLogger("distdet.training.trainer")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_LAUNCH = 2


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite losses, incompatible resume, ...)."""


def run_training(cfg: TrainConfig) -> int:
    """Train with ``cfg``; return the exit status. Entry points: :mod:`distdet.commands.train`."""
    # -- 1. accelerator -------------------------------------------------------------------------
    try:
        accelerator = build_accelerator(
            cpu=cfg.cpu, mixed_precision=cfg.mixed_precision, grad_accum_steps=cfg.grad_accum_steps,
            dist_timeout=cfg.dist_timeout, tf32=cfg.tf32, malloc=cfg.malloc,
        )
    except LaunchError as exc:
        print(f"distdet train: error: {exc}", file=sys.stderr)
        return EXIT_BAD_LAUNCH
    rank, world = accelerator.process_index, accelerator.num_processes
    configure_logging(rank, world, accelerator.is_main_process)
    try:
        return _train(cfg, accelerator)
    except (TrainingError, FileNotFoundError, ValueError, WeightsUnavailableError, WriteFailed) as exc:
        logger.error("rank %d of %d: %s", rank, world, exc)
        return EXIT_FAILED
    except Exception as exc:
        if world > 1 and isinstance(exc, (RuntimeError, torch.distributed.DistError)):
            logger.error("rank %d of %d: a collective operation failed - another rank has probably died or hung "
                         "(the launcher's report names it): %s", rank, world, exc)
        else:
            logger.exception("rank %d of %d failed: %s", rank, world, exc)
        return EXIT_FAILED


class Outcome(Enum):
    """How a stretch of training ended."""

    EPOCH_END = "epoch_end"  # the epoch's batches are done (internal to the epoch loop)
    FINISHED = "finished"  # every epoch is done
    MAX_STEPS = "max_steps"  # --max-steps reached (a checkpoint is written)
    STOP = "stop"  # every rank agreed to stop for a signal


@dataclass(frozen=True)
class Run:
    """What is fixed for the whole run, built once by :func:`_set_up`."""

    cfg: TrainConfig
    accelerator: Accelerator
    run_dir: Path
    data: TrainingData
    sampler: EpochBatchSampler
    loader: DataLoader
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    log: RunLog
    progress: Progress
    stop: StopRequest
    hooks: DebugHooks
    steps_per_epoch: int
    start_time: float
    ema: ModelEMA | None = None  # --ema-decay: the averaged weights, updated after each applied step


@dataclass
class LoopState:
    """What the loop changes as it goes: the checkpointed :class:`TrainerState` and the rest."""

    state: TrainerState
    last_saved_step: int = -1
    bad_streak: int = 0
    loss_names: list[str] = field(default_factory=list)


def _train(cfg: TrainConfig, accelerator: Accelerator) -> int:
    run, loop = _set_up(cfg, accelerator)
    outcome = _train_epochs(run, loop)
    return _finish(run, loop, outcome)


def _set_up(cfg: TrainConfig, accelerator: Accelerator) -> tuple[Run, LoopState]:
    """Steps 1b-4 of the module docstring: run folder, data, model and optimizer, resume, logs."""
    start_time = time.time()
    world = accelerator.num_processes
    run_dir, resume_from = _run_dir_and_resume(cfg, accelerator)
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    stop = StopRequest().install()

    # a resumed run keeps the split of the run it resumes (its split.json), unless told otherwise
    resume_split = resume_from.parent.parent / SPLIT_NAME if resume_from is not None else None
    data = prepare_data(cfg, run_dir, accelerator, resume_split=resume_split)
    repeats = run_repeat_factors(cfg.repeat_factor_threshold, data.train_records, data.class_names)
    sampler, loader = _train_loader(cfg, accelerator, data, repeats)
    steps_per_epoch = math.ceil(len(sampler.epoch_batches()) / cfg.grad_accum_steps)
    clock = ScheduleClock.fresh(steps_per_epoch, sampler.epoch_steps(cfg.epochs, cfg.grad_accum_steps)
                                if repeats is not None else None)  # epochs of different lengths

    global_batch = cfg.batch_size * world * cfg.grad_accum_steps
    lr = effective_lr(cfg, global_batch)
    model, optimizer, scheduler = _model_and_optimizer(cfg, accelerator, lr, clock, len(data.class_names))
    ema = build_ema(cfg, accelerator.unwrap_model(model), clock.total_steps(cfg.epochs))
    state = TrainerState(**layout_fields(cfg, world), schedule=clock.to_json())
    settings, layout_change, resume_changes = run_settings(cfg, data.train_records), None, {}
    if resume_from is not None:
        state, layout_change, resume_changes = _resume(
            accelerator, resume_from, state, ResumeContext(cfg, sampler, scheduler, lr, _aspect_ratios(data)),
            Trainables(model, optimizer, scheduler, ema), settings)

    resolved = {"effective_lr": lr, "global_batch": global_batch, "steps_per_epoch": steps_per_epoch,
                "warmup_steps": resolve_warmup_steps(cfg, steps_per_epoch), "world_size": world,
                "min_size": list(cfg.min_size), "eval_min_size": eval_min_size(cfg),
                "device": str(accelerator.device), "distributed_type": str(accelerator.distributed_type),
                "mixed_precision": accelerator.mixed_precision, "data_dir": str(data.data_dir),
                "train_images": len(data.train), "val_images": len(data.val or []), "test_images": len(data.test),
                "class_names": list(data.class_names), **data.card_info(),
                "data_fingerprint": settings["data_fingerprint"], "resume_changes": resume_changes,
                "repeat_factors": repeats.to_json() if repeats is not None else None,
                "steps_by_epoch": list(clock.epoch_steps) if clock.epoch_steps is not None else None}
    if layout_change is not None:
        resolved["layout_change"] = layout_change.to_json()
    if accelerator.is_main_process:
        _write_config(run_dir, cfg, resolved, data)
    log = RunLog(accelerator, run_dir, resolve_trackers(cfg.report_to, cfg.tensorboard), {**cfg.to_dict(), **resolved})
    dropped = log.drop_metrics_after(state.global_step) if resume_from else 0
    log.event("resumed" if resume_from else "started", checkpoint=str(resume_from) if resume_from else None,
              global_step=state.global_step, epoch=state.epoch, world_size=world, slurm_job_id=slurm_job_id(),
              resume_changes=resume_changes, metrics_dropped=dropped)
    if layout_change is not None:
        log.event("layout_changed", **layout_change.to_json())
    logger.info("run folder %s; %d processes on %s; %d train images, %d steps/epoch, global batch %d, lr %.5g",
                run_dir, world, accelerator.device, len(data.train), steps_per_epoch, global_batch, lr)
    progress = Progress(cfg.progress and accelerator.is_main_process, clock.total_steps(cfg.epochs), state.global_step)
    hooks = DebugHooks(cfg.debug_nan_at_step, cfg.debug_nan_rank, cfg.debug_record_samples, run_dir,
                       accelerator.process_index)
    run = Run(cfg, accelerator, run_dir, data, sampler, loader, model, optimizer, scheduler, log, progress, stop,
              hooks, steps_per_epoch, start_time, ema=ema)
    if cfg.pictures and resume_from is None and accelerator.is_main_process:  # sampler at epoch 0, batch 0
        write_start_pictures(run_dir, data.train_records, loader.dataset, list(islice(sampler, PREVIEW_BATCHES)),
                             data.class_names, class_colours(data.class_names))
    return run, LoopState(state, last_saved_step=state.global_step if resume_from else -1)


def _train_loader(cfg: TrainConfig, accelerator: Accelerator, data: TrainingData,
                  repeats: RepeatFactors | None) -> tuple[EpochBatchSampler, DataLoader]:
    """The sharded, optionally aspect-ratio-grouped and repeat-factor-expanded batch sampler and the
    DataLoader over it."""
    train_set = SeededSampleDataset(data.train, cfg.seed)
    group_ids = None
    if cfg.aspect_ratio_group_factor >= 0:
        group_ids = aspect_ratio_groups(_aspect_ratios(data), cfg.aspect_ratio_group_factor)
    sampler = EpochBatchSampler(len(train_set), cfg.batch_size, accelerator.num_processes, accelerator.process_index,
                                cfg.seed, group_ids=group_ids,
                                repeat_factors=repeats.image_factors if repeats is not None else None)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate_detection,
                        pin_memory=accelerator.device.type == "cuda", persistent_workers=cfg.workers > 0,
                        worker_init_fn=ignore_stop_signals_in_worker,  # a stop signal is the main process's
                        # its own generator: starting an epoch's iterator must not draw from the global
                        # RNG, or a resumed run's random stream would shift (samples are seeded anyway)
                        generator=torch.Generator().manual_seed(cfg.seed))
    return sampler, loader


def _aspect_ratios(data: TrainingData) -> list[float]:
    return [r.width / r.height for r in data.train_records]


def _model_and_optimizer(cfg: TrainConfig, accelerator: Accelerator, lr: float, clock: ScheduleClock,
                         num_classes: int):
    """The detector (``num_classes`` classes plus background) and optimizer wrapped by ``accelerator.prepare``
    (DDP with several processes), and the schedule, stepped by the loop once per optimizer step and
    checkpointed as JSON by :mod:`distdet.training.checkpoints` (not registered with Accelerate, which
    would pickle it)."""
    with accelerator.main_process_first():  # the first process fills the weights cache
        model = build_model(cfg.model, num_classes, weights=cfg.weights, backbone_weights=cfg.backbone_weights,
                            min_size=cfg.min_size, max_size=cfg.max_size, eval_min_size=cfg.eval_min_size,
                            trainable_backbone_layers=cfg.trainable_backbone_layers,
                            box_batch_size_per_image=cfg.box_batch_size_per_image,
                            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image)
    attach_batch_scales(model, cfg.seed)  # several --min-size: the seeded size of each batch
    optimizer = build_optimizer(model, cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, clock.steps_per_epoch, clock.epoch_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler


def _train_epochs(run: Run, loop: LoopState) -> Outcome:
    """Step 5: epochs until the last one, ``--max-steps`` or a stop signal; after each epoch
    evaluate (every ``--eval-every`` epochs and after the last) and checkpoint."""
    cfg, state = run.cfg, loop.state
    while state.epoch < cfg.epochs and not _max_steps_reached(run, loop):
        outcome = _run_epoch(run, loop)
        if outcome is not Outcome.EPOCH_END:
            return outcome
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
        if cfg.eval_every and (state.epoch % cfg.eval_every == 0 or state.epoch == cfg.epochs):
            _evaluate_and_keep_best(run, loop)
        _checkpoint(run, loop)
        if run.accelerator.is_main_process:
            write_results_csv(run.run_dir)
    return Outcome.MAX_STEPS if _max_steps_reached(run, loop) else Outcome.FINISHED


def _run_epoch(run: Run, loop: LoopState) -> Outcome:
    """Train the rest of the current epoch: EPOCH_END, STOP or MAX_STEPS."""
    cfg, accelerator, state = run.cfg, run.accelerator, loop.state
    accum = cfg.grad_accum_steps
    run.sampler.set_epoch(state.epoch)
    first_batch = state.step_in_epoch * accum
    run.sampler.set_start(first_batch)
    start_scale_epoch(accelerator.unwrap_model(run.model), state.epoch, first_batch)
    num_batches = len(run.sampler.epoch_batches())
    run.model.train()

    window = _Window()
    group_bad, bad_components = False, None
    batches = iter(run.loader)
    for b in range(first_batch, num_batches):
        t0 = time.perf_counter()
        images, targets = _to_device(next(batches), accelerator.device)
        window.data_time += time.perf_counter() - t0
        run.hooks.record(state.epoch, state.global_step, targets)
        group_start = b - b % accum
        group_size = min(accum, num_batches - group_start)
        # Tell accumulate() where this batch sits, so the last one of a (possibly short) group syncs.
        accelerator.step = accum - group_size + (b - group_start)
        with accelerator.accumulate(run.model):
            components, local_bad, any_bad, any_stop = _forward_backward(run, loop, images, targets,
                                                                         loss_scale=accum / group_size)
        if local_bad:
            bad_components = components
        if any_bad:
            group_bad = True
        else:
            window.add(components, len(images))
        if b - group_start < group_size - 1:  # not yet the end of an optimizer step
            continue
        _optimizer_step(run, loop, group_bad, bad_components)
        group_bad, bad_components = False, None
        state.global_step += 1
        state.step_in_epoch += 1
        _log_step(run, loop, window, last_in_epoch=b == num_batches - 1)
        if any_stop:
            return Outcome.STOP
        if _max_steps_reached(run, loop):
            _checkpoint(run, loop)
            return Outcome.MAX_STEPS
        if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
            _checkpoint(run, loop)
    return Outcome.EPOCH_END


def _to_device(batch: tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]],
               device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images, targets = batch
    return ([img.to(device, non_blocking=True) for img in images],
            [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])


def _forward_backward(run: Run, loop: LoopState, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                      loss_scale: float) -> tuple[torch.Tensor, bool, bool, bool]:
    """Forward one batch, then agree with every rank in ONE all-reduce on "non-finite loss
    anywhere?" and "stop requested anywhere?"; backward unless some rank's loss was non-finite.

    Returns (this rank's loss components + total, local bad, any rank bad, any rank stopping).
    """
    loss_dict = run.model(images, targets)
    if not loop.loss_names:
        loop.loss_names = sorted(loss_dict)
    loss = run.hooks.poison(sum(loss_dict[name] for name in loop.loss_names), loop.state.global_step)
    components = torch.stack([loss_dict[n].detach().float() for n in loop.loss_names] + [loss.detach().float()])
    local_bad = not bool(torch.isfinite(components).all())
    any_bad, any_stop = agree_any(run.accelerator, [local_bad, run.stop.requested])
    if not any_bad:
        run.accelerator.backward(loss * loss_scale)
    return components, local_bad, any_bad, any_stop


def _optimizer_step(run: Run, loop: LoopState, group_bad: bool, bad_components: torch.Tensor | None) -> None:
    """Clip and step, or skip a step whose loss was non-finite on any rank (weights untouched)."""
    cfg, accelerator = run.cfg, run.accelerator
    grad_norm = None
    if not group_bad:
        max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), max_norm)
        # With fp16 the gradient scaler handles overflowing gradients itself.
        if accelerator.mixed_precision != "fp16" and grad_norm is not None and not torch.isfinite(grad_norm):
            group_bad = True
    if group_bad:
        run.optimizer.zero_grad(set_to_none=True)
        loop.bad_streak += 1
        _report_bad_step(run, loop, bad_components, grad_norm)
        if loop.bad_streak >= cfg.max_bad_steps:
            raise TrainingError(f"stopping: {loop.bad_streak} consecutive steps with a non-finite loss or gradient "
                                f"(--max-bad-steps {cfg.max_bad_steps}); last at step {loop.state.global_step}. "
                                f"Lower --lr, enable --clip-grad-norm, or check the data.")
        return
    run.optimizer.step()
    if not accelerator.optimizer_step_was_skipped:
        run.scheduler.step()
        loop.state.updates += 1
        if run.ema is not None:
            run.ema.update()
    run.optimizer.zero_grad(set_to_none=True)
    loop.bad_streak = 0


def _report_bad_step(run: Run, loop: LoopState, bad_components: torch.Tensor | None,
                     grad_norm: torch.Tensor | None) -> None:
    accelerator, state = run.accelerator, loop.state
    names = loop.loss_names + ["loss"]
    local = bad_components if bad_components is not None else torch.zeros(len(names))
    per_rank = accelerator.gather(local.to(accelerator.device).reshape(1, -1)).cpu().tolist()
    details = {f"rank{r}": dict(zip(names, values)) for r, values in enumerate(per_rank)
               if not all(math.isfinite(v) for v in values)}
    message = (f"step {state.global_step} skipped: non-finite "
               f"{'loss' if details else 'gradient norm'} (bad steps in a row: {loop.bad_streak}); {details or grad_norm}")
    logger.warning(message)
    run.progress.write(message)
    run.log.event("bad_step", global_step=state.global_step, epoch=state.epoch, components=details,
                  grad_norm=None if grad_norm is None else float(grad_norm), consecutive=loop.bad_streak)


@dataclass
class _Window:
    """Loss sums and timings since the last log line (this rank)."""

    sums: torch.Tensor | None = None
    count: int = 0
    images: int = 0
    data_time: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def add(self, components: torch.Tensor, images: int) -> None:
        self.sums = components.cpu() if self.sums is None else self.sums + components.cpu()
        self.count += 1
        self.images += images

    def reset(self) -> None:
        self.sums, self.count, self.images, self.data_time, self.start = None, 0, 0, 0.0, time.perf_counter()


def _log_step(run: Run, loop: LoopState, window: _Window, last_in_epoch: bool) -> None:
    """Progress bar every step; metrics (averaged over ranks) every --log-every steps."""
    cfg, accelerator, state = run.cfg, run.accelerator, loop.state
    lr = run.optimizer.param_groups[0]["lr"]
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    if state.global_step % cfg.log_every != 0 and not last_in_epoch:
        run.progress.update(state.epoch, cfg.epochs, {"lr": lr})
        return
    names = loop.loss_names + ["loss"]
    local = torch.zeros(len(names) + 3, dtype=torch.float64)
    if window.sums is not None:
        local[: len(names)] = window.sums.double()
    local[len(names):] = torch.tensor([window.count, window.images, window.data_time], dtype=torch.float64)
    total = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
    count, images, data_time = total[len(names):].tolist()
    # a window of skipped steps only has no losses to report
    values: dict[str, float] = {n: float(total[i]) / count for i, n in enumerate(names)} if count else {}
    values.update(lr=lr, images_per_s=images / elapsed,
                  data_wait_frac=data_time / accelerator.num_processes / elapsed)
    run.log.metrics("train", state.global_step, values, epoch=state.epoch)
    run.progress.update(state.epoch, cfg.epochs, {"loss": values.get("loss", float("nan")), "lr": lr,
                                                  "img/s": values["images_per_s"]})
    window.reset()


def _max_steps_reached(run: Run, loop: LoopState) -> bool:
    return bool(run.cfg.max_steps) and loop.state.global_step >= run.cfg.max_steps


def _checkpoint(run: Run, loop: LoopState) -> None:
    """A complete checkpoint of the current step, unless one was just written; every rank calls it."""
    state = loop.state
    if state.global_step == loop.last_saved_step:
        return
    path = save_checkpoint(run.accelerator, run.run_dir, state, run.cfg.keep_checkpoints,
                           Trainables(run.model, run.optimizer, run.scheduler, run.ema),
                           run_settings(run.cfg, run.data.train_records))
    loop.last_saved_step = state.global_step
    run.log.event("checkpoint", path=str(path), global_step=state.global_step, epoch=state.epoch,
                  step_in_epoch=state.step_in_epoch)


def _finish(run: Run, loop: LoopState, outcome: Outcome) -> int:
    """Step 6, for every way the epochs ended: a checkpoint of the last step, then either the
    interruption note (exit 75) or the final model, test evaluation and report (exit 0)."""
    run.progress.close()
    run.hooks.close()
    _checkpoint(run, loop)
    if outcome is Outcome.STOP:
        _note_interruption(run, loop)
        status = EXIT_INTERRUPTED
    else:
        _save_final_model(run, loop, outcome)
        status = EXIT_OK
    run.stop.uninstall()
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return status


def _note_interruption(run: Run, loop: LoopState) -> None:
    """All ranks agreed to stop: requeue under Slurm, note the interruption and which rank got which signal."""
    accelerator, state = run.accelerator, loop.state
    requeued, requeue_message = False, None
    job = slurm_job_id()
    if accelerator.is_main_process and job and run.cfg.requeue_on_signal:
        requeued, requeue_message = requeue_slurm_job(job)
        (logger.info if requeued else logger.error)("%s", requeue_message)
    received = gather_object([run.stop.signal_name])  # which rank got which signal
    note = {"signals": {f"rank{r}": name for r, name in enumerate(received) if name},
            "global_step": state.global_step, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
            "checkpoint": str(run.run_dir / CHECKPOINTS_DIR), "slurm_job_id": job, "requeued": requeued,
            "requeue_message": requeue_message}
    run.log.event("interrupted", **note)
    if accelerator.is_main_process:
        _append_interruption(run.run_dir, note)
        logger.warning("stopped at step %d on request (%s); resume with --resume auto --output-dir %s",
                       state.global_step, ", ".join(f"{r}: {n}" for r, n in note["signals"].items()), run.run_dir)


def _append_interruption(run_dir: Path, note: dict[str, Any]) -> None:
    path = run_dir / "interruptions.json"
    notes = json.loads(path.read_text()) if path.is_file() else []
    notes.append({**note, "time": datetime.now().isoformat(timespec="seconds")})
    atomic_write_json(path, notes)


def _save_final_model(run: Run, loop: LoopState, outcome: Outcome) -> None:
    """The final test evaluation (``--final-eval``), then the final weights and card (saved once,
    with the test metrics), ``report.json`` and the plots."""
    accelerator, state = run.accelerator, loop.state
    weights = _weights_for_use(run)
    test_metrics: dict[str, Any] = {}
    if run.cfg.final_eval:
        test_metrics = scalar_metrics(_evaluate(run, weights, run.data.test, out_dir=run.run_dir / "test_eval"))
        run.log.metrics("test", state.global_step, test_metrics, epoch=state.epoch)
    report = {"status": outcome.value, "global_step": state.global_step, "epoch": state.epoch,
              "updates": state.updates, "best_metric": state.best_metric, "best_step": state.best_step,
              "test_metrics": test_metrics, "wall_time_s": time.time() - run.start_time,
              "world_size": accelerator.num_processes}
    if accelerator.is_main_process:
        card = _model_card(run, loop, {"test": test_metrics} if test_metrics else {})
        save_detector(weights, card, run.run_dir)
        atomic_write_json(run.run_dir / "report.json", report)
        write_results_csv(run.run_dir)  # with the final test evaluation
        _write_plots(run.run_dir)
    run.log.event("finished", **{k: v for k, v in report.items() if k != "test_metrics"})


def _weights_for_use(run: Run) -> torch.nn.Module:
    """The weights validation, ``best/``, the test evaluation and ``model.pt`` use: the EMA's with
    ``--ema-decay`` (every rank must call this then), else the trained model's."""
    model = run.accelerator.unwrap_model(run.model)
    return run.ema.weights_for_use(model, run.accelerator) if run.ema is not None else model


def _evaluate(run: Run, weights: torch.nn.Module, dataset, out_dir: Path | None = None) -> dict[str, Any]:
    """Score ``weights`` on ``dataset`` with every rank (see :func:`distdet.eval.evaluate_model`)."""
    release_free_memory()  # before the evaluation's DataLoader workers fork from this process
    return evaluate_model(weights, dataset, run.accelerator,
                          class_names=run.data.class_names, category_ids=run.data.category_ids,
                          batch_size=run.cfg.eval_batch_size, num_workers=run.cfg.workers, out_dir=out_dir)


def _evaluate_and_keep_best(run: Run, loop: LoopState) -> None:
    cfg, state = run.cfg, loop.state
    split, dataset = run.data.eval_split
    weights = _weights_for_use(run)
    metrics = scalar_metrics(_evaluate(run, weights, dataset))
    run.log.metrics(split, state.global_step, metrics, epoch=state.epoch)
    value = metrics.get(cfg.best_metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        logger.warning("evaluation gave no finite %r; best checkpoint not updated", cfg.best_metric)
        return
    logger.info("epoch %d: %s %s = %.4f", state.epoch, split, cfg.best_metric, value)
    if state.best_metric is None or value > state.best_metric:
        state.best_metric, state.best_step = float(value), state.global_step
        if run.accelerator.is_main_process:
            best_dir = run.run_dir / "best"
            save_detector(weights, _model_card(run, loop, {split: metrics}), best_dir)
        run.log.event("best", metric=cfg.best_metric, value=float(value), global_step=state.global_step)


def _model_card(run: Run, loop: LoopState, metrics: dict[str, dict[str, float]]) -> ModelCard:
    """The card saved with final and best weights; ``metrics`` maps split name to scalar metrics."""
    cfg, state = run.cfg, loop.state
    return ModelCard(
        model=cfg.model,
        class_names=list(run.data.class_names),
        build={"min_size": size_record(cfg.min_size), "eval_min_size": eval_min_size(cfg), "max_size": cfg.max_size,
               "frozen_batchnorm": uses_frozen_batchnorm(run.accelerator.unwrap_model(run.model))},
        info={"trained_with": "distdet train", "run_dir": str(run.run_dir), "global_step": state.global_step,
              "epoch": state.epoch, **run.data.card_info(), **weights_info(run.ema), "metrics": metrics,
              "versions": _versions()},
    )


def _write_plots(run_dir: Path) -> None:
    """Training plots from metrics.jsonl; a plotting failure is logged, never fatal."""
    try:
        for path in write_training_plots(run_dir):
            logger.info("plot written: %s", path)
    except (FileNotFoundError, ValueError) as exc:  # a run shorter than --log-every logs no metrics
        logger.info("no training plots: %s", exc)
    except Exception:  # noqa: BLE001 - the weights are saved; plots are a convenience
        logger.exception("could not write the training plots of %s", run_dir)


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "accelerate": accelerate.__version__, "distdet": distdet.__version__}


def _run_dir_and_resume(cfg: TrainConfig, accelerator: Accelerator) -> tuple[Path, Path | None]:
    """Decide the run folder and the checkpoint to resume from on the main process; share them."""
    decision: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            output_dir = Path(cfg.output_dir) if cfg.output_dir else None
            if output_dir is not None:  # before looking at its checkpoints: a live run may be writing them
                output_dir.mkdir(parents=True, exist_ok=True)
                lock_run_folder(output_dir)
            checkpoint, implied_run = resolve_resume(cfg.resume, output_dir)
            run_dir = output_dir or implied_run or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
            if cfg.resume == "auto" and checkpoint is None:
                logger.info("--resume auto: no complete checkpoint in %s, starting from scratch", run_dir)
            if checkpoint is None and complete_checkpoints(run_dir):
                raise TrainingError(f"run folder {run_dir} already holds checkpoints; pass --resume auto to "
                                    f"continue it, or choose another --output-dir")
            run_dir.mkdir(parents=True, exist_ok=True)
            lock_run_folder(run_dir)  # held by this process until it exits (a no-op if taken above)
            decision = [(str(run_dir.resolve()), str(checkpoint.resolve()) if checkpoint else None, None)]
        except (TrainingError, FileNotFoundError, CheckpointError, RunFolderLocked) as exc:
            decision = [(None, None, str(exc))]
    broadcast_object_list(decision)
    run_dir, checkpoint, error = decision[0]
    if error:
        raise TrainingError(error)
    return Path(run_dir), Path(checkpoint) if checkpoint else None


def _resume(accelerator: Accelerator, checkpoint: Path, current: TrainerState, context: ResumeContext,
            parts: Trainables, settings: dict[str, Any],
            ) -> tuple[TrainerState, LayoutChange | None, dict[str, list[Any]]]:
    """Load ``checkpoint`` (verified, nothing unpickled) and continue under ``current``'s layout (the
    same or another one); then apply the optimizer settings of the current flags, returning what changed."""
    wanted = group_hyperparameters(parts.optimizer)
    saved = load_checkpoint(accelerator, checkpoint, parts, settings, context.cfg.deterministic)
    resumed, change = continue_on_layout(saved, current, str(checkpoint), context)
    logger.info("resumed from %s: epoch %d, step %d in epoch, global step %d", checkpoint, saved.epoch,
                saved.step_in_epoch, saved.global_step)
    return resumed, change, apply_hyperparameters(parts.optimizer, parts.scheduler, wanted)


def _write_config(run_dir: Path, cfg: TrainConfig, resolved: dict[str, Any], data: TrainingData) -> None:
    atomic_write_json(run_dir / "config.json", {
        "config": cfg.to_dict(),
        "resolved": resolved,
        "split_manifest": {"path": str(data.manifest_path), "contents": data.manifest()},
        "versions": _versions(),
        "command": sys.argv,
        "time": datetime.now().isoformat(timespec="seconds"),
    })

