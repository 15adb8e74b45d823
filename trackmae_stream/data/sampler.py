"""Per-rank sharding with an order that depends only on (seed, epoch), and mid-epoch resume."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def count_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches of `batch_size` that `num_samples` samples make: the full ones, plus a partial last one unless
    drop_last."""
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)


class ResumableDistributedSampler(Sampler[int]):
    """DistributedSampler semantics (rank r takes positions r, r + world_size, ... of one epoch permutation) plus
    `set_start`, which makes the next iteration begin at a given batch of the rank's share.

    drop_last=True trims the permutation to a multiple of world_size; False pads it by repeating its head, so every
    rank gets ceil(num_samples / world_size) indices. The permutation is torch.randperm under a generator seeded with
    seed + epoch: the same on every rank, in every process, after every restart.
    """

    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if drop_last and num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot give each of {world_size} ranks one with drop_last")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0
        if drop_last:
            self.samples_per_rank = num_samples // world_size
        else:
            self.samples_per_rank = math.ceil(num_samples / world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation and start from its beginning."""
        self.epoch = epoch
        self.start = 0

    def set_start(self, batch_index: int, batch_size: int) -> None:
        """Begin the current epoch at batch `batch_index` (0-based) of `batch_size` samples per rank."""
        start = batch_index * batch_size
        if batch_index < 0 or batch_size < 1 or start > self.samples_per_rank:
            raise ValueError(f"cannot start at batch {batch_index} of size {batch_size}: this rank has "
                             f"{self.samples_per_rank} samples per epoch")
        self.start = start

    def batches_per_epoch(self, batch_size: int, drop_last: bool) -> int:
        """Batches of `batch_size` in a full epoch of this rank (ignoring `start`); `drop_last` is the batching's."""
        return count_batches(self.samples_per_rank, batch_size, drop_last)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's full share of `epoch`, ignoring `start`."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.samples_per_rank * self.world_size
        if total > len(order):  # pad (drop_last=False) by repeating the head, as DistributedSampler does
            order += (order * math.ceil(total / len(order)))[: total - len(order)]
        return order[:total][self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.start:])

    def __len__(self) -> int:
        return self.samples_per_rank - self.start
