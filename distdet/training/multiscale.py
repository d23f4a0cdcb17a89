"""The seeded per-batch size schedule of multi-scale training (``--min-size 384,448,512``).

Batch ``b`` of epoch ``e`` trains at ``sizes[i]``, ``i`` drawn from a generator seeded with
``(seed, e, b)`` and nothing else: every rank trains its batch ``b`` at the same size (no rank
waits for another's larger images), and a run resumed mid-epoch at batch ``b`` continues with
exactly the sizes the uninterrupted run used. torchvision's own draw (one per image, from
torch's global generator, see :mod:`distdet.modeling.multiscale`) gives neither: the global
stream on each rank also feeds the RPN and box samplers, so its position after a resume
depends on everything drawn before.

The trainer gives the model's :class:`~distdet.modeling.multiscale.BatchScaleTransform` a
:class:`BatchScales` (:func:`attach_batch_scales`) and tells it where each epoch starts
(:func:`start_scale_epoch`); the transform then asks it for one size per training forward.
A model with one size has no schedule and draws nothing.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from distdet.modeling.multiscale import BatchScaleTransform

#: mixed into the seed so the size stream is independent of the per-sample augmentation
#: seeds (``sampling.sample_seed``), which are drawn from (seed, epoch, index) alone
_SIZE_STREAM = 0x5CA1E


class BatchScales:
    """The short side of each training batch, a pure function of (seed, epoch, batch index)."""

    def __init__(self, sizes: Sequence[int], seed: int) -> None:
        self.sizes = tuple(int(size) for size in sizes)
        self.seed = seed
        self.epoch, self.next_batch = 0, 0

    def size_of(self, epoch: int, batch: int) -> int:
        """The short side of batch ``batch`` (0-based, in the epoch's batch order) of ``epoch``."""
        generator = np.random.default_rng([_SIZE_STREAM, self.seed, epoch, batch])
        return self.sizes[int(generator.integers(len(self.sizes)))]

    def start_epoch(self, epoch: int, first_batch: int) -> None:
        """The next size asked for is that of batch ``first_batch`` of ``epoch``."""
        self.epoch, self.next_batch = epoch, first_batch

    def __call__(self) -> int:
        """The size of the next batch; moves on by one batch."""
        size = self.size_of(self.epoch, self.next_batch)
        self.next_batch += 1
        return size


def attach_batch_scales(model: nn.Module, seed: int) -> BatchScales | None:
    """Give ``model``'s multi-scale transform the schedule for ``seed``; None for a one-size model."""
    transform = model.transform
    if not isinstance(transform, BatchScaleTransform):
        return None
    transform.size_source = BatchScales(transform.train_sizes, seed)
    return transform.size_source


def start_scale_epoch(model: nn.Module, epoch: int, first_batch: int) -> None:
    """Before training batches ``first_batch, ...`` of ``epoch`` (a no-op without a schedule)."""
    source = getattr(model.transform, "size_source", None)
    if isinstance(source, BatchScales):
        source.start_epoch(epoch, first_batch)
