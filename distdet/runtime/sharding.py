"""Which inputs each process handles: whole batches, dealt out in turn.

The inputs are cut into consecutive batches of ``batch_size`` in input order, and rank ``r``
of ``N`` takes batches ``r, r + N, ...``. Every input thus sits in the same batch, with the
same neighbours, whatever the number of processes. That matters because torchvision's
detectors pad the images of a batch to a common size and the padding changes the features
near the borders: per-image sharding would make predictions depend on the process count.
"""
from __future__ import annotations


def shard_batches(num_items: int, batch_size: int, num_processes: int, process_index: int, *,
                  pad: bool = True) -> list[list[int]]:
    """The batches (lists of input indices) that process ``process_index`` of ``num_processes`` handles.

    With ``pad`` (the default, what the evaluator uses) every rank gets the same number of
    batches: batches from the start are repeated to fill the last round
    (``torch.utils.data.DistributedSampler``'s rule without shuffling) and the caller drops the
    repeated results by index. With ``pad=False`` (batch prediction, which renders and prints
    each image once) every batch is handled exactly once and the last ranks may have one fewer.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
    batches = [list(range(s, min(s + batch_size, num_items))) for s in range(0, num_items, batch_size)]
    if pad and batches:
        rounds = -(-len(batches) // num_processes)
        missing = rounds * num_processes - len(batches)
        batches += (batches * (missing // len(batches) + 1))[:missing]
    return batches[process_index::num_processes]
