"""The one inference forward pass: evaluation, batch prediction and the ``Detector`` API use it.

:func:`detect` moves a batch of images to the model's device, runs the detector under
``torch.inference_mode()`` and the autocast of the requested mixed precision, and returns the
detections on the CPU in full precision, so that every caller sees the same numbers for the
same batch, device and precision.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from distdet.runtime.options import MIXED_PRECISION_CHOICES

#: The autocast dtype of each ``--mixed-precision`` value (None: no autocast).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = dict(
    zip(MIXED_PRECISION_CHOICES, (None, torch.float16, torch.bfloat16), strict=True))


def check_mixed_precision(mixed_precision: str) -> str:
    """Return ``mixed_precision`` if it is one of :data:`MIXED_PRECISION_CHOICES`, else raise ValueError."""
    if mixed_precision not in AUTOCAST_DTYPES:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, "
                         f"got {mixed_precision!r}")
    return mixed_precision


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``mixed_precision`` on ``device`` (a no-op for ``"no"``)."""
    dtype = AUTOCAST_DTYPES[check_mixed_precision(mixed_precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def detect(model: nn.Module, images: Sequence[torch.Tensor], device: torch.device,
           mixed_precision: str = "no") -> list[dict[str, torch.Tensor]]:
    """One forward pass of an eval-mode detector over ``images`` (float32 ``[3, H, W]`` in [0, 1]).

    Returns per image CPU tensors ``boxes`` float32 ``[K, 4]`` (xyxy pixels), ``scores``
    float32 ``[K]`` and ``labels`` int64 ``[K]``. The model must already be on ``device``
    and in eval mode; its mode is not changed.
    """
    if not images:
        return []
    with torch.inference_mode(), autocast(device, mixed_precision):
        outputs = model([image.to(device) for image in images])
    return [{"boxes": out["boxes"].float().cpu(), "scores": out["scores"].float().cpu(),
             "labels": out["labels"].to(torch.int64).cpu()} for out in outputs]
