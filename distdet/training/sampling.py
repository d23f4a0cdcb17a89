"""Which images each process trains on, in which order, and how to continue mid-epoch.

Every epoch's batches come from four pure steps, so that what any layout trained is a function
of numbers saved in a checkpoint:

1. **epoch list** (:func:`epoch_order`): every dataset index once, shuffled with ``seed + epoch``
   (the permutation ``DistributedSampler`` draws). With repeat factors
   (:func:`repeated_epoch_order`) an image appears once per repeat instead; this step is the
   only one that changes.
2. **already trained** (:func:`trained_samples`): the samples the first ``steps`` optimizer steps
   of a :class:`BatchLayout` took from a list, on all ranks together.
3. **remaining** (:func:`remaining_samples`): the list with those removed, as a multiset, in the
   list's order; repeated for each stretch of the epoch trained with another layout.
4. **shards** (:func:`shard`, :func:`rank_batches`): the list split over the processes as
   ``DistributedSampler(drop_last=False)`` does (padded by repeating its first entries so every
   rank gets the same count), then cut into batches, optionally grouped by aspect ratio, with
   ranks that have fewer batches repeating their first ones.

An entry of an epoch list is a **sample key**: ``repeat * dataset_size + index``
(:func:`sample_key`), so a list without repeats is the plain permutation of the indices, and
each repeat of an image is a distinct entry that steps 2-4 count as a multiset without knowing
about repeats.

Padding is the only way a sample is trained twice in an epoch: at most ``world_size - 1``
repeated samples per stretch from step 4's even split, plus the repeated batches of aspect-ratio
grouping. A padded repeat that was trained counts as the sample's one time, so the sample is
not trained again after a resume; samples are never skipped.

The DataLoader built on :class:`EpochBatchSampler` must NOT also go through
``accelerator.prepare``, which would shard the already-sharded indices a second time.
:class:`SeededSampleDataset` seeds the random number generators from ``(seed, epoch, index,
repeat)`` before loading each sample, so augmentation does not depend on which rank or worker
process loads it, or on whether or how the epoch was resumed, and each repeat of an image is
augmented differently.
"""
from __future__ import annotations

import bisect
import contextlib
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def aspect_ratio_groups(aspect_ratios: Sequence[float], group_factor: int) -> list[int]:
    """Group id of each width/height ratio: ``2 * group_factor + 1`` log-spaced bin edges in [1/2, 2]."""
    if group_factor < 0:
        raise ValueError(f"group_factor must be >= 0, got {group_factor}")
    edges = [2.0 ** x for x in np.linspace(-1.0, 1.0, 2 * group_factor + 1)] if group_factor > 0 else [1.0]
    return [bisect.bisect_right(edges, float(ratio)) for ratio in aspect_ratios]


