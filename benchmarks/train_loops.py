"""Pieces shared by ``train_throughput.py`` and ``gpu_check.py`` (run those as ``python benchmarks/NAME.py``).

- :func:`trainer_batches`: the batches ``train.py`` trains on for a :class:`TrainConfig`, in its
  order (same split, transforms, ``EpochBatchSampler`` order, per-sample seeding and DataLoader
  settings as section 2 of :mod:`distdet.training.trainer`, one process), so a bare loop can
  train on identical batches: same images, same order, same sizes (with several ``--min-size``,
  the trainer's seeded size of each batch). The trainer's ``--debug-record-samples`` file lets a
  benchmark check that (:func:`same_batches`).
- :func:`bare_run`: the tutorial's step (sum of the losses, ``zero_grad``, ``backward``,
  ``step``; plain SGD, no clipping, no agreement, no logging) at a precision, timed by
  :func:`timed_loop`.
- :func:`trainer_throughput`: images/s and data wait of the measured steps of a trainer run,
  from its ``metrics.jsonl``.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
#: train.py flags of each precision row; "fp32" means IEEE fp32 everywhere (``--tf32 off``).
PRECISION_FLAGS = {
    "fp32": ["--mixed-precision", "no", "--tf32", "off"],
    "tf32": ["--mixed-precision", "no", "--tf32", "on"],
    "bf16": ["--mixed-precision", "bf16", "--tf32", "off"],
    "fp16": ["--mixed-precision", "fp16", "--tf32", "off"],
}
CUDA_ONLY = ("tf32", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]


def child_env(threads: int | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the repository on PYTHONPATH, and ``OMP_NUM_THREADS`` when given."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra or {})
    return env


def free_port() -> int:
    """A free TCP port on this machine, for ``accelerate launch --main_process_port``."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measured_run_flags(max_steps: int, run_dir: Path) -> list[str]:
    """train.py flags that make a run a measurement: a step count, no evaluation, sample ids recorded.

    ``--debug-record-samples`` writes one JSON line per step (microseconds against steps of
    tens of milliseconds or more) so the bare loop's batches can be compared with the trainer's.
    """
    return ["--max-steps", str(max_steps), "--epochs", "1000", "--eval-every", "0", "--no-final-eval",
            "--output-dir", str(run_dir), "--debug-record-samples"]


def trainer_batches(cfg, pin_memory: bool = False, scales=None) -> Iterator[Batch]:
    """The trainer's training batches for ``cfg`` on one process, epoch after epoch, without end.

    ``scales`` (a model's :class:`~distdet.training.multiscale.BatchScales`) is started at each
    epoch as the trainer starts it, so the model trains each batch at the trainer's size."""
    from torch.utils.data import DataLoader

    from distdet.classes import CLASS_NAMES
    from distdet.data import DetectionDataset, build_index, collate_detection, get_transforms
    from distdet.data.synthetic import resolve_data_dir
    from distdet.training.data_setup import training_split
    from distdet.training.sampling import EpochBatchSampler, SeededSampleDataset, aspect_ratio_groups

    records = build_index(resolve_data_dir(cfg.data_dir), CLASS_NAMES).records
    train_records = training_split(cfg, records, None).select(records)["train"]
    dataset = SeededSampleDataset(DetectionDataset(train_records, transforms=get_transforms(cfg.augment, train=True)),
                                  cfg.seed)
    group_ids = None
    if cfg.aspect_ratio_group_factor >= 0:
        group_ids = aspect_ratio_groups([r.width / r.height for r in train_records], cfg.aspect_ratio_group_factor)
    sampler = EpochBatchSampler(len(dataset), cfg.batch_size, 1, 0, cfg.seed, group_ids=group_ids)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate_detection,
                        pin_memory=pin_memory, persistent_workers=cfg.workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        if scales is not None:
            scales.start_epoch(epoch, 0)
        yield from loader
        epoch += 1


