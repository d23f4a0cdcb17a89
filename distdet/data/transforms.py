"""Named transform presets built from torchvision.transforms.v2 (boxes move with the pixels).

Presets take ``(image, target)`` with a uint8 :class:`tv_tensors.Image` and a target dict
holding ``boxes`` (:class:`tv_tensors.BoundingBoxes`) and ``labels``, as produced inside
:class:`distdet.data.DetectionDataset`, and return the image as float32 in ``[0, 1]``.
Presets that can remove boxes end with ``SanitizeBoundingBoxes``, which drops the matching
labels too.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from distdet.data.presets import DEFAULT_TRAIN_PRESET, PRESETS


def _to_float() -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def _train_transforms(preset: str) -> list[v2.Transform]:
    if preset == "none":
        return []
    if preset == "hflip":
        return [v2.RandomHorizontalFlip(p=0.5)]
    # "strong": colour jitter, zoom out (adds border, boxes shrink), flip, then drop boxes that
    # became too small together with their labels.
    return [
        v2.RandomPhotometricDistort(p=0.5),
        v2.RandomZoomOut(fill=0, side_range=(1.0, 1.5), p=0.3),
        v2.RandomHorizontalFlip(p=0.5),
        v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter="default"),
    ]


def get_transforms(preset: str = DEFAULT_TRAIN_PRESET, train: bool = True) -> Callable:
    """Return the v2 transform of ``preset`` ("none", "hflip", "strong").

    With ``train=False`` every preset gives the evaluation transform (conversion only, no
    randomness). Raises ValueError naming the known presets for an unknown name.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown transform preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    steps = _train_transforms(preset) if train else []
    return v2.Compose([*steps, *_to_float()])
