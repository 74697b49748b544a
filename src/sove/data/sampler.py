"""A resumable, rank-sharded epoch sampler: the data order is a pure function of (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from sove.seeding import generator


class ResumableSampler(Sampler[int]):
    """Shuffled indices of one epoch, sharded over ranks, able to start mid-epoch.

    The permutation of epoch ``e`` is ``randperm(n)`` from the ``data_order`` stream of the seed at
    key ``e`` (:mod:`sove.seeding`; no global RNG is consumed), so a resumed run sees exactly the
    indices the uninterrupted run would have seen. The permutation is truncated to a
    multiple of ``R * batch_size`` (the last, incomplete global batch is dropped, as with
    ``drop_last=True``). Global batch ``k`` is ``perm[k*R*B : (k+1)*R*B]`` and rank ``r`` takes its
    ``r``-th contiguous block of ``B``, so gathering the ranks' batches in rank order gives exactly
    the batch a single process with batch ``R*B`` would see (identical feature-set contents).

    Why ours and not torchdata's ``StatefulDataLoader``: it would still need this sampler (rank blocks,
    per-epoch seeds) and only replace the resume position, two integers in the checkpoint, with a state
    that differs per rank (a rank-0 checkpoint cannot hold it) and that it restores by replaying the
    sampler (0.5 s against 0.04 s at batch 19000 of an ImageNet epoch; both resume exactly with workers).

    Args:
        num_samples: dataset size n.
        batch_size: per-rank batch size (used to drop the incomplete last global batch and to
            convert a resume position given in batches).
        num_replicas: world size R.
        rank: this rank r.
        seed: the run's seed.
        shuffle: False keeps dataset order (evaluation, debugging).
    """

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True) -> None:
        if num_samples < batch_size * num_replicas:
            raise ValueError(f"{num_samples} samples are fewer than one global batch ({batch_size} x {num_replicas})")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_replicas, self.rank, self.seed, self.shuffle = num_replicas, rank, seed, shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Full per-rank batches in one epoch."""
        return self.num_samples // (self.batch_size * self.num_replicas)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and the first batch to yield (``start_batch`` > 0 resumes mid-epoch).

        Deliberately not named ``set_epoch``: Lightning Fabric calls ``set_epoch(n)`` with its own count
        of ``iter()`` calls, which would undo a mid-epoch resume.
        """
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """All indices this rank sees in ``epoch``, in order (int64, shape (batches_per_epoch * batch_size,))."""
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=generator(self.seed, "data_order", epoch))
        else:
            order = torch.arange(self.num_samples)
        b, world = self.batch_size, self.num_replicas
        used = order[: self.batches_per_epoch * b * world].view(self.batches_per_epoch, world, b)
        return used[:, self.rank].reshape(-1)

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)[self.start_batch * self.batch_size :]
        return iter(indices.tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class EpochKeys(Sampler[tuple[int, int]]):
    """``(epoch, index)`` keys of a :class:`ResumableSampler`'s current epoch and position.

    Datasets seed a sample's augmentation by its epoch; passing the epoch with the index keeps
    that right in persistent DataLoader workers, which hold their own copy of the dataset and
    never see a ``set_epoch`` call made in the main process.
    """

    def __init__(self, sampler: ResumableSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
