"""The pretraining DataLoader: sharded, resumable, persistent prefetching workers, repeats flattened into the batch."""
from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import UserError
from .dataset import VideoClipDataset
from .sampler import ResumableDistributedSampler

#: Per-clip entries (num_sample rows per sample) are concatenated; per-sample entries are stacked.
_PER_CLIP_KEYS = ("frames", "label", "frame_indices", "crop_box", "flipped")
_PER_SAMPLE_KEYS = ("index", "source_index", "skipped")


class DataLoaderWorkerError(UserError, RuntimeError):
    """A DataLoader worker died (a decoder crash, the out-of-memory killer, a full /dev/shm): no file to name, so the
    message says where to look."""


def _guarded(batches: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the DataLoader's batches; turn its worker-death RuntimeError into a DataLoaderWorkerError.

    The data set's own errors (UnreadableVideosError, naming the files) already arrive as project errors.
    """
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as error:
            if isinstance(error, UserError) or "DataLoader worker (pid" not in str(error):
                raise
            raise DataLoaderWorkerError(
                f"{error}: a worker process died while decoding (a decoder crash on a corrupt video, memory, or "
                "/dev/shm too small for data.num_workers x data.prefetch_batches batches); python -m "
                "trackmae_stream.data.check LIST finds unreadable videos, data.num_workers=0 shows a crash in the "
                "main process") from None
        yield batch


def collate_clips(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch data set samples, flattening the repeats: frames (B * num_sample, T, H, W, 3), label (B * num_sample,),
    frame_indices (B * num_sample, T), crop_box (B * num_sample, 4), flipped (B * num_sample,); index and
    source_index (B,), skipped (B, max_retries)."""
    batch = {key: torch.cat([s[key] for s in samples]) for key in _PER_CLIP_KEYS}
    batch.update({key: torch.stack([s[key] for s in samples]) for key in _PER_SAMPLE_KEYS})
    # Extra per-sample fields (tracker.placement=store): tensors every sample carries are stacked, other values
    # listed; a tensor only some samples carry (the frames of store misses) is stacked over those, with their rows
    # in `<key>_rows`.
    extra = {key for s in samples for key in s} - set(_PER_CLIP_KEYS) - set(_PER_SAMPLE_KEYS)
    for key in sorted(extra):
        rows = [i for i, s in enumerate(samples) if key in s]
        values = [samples[i][key] for i in rows]
        if len(rows) < len(samples):
            batch[f"{key}_rows"] = torch.tensor(rows, dtype=torch.int64)
            if values:
                batch[key] = torch.stack(values)
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


class _EpochKeys(Sampler[tuple[int, int]]):
    """Yields (epoch, index) so that persistent workers, which hold copies of the data set, see the epoch."""

    def __init__(self, sampler: ResumableDistributedSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def _init_worker(_: int) -> None:
    # Workers run in parallel already: one torch thread each avoids oversubscribing the cores. (Not
    # cv2.setNumThreads: in a forked child whose parent had used OpenCV's thread pool it deadlocks.)
    torch.set_num_threads(1)
    # A stop request is the trainer's to handle (finish the step, checkpoint): torchrun and Ctrl-C signal the whole
    # process group, and a worker that died of it would fail the step the trainer is finishing. Workers end when the
    # trainer closes the loader, or with it (the DataLoader's parent watchdog).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


@dataclass
class PretrainLoader:
    """Iterate it for one epoch of batches. Call `set_epoch(epoch)` before each epoch; to resume mid-epoch, call
    `resume(epoch, batch_index)` instead: the iteration then yields exactly the remaining batches an uninterrupted
    run would have seen."""

    loader: DataLoader
    sampler: ResumableDistributedSampler
    dataset: VideoClipDataset
    batch_size: int

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def resume(self, epoch: int, batch_index: int) -> None:
        """Continue `epoch` at its batch `batch_index` (the number of batches already consumed in that epoch)."""
        self.set_epoch(epoch)
        self.sampler.set_start(batch_index, self.batch_size)

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a full epoch on this rank (the epoch's length before any resume offset)."""
        return self.sampler.batches_per_epoch(self.batch_size, self.loader.drop_last)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # iter() now, not inside the generator: persistent workers start prefetching the epoch at this call
        return _guarded(iter(self.loader))

    def close(self) -> None:
        """Stop the persistent workers now (otherwise they stop whenever the garbage collector finds the loader,
        and a worker forked later may hold their pipes, which costs DataLoader's 5 s join timeout per worker)."""
        iterator = getattr(self.loader, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.loader._iterator = None

    def __enter__(self) -> PretrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.loader)


def build_pretrain_loader(dataset: VideoClipDataset, *, batch_size: int, num_workers: int, rank: int = 0,
                          world_size: int = 1, seed: int = 0, pin_memory: bool = False, shuffle: bool = True,
                          drop_last: bool = True, prefetch_factor: int = 4,
                          multiprocessing_context: str | None = None) -> PretrainLoader:
    """A DataLoader over this rank's shard of `dataset` (batch_size samples per rank, each num_sample clips).

    Workers are persistent and prefetch `prefetch_factor` batches each; every augmentation draw is keyed by
    (seed of the data set, epoch, index), so batches do not depend on num_workers. `drop_last` applies both to the
    sharding (equal shares per rank) and to the last incomplete batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sampler = ResumableDistributedSampler(len(dataset), rank=rank, world_size=world_size, seed=seed,
                                          shuffle=shuffle, drop_last=drop_last)
    workers = {}
    if num_workers > 0:
        workers = dict(persistent_workers=True, prefetch_factor=prefetch_factor, worker_init_fn=_init_worker,
                       multiprocessing_context=multiprocessing_context)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=_EpochKeys(sampler), num_workers=num_workers,
                        collate_fn=collate_clips, pin_memory=pin_memory, drop_last=drop_last, **workers)
    return PretrainLoader(loader=loader, sampler=sampler, dataset=dataset, batch_size=batch_size)
