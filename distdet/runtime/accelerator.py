"""Building the Accelerator safely: device, mixed precision, collective timeout, launch checks.

``train``, ``evaluate`` and ``predict`` all get their Accelerator from :func:`build_accelerator`,
so fp16 is refused on CPU, collectives time out after ``--dist-timeout`` seconds, the backend
is gloo on CPU and NCCL on GPUs, and a broken launch is refused, the same way for every
command. They all end through :func:`finish_process`.

Launching several CPU processes (gloo) with accelerate 1.x, measured on a machine without GPUs:

- works: ``accelerate launch --config_file launch/accelerate/cpu_2proc.yaml train.py ...``
  (``distributed_type: MULTI_GPU`` with ``use_cpu: true``), ``accelerate launch --multi_gpu
  --num_processes 2 train.py ...`` and ``torchrun --nproc_per_node 2 train.py ...``, because
  distdet creates the Accelerator with ``cpu=True`` when CUDA is unavailable;
- silently starts ONE process: ``accelerate launch --cpu --num_processes 2`` and a config file
  with ``distributed_type: MULTI_CPU``.

:func:`check_launch` refuses to train when the launcher says ``WORLD_SIZE > 1`` but the
Accelerator sees one process (every process would train on all data, unsynchronised).
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from distdet.runtime.options import DEFAULT_DIST_TIMEOUT_S, MIXED_PRECISION_CHOICES
from distdet.runtime.signals import EXIT_INTERRUPTED
from distdet.runtime.malloc import apply_malloc
from distdet.runtime.tf32 import apply_tf32

logger = logging.getLogger(__name__)

CPU_LAUNCH_HINT = (
    "to run N CPU processes use: accelerate launch --config_file launch/accelerate/cpu_2proc.yaml "
    "train.py ... (or accelerate launch --multi_gpu --num_processes N train.py ...)"
)


class LaunchError(RuntimeError):
    """The launcher and the Accelerator disagree, or a setting cannot be honoured."""


def resolve_mixed_precision(requested: str | None) -> str:
    """``--mixed-precision`` if given, else the launcher's (ACCELERATE_MIXED_PRECISION), else 'no'."""
    value = requested or os.environ.get("ACCELERATE_MIXED_PRECISION", "no") or "no"
    value = value.lower()
    if value not in MIXED_PRECISION_CHOICES:
        raise LaunchError(f"mixed precision {value!r} is not supported; use {', '.join(MIXED_PRECISION_CHOICES)}")
    return value


def build_accelerator(*, cpu: bool, mixed_precision: str | None, grad_accum_steps: int = 1,
                      dist_timeout: float = DEFAULT_DIST_TIMEOUT_S, tf32: str = "torch",
                      malloc: str = "keep") -> Accelerator:
    """Create the Accelerator; raise :class:`LaunchError` for fp16 on CPU or a broken launch.

    ``cpu``: use the CPU even when CUDA is available (the CPU is used anyway without CUDA).
    ``mixed_precision`` None means the launcher's setting (see :func:`resolve_mixed_precision`).
    ``tf32``: see :mod:`distdet.runtime.tf32`, applied before the Accelerator exists.
    ``malloc``: see :mod:`distdet.runtime.malloc`, applied before any model or data exists.
    """
    use_cpu = cpu or not torch.cuda.is_available()
    precision = resolve_mixed_precision(mixed_precision)
    if use_cpu and precision == "fp16":
        raise LaunchError(
            "--mixed-precision fp16 is not applied on CPU: Accelerate would silently train in fp32 "
            "(no autocast, no gradient scaler). Use --mixed-precision bf16 on CPU, or fp16 on a CUDA GPU."
        )
    apply_tf32(tf32)
    apply_malloc(malloc)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum_steps,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout))],
    )
    check_launch(accelerator)
    return accelerator


def check_launch(accelerator: Accelerator) -> None:
    """Refuse a launch where the environment promises more processes than the Accelerator has."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1 and accelerator.num_processes == 1:
        raise LaunchError(
            f"the launcher set WORLD_SIZE={world_size} but Accelerate sees a single process "
            f"(distributed type {accelerator.distributed_type}); every process would train on all "
            f"the data without synchronising. {CPU_LAUNCH_HINT}"
        )
    if (accelerator.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
            and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ):
        logger.warning(
            "accelerate launch started this single CPU process (with OMP_NUM_THREADS=%s). If you asked for "
            "several processes with --cpu --num_processes or a MULTI_CPU config, Accelerate ignored it; %s",
            os.environ.get("OMP_NUM_THREADS", "unset"), CPU_LAUNCH_HINT,
        )


def agree_any(accelerator: Accelerator, flags: list[bool]) -> list[bool]:
    """Element-wise OR of ``flags`` over all ranks (one small all-reduce); every rank must call it."""
    if accelerator.num_processes == 1:
        return list(flags)
    tensor = torch.tensor([1.0 if f else 0.0 for f in flags], device=accelerator.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def finish_process(status: int) -> int:
    """Every command's exit: leave the process group after a run that ended normally; return ``status``.

    Status 0 (done) and :data:`~distdet.runtime.signals.EXIT_INTERRUPTED` (75, stopped by a
    signal after a checkpoint) are reached by every rank through a final collective, so
    :func:`leave_process_group` cannot wait on a rank that is gone. Any other status may be
    one rank's alone: the process then exits without a barrier (the launcher ends the others).
    """
    if status in (0, EXIT_INTERRUPTED):
        leave_process_group()
    return status


def leave_process_group() -> None:
    """Tear the process group down after a final barrier; every rank must call it.

    A rank that simply exits can abort (SIGABRT, "terminate called without an active
    exception") when rank 0, which hosts the rendezvous store, has already gone: seen under
    Slurm requeues. Leaving the group explicitly makes a finished job exit 0 on every rank.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