@dataclass(frozen=True)
class BatchLayout:
    """How a list of samples is cut into optimizer steps: processes, batch size, accumulation.

    ``group_ids`` (one per dataset index) batches images of one aspect-ratio group together.
    """

    world_size: int
    batch_size: int
    grad_accum_steps: int = 1
    group_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("world_size", "batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainedStretch:
    """The first ``steps`` optimizer steps over an epoch's remaining list, taken with ``layout``."""

    layout: BatchLayout
    steps: int


def epoch_order(dataset_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The epoch list: ``range(dataset_size)`` shuffled with ``seed + epoch`` (``DistributedSampler``'s draw)."""
    if not shuffle:
        return list(range(dataset_size))
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(dataset_size, generator=generator).tolist()


def sample_key(index: int, repeat: int, dataset_size: int) -> int:
    """The epoch-list entry of repeat ``repeat`` (0-based) of dataset index ``index``."""
    return repeat * dataset_size + index


def key_parts(key: int, dataset_size: int) -> tuple[int, int]:
    """``(index, repeat)`` of an epoch-list entry (the inverse of :func:`sample_key`)."""
    repeat, index = divmod(key, dataset_size)
    return index, repeat


def repeat_counts(factors: Sequence[float], seed: int, epoch: int) -> list[int]:
    """How often each image is in epoch ``epoch``'s list: its factor, rounded stochastically.

    Image ``i`` gets ``floor(r_i)`` repeats plus one more with probability ``r_i - floor(r_i)``
    (one uniform draw per image from a generator seeded with ``(seed, epoch)``), so its mean
    count over epochs is ``r_i`` and every rank draws the same counts.
    """
    draws = np.random.default_rng(np.random.SeedSequence([seed, epoch])).random(len(factors))
    return [math.floor(factor) + int(draw < factor - math.floor(factor)) for factor, draw in zip(factors, draws)]


def repeated_epoch_order(factors: Sequence[float], seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The epoch list with repeat factors: one :func:`sample_key` per repeat of each image
    (:func:`repeat_counts`), shuffled with ``seed + epoch`` as :func:`epoch_order` shuffles.

    With every count 1 it is exactly :func:`epoch_order`'s list.
    """
    size = len(factors)
    keys = [sample_key(index, repeat, size)
            for index, count in enumerate(repeat_counts(factors, seed, epoch)) for repeat in range(count)]
    return [keys[position] for position in epoch_order(len(keys), seed, epoch, shuffle)]


def shard(order: Sequence[int], num_replicas: int, rank: int) -> list[int]:
    """Rank ``rank``'s share of ``order``, exactly as ``DistributedSampler(drop_last=False)`` cuts it.

    The list is padded to a multiple of ``num_replicas`` by repeating its first entries (cyclically
    when it is shorter than the padding), then rank ``r`` takes entries ``r, r + num_replicas, ...``.
    An empty list gives every rank an empty share.
    """
    if not order:
        return []
    missing = math.ceil(len(order) / num_replicas) * num_replicas - len(order)
    padded = list(order) + (list(order) * math.ceil(missing / len(order)))[:missing]
    return padded[rank::num_replicas]


def batches_of(indices: Sequence[int], batch_size: int, group_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Consecutive batches; with ``group_ids``, full batches of one group first, then the leftovers in order.

    ``indices`` are sample keys; ``group_ids`` has one entry per dataset index (a repeat of an
    image is in the image's group).
    """
    if group_ids is None:
        return [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    buffers: dict[int, list[int]] = {}  # group id -> positions in ``indices``
    batches: list[list[int]] = []
    for position, key in enumerate(indices):
        buffer = buffers.setdefault(group_ids[key % len(group_ids)], [])
        buffer.append(position)
        if len(buffer) == batch_size:
            batches.append([indices[p] for p in buffer])
            buffer.clear()
    leftovers = [indices[p] for p in sorted(p for buffer in buffers.values() for p in buffer)]
    batches.extend(leftovers[i:i + batch_size] for i in range(0, len(leftovers), batch_size))
    return batches


def rank_batches(order: Sequence[int], layout: BatchLayout, rank: int) -> list[list[int]]:
    """Rank ``rank``'s batches over ``order``; with grouping, padded to the most any rank has."""
    own = batches_of(shard(order, layout.world_size, rank), layout.batch_size, layout.group_ids)
    if layout.group_ids is not None and own:
        most = max(len(batches_of(shard(order, layout.world_size, r), layout.batch_size, layout.group_ids))
                   for r in range(layout.world_size))
        own = own + [own[i % len(own)] for i in range(most - len(own))]
    return own


def trained_samples(order: Sequence[int], layout: BatchLayout, steps: int) -> list[int]:
    """The samples (with padding repeats) all ranks trained in the first ``steps`` optimizer steps over ``order``."""
    first_batches = steps * layout.grad_accum_steps
    return [index for rank in range(layout.world_size)
            for batch in rank_batches(order, layout, rank)[:first_batches] for index in batch]


def remaining_samples(order: Sequence[int], trained: Sequence[int]) -> list[int]:
    """``order`` without ``trained``, as multisets, keeping the order; extra (padding) repeats are ignored."""
    left = Counter(trained)
    remaining = []
    for index in order:
        if left[index] > 0:
            left[index] -= 1
        else:
            remaining.append(index)
    return remaining


def remaining_after(order: Sequence[int], stretches: Sequence[TrainedStretch]) -> list[int]:
    """What is left of an epoch list after each stretch, in turn, trained on what the previous ones left."""
    remaining = list(order)
    for stretch in stretches:
        remaining = remaining_samples(remaining, trained_samples(remaining, stretch.layout, stretch.steps))
    return remaining


def steps_per_epoch(dataset_size: int, layout: BatchLayout, seed: int, epoch: int = 0) -> int:
    """Optimizer steps in a whole epoch with ``layout`` (grouping can make it vary a little by epoch)."""
    return math.ceil(len(rank_batches(epoch_order(dataset_size, seed, epoch), layout, 0)) / layout.grad_accum_steps)


class EpochBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """One rank's batches of ``(epoch, dataset index, repeat)`` keys for the current epoch.

    ``repeat_factors`` (one per dataset index, each >= 1; see
    :mod:`distdet.training.repeat_factors`) expands every epoch's list by
    :func:`repeated_epoch_order`; without them each image is in every epoch once (repeat 0).

    Call :meth:`set_epoch` before each epoch and :meth:`set_start` to skip the batches a resumed
    run already trained on with this layout. :meth:`set_trained` tells it that an earlier part of
    one epoch was trained with other layouts (a resume on another number of processes, batch size
    or accumulation): that epoch then shards only what those stretches left. Every rank gets the
    same number of batches, so no rank waits for the others.
    """

    def __init__(self, dataset_size: int, batch_size: int, num_replicas: int, rank: int, seed: int,
                 shuffle: bool = True, group_ids: Sequence[int] | None = None,
                 repeat_factors: Sequence[float] | None = None) -> None:
        if group_ids is not None and len(group_ids) != dataset_size:
            raise ValueError(f"{len(group_ids)} group ids for {dataset_size} samples")
        if repeat_factors is not None and len(repeat_factors) != dataset_size:
            raise ValueError(f"{len(repeat_factors)} repeat factors for {dataset_size} samples")
        if repeat_factors is not None and not all(1.0 <= factor < math.inf for factor in repeat_factors):
            raise ValueError("repeat factors must be finite and at least 1")
        if dataset_size < num_replicas:
            raise ValueError(f"{dataset_size} training images cannot be shared among {num_replicas} processes")
        # how batches are cut; accumulation does not change them (it only groups them into steps)
        groups = tuple(group_ids) if group_ids is not None else None
        self.layout = BatchLayout(num_replicas, batch_size, group_ids=groups)
        self.dataset_size = dataset_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.repeat_factors = tuple(repeat_factors) if repeat_factors is not None else None
        self.epoch = 0
        self.start = 0
        self._trained: tuple[int, int, list[TrainedStretch]] | None = None  # (epoch, seed of its list, stretches)
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start_batch: int) -> None:
        """Skip the first ``start_batch`` batches of the current epoch (for a resumed run)."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.start = start_batch

    def set_trained(self, epoch: int, list_seed: int, stretches: Sequence[TrainedStretch]) -> None:
        """Epoch ``epoch`` (whose list was shuffled with ``list_seed``) already went through ``stretches``."""
        self._trained = (epoch, list_seed, list(stretches))
        self._cache = None

    def epoch_list(self) -> list[int]:
        """What the current epoch still has to train, before sharding (all of it unless :meth:`set_trained`)."""
        trained = self._trained if self._trained is not None and self._trained[0] == self.epoch else None
        full = self.full_epoch_list(self.epoch, trained[1] if trained else self.seed)
        return remaining_after(full, trained[2]) if trained else full

    def full_epoch_list(self, epoch: int, list_seed: int) -> list[int]:
        """Step 1: epoch ``epoch``'s whole list of sample keys, shuffled with ``list_seed``."""
        if self.repeat_factors is None:
            return epoch_order(self.dataset_size, list_seed, epoch, self.shuffle)
        return repeated_epoch_order(self.repeat_factors, list_seed, epoch, self.shuffle)

    def epoch_steps(self, epochs: int, grad_accum_steps: int) -> tuple[int, ...]:
        """Optimizer steps of each whole epoch ``0 .. epochs - 1`` of a fresh run with this layout
        (with repeat factors, epoch lists differ in length)."""
        return tuple(math.ceil(len(rank_batches(self.full_epoch_list(epoch, self.seed), self.layout, self.rank))
                               / grad_accum_steps) for epoch in range(epochs))

    def epoch_batches(self) -> list[list[int]]:
        """All of this rank's batches for the current epoch (ignoring the start offset)."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, rank_batches(self.epoch_list(), self.layout, self.rank))
        return self._cache[1]

    def __len__(self) -> int:
        """Batches left in the current epoch after the start offset."""
        return max(0, len(self.epoch_batches()) - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for batch in self.epoch_batches()[self.start:]:
            yield [(self.epoch, *key_parts(key, self.dataset_size)) for key in batch]


def sample_seed(seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """A 32-bit seed that depends only on (seed, epoch, index, repeat).

    Repeat 0 keeps the seed of ``(seed, epoch, index)`` alone, so runs without repeat factors
    augment exactly as before repeats existed.
    """
    entropy = [seed, epoch, index] + ([repeat] if repeat else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch (CPU), numpy and ``random`` for the block; restore their states afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededSampleDataset(Dataset):
    """Wraps a dataset so that item ``(epoch, index, repeat)`` (or ``(epoch, index)``: repeat 0)
    is loaded under RNGs seeded from all three.

    A detection item ``(image, target)`` comes back with ``target["repeat"]`` (int64 scalar)
    added, so the trainer's sample record (``--debug-record-samples``) can tell repeats apart;
    the detector ignores the extra key.
    """

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int] | tuple[int, int, int]):
        epoch, index, repeat = key if len(key) == 3 else (*key, 0)
        with seeded_rngs(sample_seed(self.seed, epoch, index, repeat)):
            item = self.base[index]
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict):
            return item[0], {**item[1], "repeat": torch.tensor(repeat, dtype=torch.int64)}
        return item
