"""Named transform presets built from torchvision.transforms.v2 (boxes move with the pixels).

Presets take ``(image, target)`` with a uint8 :class:`tv_tensors.Image` and a target dict
holding ``boxes`` (:class:`tv_tensors.BoundingBoxes`) and ``labels``, as produced inside
:class:`distdet.data.DetectionDataset`, and return the image as float32 in ``[0, 1]``.
Presets that can remove boxes end with ``SanitizeBoundingBoxes``, which drops the matching
labels too.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import v2

from distdet.data.presets import DEFAULT_TRAIN_PRESET, PRESETS


def _to_float() -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


class PhotometricDistortKeepChannels(v2.RandomPhotometricDistort):
    """SSD's photometric distortion (brightness, contrast, saturation, hue) without its channel
    permutation, which keeps the class of a face-mask box only by luck.

    What tells the classes apart is largely colour. Measured on the real data
    (``benchmarks/box_colours.py``, the central half of each box): 96.7% of the 717
    ``without_mask`` boxes are ordered like skin (red > green > blue), none is bluer than red;
    50.1% of the 3232 ``with_mask`` boxes are bluer than red; the mean colour alone puts 92.3%
    of both classes' boxes nearest their own class, and 73.4-81.2% after four of the five
    non-identity channel permutations (92.7% after swapping green and blue). The stock transform
    permutes the RGB channels of half the images (p = 0.5; 5 of the 6 permutations change
    colours) while the label stays: skin turns blue or green, and a light-blue mask with red and
    blue swapped turns skin-toned, a ``with_mask`` box that looks like a bare face. The other
    operations are label-safe: brightness and contrast scale a pixel or blend it with one grey
    value, saturation blends it with its own grey (factors 0.5-1.5, all positive, so the order
    of its channels stays), and hue moves at most 0.05 of the circle (18 degrees), which keeps
    skin (hue about 5-35 degrees) red-dominant and a light-blue mask (about 200-220 degrees)
    blue-dominant. The random
    draws are those of the stock transform (the permutation is drawn, then dropped), so the
    later transforms see the same random stream.
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {**super().make_params(flat_inputs), "channel_permutation": None}


def _train_transforms(preset: str) -> list[v2.Transform]:
    if preset == "none":
        return []
    if preset == "hflip":
        return [v2.RandomHorizontalFlip(p=0.5)]
    # "strong": colour jitter keeping the channel order, zoom out (adds border, boxes shrink),
    # flip, then drop boxes that became too small together with their labels.
    return [
        PhotometricDistortKeepChannels(p=0.5),
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
