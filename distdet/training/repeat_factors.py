"""Repeat factors (``--repeat-factor-threshold T``): the LVIS rule, as detectron2 applies it.

For each class ``c``, ``f(c)`` is the fraction of the TRAINING images (the train part, after
any validation carve-out) that contain at least one (non-crowd) object of ``c``, and its
factor is ``r(c) = max(1, sqrt(T / f(c)))``. An image's factor is the largest factor of the
classes it contains; an image without objects has factor 1. A class no training image
contains has no factor (it cannot raise any image's).

``T`` is a fraction of images: classes in more than ``T`` of the images are not repeated.
LVIS's usual 0.001 does nothing on the face-mask data, whose rarest class is in 10.8 % of the
683 tutorial training images; 0.5 repeats those images 2.15 times on average.

This module holds the statistics only. How the factors become an epoch list (stochastic
rounding per epoch, every repeat its own entry) is :mod:`distdet.training.sampling`'s job.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distdet.data.records import ImageRecord

logger = logging.getLogger(__name__)


def image_classes(record: ImageRecord) -> set[int]:
    """The labels (1..K) of the objects the trainer sees in ``record``: crowd regions are not trained on."""
    return {int(label) for label in record.labels[~record.crowd]}


def class_image_fractions(classes_per_image: Sequence[set[int]], num_classes: int) -> list[float]:
    """``f(c)`` for labels ``1..num_classes`` (list position ``c - 1``): the fraction of images containing ``c``."""
    if not classes_per_image:
        raise ValueError("repeat factors need at least one training image")
    counts = [0] * num_classes
    for labels in classes_per_image:
        for label in labels:
            counts[label - 1] += 1
    return [count / len(classes_per_image) for count in counts]


def class_repeat_factor(fraction: float, threshold: float) -> float | None:
    """``r(c) = max(1, sqrt(T / f(c)))``; None for a class no image contains (``f(c) == 0``)."""
    if fraction <= 0.0:
        return None
    return max(1.0, math.sqrt(threshold / fraction))


def image_repeat_factors(classes_per_image: Sequence[set[int]], class_factors: Sequence[float | None]) -> list[float]:
    """Each image's factor: the largest of its classes' factors, 1 for an image without objects."""
    return [max((class_factors[label - 1] or 1.0 for label in labels), default=1.0) for labels in classes_per_image]


@dataclass(frozen=True)
class RepeatFactors:
    """The factors of one run's training images and the per-class statistics behind them."""

    threshold: float
    class_names: tuple[str, ...]
    class_fractions: tuple[float, ...]
    class_factors: tuple[float | None, ...]
    image_factors: tuple[float, ...]

    @classmethod
    def of_records(cls, records: Sequence[ImageRecord], class_names: Sequence[str],
                   threshold: float) -> "RepeatFactors":
        """The factors of ``records`` (the training part, in dataset order) under threshold ``threshold``."""
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"--repeat-factor-threshold must be in (0, 1], got {threshold}")
        classes_per_image = [image_classes(record) for record in records]
        fractions = class_image_fractions(classes_per_image, len(class_names))
        factors = [class_repeat_factor(fraction, threshold) for fraction in fractions]
        return cls(threshold, tuple(class_names), tuple(fractions), tuple(factors),
                   tuple(image_repeat_factors(classes_per_image, factors)))

    @property
    def expected_images(self) -> float:
        """The mean length of an epoch list, in images (each repeat counted)."""
        return math.fsum(self.image_factors)

    def message(self) -> str:
        """The start-of-training log line: each class's factor (most repeated first) and the epoch size."""
        order = sorted(range(len(self.class_names)), key=lambda c: (-(self.class_factors[c] or 0.0), c))
        parts = [f"{self.class_names[c]} absent" if self.class_factors[c] is None else
                 f"{self.class_names[c]} {self.class_factors[c]:.2f}x ({100 * self.class_fractions[c]:.1f}% of images)"
                 for c in order]
        return (f"repeat factors (T={self.threshold:g}): {', '.join(parts)}; epoch ~{self.expected_images:.0f} "
                f"images instead of {len(self.image_factors)}")

    def to_json(self) -> dict[str, Any]:
        """The summary recorded in ``config.json`` (``resolved.repeat_factors``)."""
        return {"threshold": self.threshold,
                "classes": {name: {"image_fraction": fraction, "repeat_factor": factor}
                            for name, fraction, factor in zip(self.class_names, self.class_fractions,
                                                              self.class_factors)},
                "train_images": len(self.image_factors),
                "repeated_images": sum(factor > 1.0 for factor in self.image_factors),
                "max_image_factor": max(self.image_factors),
                "expected_images_per_epoch": self.expected_images}


def run_repeat_factors(threshold: float | None, records: Sequence[ImageRecord],
                       class_names: Sequence[str]) -> RepeatFactors | None:
    """The factors of a run's training images (None when ``--repeat-factor-threshold`` is off),
    with the start-of-training log line (:meth:`RepeatFactors.message`)."""
    if threshold is None:
        return None
    factors = RepeatFactors.of_records(records, class_names, threshold)
    logger.info("%s", factors.message())
    return factors
