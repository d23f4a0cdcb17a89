"""Which images each process trains on, in which order, and how to continue mid-epoch.

Sharding is :class:`torch.utils.data.DistributedSampler` with the Accelerator's process count
and index: each epoch it shuffles all indices with ``seed + epoch`` and gives every rank a
disjoint slice (padded by repeating a few indices so all ranks get the same count). The
DataLoader built on it must NOT also go through ``accelerator.prepare``, which would shard
the already-sharded indices a second time.

:class:`EpochBatchSampler` turns a rank's indices into batches (optionally grouped by aspect
ratio) and yields ``(epoch, index)`` keys; the batch list is a pure function of
``(seed, epoch, rank, world size)``, so resuming after ``k`` batches just starts at batch ``k``
and the remaining order is identical. :class:`SeededSampleDataset` seeds the random number
generators from ``(seed, epoch, index)`` before loading each sample, so augmentation does not
depend on which worker process loads it, or on whether the epoch was resumed.
"""
from __future__ import annotations

import bisect
import contextlib
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


def aspect_ratio_groups(aspect_ratios: Sequence[float], group_factor: int) -> list[int]:
    """Group id of each width/height ratio: ``2 * group_factor + 1`` log-spaced bin edges in [1/2, 2]."""
    if group_factor < 0:
        raise ValueError(f"group_factor must be >= 0, got {group_factor}")
    edges = [2.0 ** x for x in np.linspace(-1.0, 1.0, 2 * group_factor + 1)] if group_factor > 0 else [1.0]
    return [bisect.bisect_right(edges, float(ratio)) for ratio in aspect_ratios]


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """One rank's batches of ``(epoch, dataset index)`` keys for the current epoch.

    Call :meth:`set_epoch` before each epoch (it also calls ``DistributedSampler.set_epoch``),
    and :meth:`set_start` to skip the batches a resumed run already trained on. With
    ``group_ids``, images of one aspect-ratio group are batched together; the leftovers of all
    groups form the last batches. Every rank then gets as many batches as the rank with the
    most (a rank with fewer repeats its first batches), so no rank waits for the others.
    """

    def __init__(self, dataset_size: int, batch_size: int, num_replicas: int, rank: int, seed: int,
                 shuffle: bool = True, group_ids: Sequence[int] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if group_ids is not None and len(group_ids) != dataset_size:
            raise ValueError(f"{len(group_ids)} group ids for {dataset_size} samples")
        if dataset_size < num_replicas:
            raise ValueError(f"{dataset_size} training images cannot be shared among {num_replicas} processes")
        indices = range(dataset_size)
        self.samplers = [
            DistributedSampler(indices, num_replicas=num_replicas, rank=r, shuffle=shuffle, seed=seed, drop_last=False)
            for r in range(num_replicas)
        ]
        self.batch_size = batch_size
        self.rank = rank
        self.group_ids = list(group_ids) if group_ids is not None else None
        self.epoch = 0
        self.start = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for sampler in self.samplers:
            sampler.set_epoch(epoch)

    def set_start(self, start_batch: int) -> None:
        """Skip the first ``start_batch`` batches of the current epoch (for a resumed run)."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.start = start_batch

    def rank_indices(self, rank: int) -> list[int]:
        return list(iter(self.samplers[rank]))

    def _batches_from(self, indices: list[int]) -> list[list[int]]:
        size = self.batch_size
        if self.group_ids is None:
            return [indices[i:i + size] for i in range(0, len(indices), size)]
        buffers: dict[int, list[int]] = {}  # group id -> positions in ``indices``
        batches: list[list[int]] = []
        for position, index in enumerate(indices):
            buffer = buffers.setdefault(self.group_ids[index], [])
            buffer.append(position)
            if len(buffer) == size:
                batches.append([indices[p] for p in buffer])
                buffer.clear()
        leftovers = [indices[p] for p in sorted(p for buffer in buffers.values() for p in buffer)]
        batches.extend(leftovers[i:i + size] for i in range(0, len(leftovers), size))
        return batches

    def epoch_batches(self) -> list[list[int]]:
        """All of this rank's batches for the current epoch (ignoring the start offset)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        own = self._batches_from(self.rank_indices(self.rank))
        if self.group_ids is not None:
            most = max(len(self._batches_from(self.rank_indices(r))) for r in range(len(self.samplers)))
            own = own + [own[i % len(own)] for i in range(most - len(own))]
        self._cache = (self.epoch, own)
        return own

    def __len__(self) -> int:
        """Batches left in the current epoch after the start offset."""
        return max(0, len(self.epoch_batches()) - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.epoch_batches()[self.start:]:
            yield [(self.epoch, index) for index in batch]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends only on (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


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
    """Wraps a dataset so that item ``(epoch, index)`` is loaded under RNGs seeded from both."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with seeded_rngs(sample_seed(self.seed, epoch, index)):
            return self.base[index]