def bare_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
              precision: str) -> Callable[[list[torch.Tensor], list[dict]], None]:
    """One tutorial training step at ``precision`` (autocast for bf16/fp16, a gradient scaler for fp16)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step(images: list[torch.Tensor], targets: list[dict]) -> None:
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


def timed_loop(batches: Iterator[Batch], step: Callable[[list[torch.Tensor], list[dict]], None], steps: int,
               warmup: int, device: torch.device, deadline: float | None = None) -> dict[str, Any]:
    """Run ``warmup + steps`` steps; images/s and data-wait share of the last ``steps``.

    CUDA work is synchronised only where the measured span starts and ends, as a bare loop
    would. ``deadline`` (``time.monotonic``): stop early and return ``{"cut": True, ...}``.
    """
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    image_ids: list[list[int]] = []
    images_seen, data_time, start = 0, 0.0, None
    for index in range(warmup + steps):
        if deadline is not None and time.monotonic() > deadline:
            return {"cut": True, "image_ids": image_ids}
        if index == warmup:
            sync()
            start, data_time, images_seen = time.perf_counter(), 0.0, 0
        t0 = time.perf_counter()
        images, targets = next(batches)
        data_time += time.perf_counter() - t0
        image_ids.append([int(t["image_id"]) for t in targets])
        step(images, targets)
        images_seen += len(images)
    sync()
    elapsed = time.perf_counter() - start
    return {"cut": False, "images_per_s": images_seen / elapsed, "data_wait_frac": data_time / elapsed,
            "image_ids": image_ids}


def bare_run(cfg, device: torch.device, precision: str, steps: int, warmup: int,
             deadline: float | None = None) -> dict[str, Any]:
    """The bare loop on the trainer's batches for ``cfg``; adds ``peak_mem_mib`` on CUDA."""
    from distdet.classes import CLASS_NAMES
    from distdet.modeling.models import build_model
    from distdet.runtime.tf32 import apply_tf32
    from distdet.training.multiscale import attach_batch_scales

    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        apply_tf32("on" if precision == "tf32" else "off")
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(cfg.model, len(CLASS_NAMES), weights=cfg.weights, backbone_weights=cfg.backbone_weights,
                        min_size=cfg.min_size, max_size=cfg.max_size, eval_min_size=cfg.eval_min_size,
                        trainable_backbone_layers=cfg.trainable_backbone_layers,
                        box_batch_size_per_image=cfg.box_batch_size_per_image,
                        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image).to(device).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scales = attach_batch_scales(model, cfg.seed)
    batches = trainer_batches(cfg, pin_memory=device.type == "cuda", scales=scales)
    try:
        result = timed_loop(batches, bare_step(model, optimizer, device, precision), steps, warmup, device, deadline)
    finally:
        batches.close()  # shuts the DataLoader workers down
    if device.type == "cuda":
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def trainer_throughput(run_dir: Path, warmup: int, images_per_step: int) -> dict[str, float]:
    """Images/s and data wait over the logged windows of ``metrics.jsonl`` that start at or after ``warmup``.

    Each ``train`` record covers the steps since the previous one (``--log-every``, or fewer at
    an epoch's end); a window that straddles ``warmup`` counts as warmup.
    """
    records = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"]
    images = seconds = data = 0.0
    previous = 0
    for record in records:
        if previous >= warmup:
            window_images = (record["step"] - previous) * images_per_step
            window_seconds = window_images / record["images_per_s"]
            images, seconds = images + window_images, seconds + window_seconds
            data += record["data_wait_frac"] * window_seconds
        previous = record["step"]
    if not seconds:
        raise ValueError(f"{run_dir}: no logged window after step {warmup} (steps logged: "
                         f"{[r['step'] for r in records]})")
    return {"images_per_s": images / seconds, "data_wait_frac": data / seconds}


def trainer_image_ids(run_dir: Path) -> list[list[int]]:
    """The image ids of each step of rank 0, from ``--debug-record-samples``."""
    return [r["image_ids"] for r in read_jsonl(Path(run_dir) / "debug" / "samples_rank0.jsonl")]


def same_batches(bare_ids: list[list[int]], trainer_ids: list[list[int]]) -> bool:
    """Whether both loops trained on the same images in the same batches, over the steps both ran."""
    steps = min(len(bare_ids), len(trainer_ids))
    return steps > 0 and bare_ids[:steps] == trainer_ids[:steps]
