"""Binds the data package to a run: which list (the embedded synthetic set or a VideoMAE list), which loader (CPU
workers or DALI), and the skipped-video accounting the trainer logs and bounds."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import TrainConfig, needs_tracks
from .data import (
    SkipCounter,
    VideoClipDataset,
    VideoRecord,
    build_pretrain_loader,
    ensure_synthetic_dataset,
    read_video_list,
)
from .distributed import DistInfo, barrier

log = logging.getLogger(__name__)


class SkipReport:
    """This rank's `SkipCounter`, plus the videos a DALI probe dropped before training (the probe sees the whole list,
    so those count once). At log intervals the ranks' counters are merged, so that every rank logs the same unique
    count and takes the same decision against `data.max_skip_fraction`."""

    def __init__(self, records: list, counter: SkipCounter, dropped_before_training: int):
        self.records = records
        self.counter = counter
        self.dropped = dropped_before_training

    def update(self, skipped: Tensor | None, source_index: Tensor | None) -> None:
        if skipped is not None:  # host tensors from the loader: no device sync
            self.counter.update(skipped, source_index)

    def reduce(self, dist: DistInfo) -> SkipCounter:
        """All ranks' reports in one counter (unique videos: a substitute drawn on two ranks can fail on both)."""
        if dist.world_size == 1:
            return self.counter
        states = [None] * dist.world_size
        torch.distributed.all_gather_object(states, self.counter.state_dict(), group=dist.group)
        merged = SkipCounter(self.records, max_skip_fraction=self.counter.max_skip_fraction)
        merged.load_state_dict({"failed": sorted(set().union(*(s["failed"] for s in states))),
                                "used": sorted(set().union(*(s["used"] for s in states))),
                                "events": sum(s["events"] for s in states)})
        return merged

    def state_dict(self) -> dict:
        return self.counter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.counter.load_state_dict(state)


@dataclass
class DataSetup:
    loader: Any  # PretrainLoader or DaliClipLoader: iterate one epoch; resume(epoch, batch) positions it
    skips: SkipReport
    description: str
    num_videos: int

    @property
    def batches_per_epoch(self) -> int:
        return self.loader.batches_per_epoch

    def set_position(self, epoch: int, batch_in_epoch: int) -> None:
        self.loader.resume(epoch, batch_in_epoch)

    def close(self) -> None:
        close = getattr(self.loader, "close", None)
        if close is not None:  # stop worker processes now rather than at garbage collection
            close()


def video_records(cfg: TrainConfig) -> tuple[list[VideoRecord], Path, str]:
    """The run's videos (the synthetic set, generated on first use, or the list), the list file and a description.
    A malformed list line fails here, naming file and line."""
    d = cfg.data
    if d.source == "synthetic":
        root = Path(d.synthetic_dir).expanduser() if d.synthetic_dir else None
        synthetic = ensure_synthetic_dataset(root, num_videos=d.synthetic_videos, size=d.synthetic_size,
                                             num_frames=d.synthetic_frames, task=d.synthetic_task)
        list_file, list_root = synthetic.list_file, synthetic.root
        description = f"synthetic set {synthetic.root} ({len(synthetic.class_names)} motion classes)"
    else:
        list_file, list_root = Path(d.list_file).expanduser(), (Path(d.root).expanduser() if d.root else None)
        description = f"list {list_file}"
    return read_video_list(list_file, list_root), list_file, description


def build_data(cfg: TrainConfig, dist: DistInfo, device: torch.device,
               shard: tuple[int, int] | None = None) -> DataSetup:
    """The loader of one rank's share of the videos: `shard` = (rank, ranks) when it is not this process's own
    (tracker.placement=ranks: a tracking rank loads for the training ranks it serves); `dist` orders the DALI
    probe among the processes that build loaders."""
    d = cfg.data
    shard_rank, num_shards = shard if shard is not None else (dist.rank, dist.world_size)
    records, list_file, description = video_records(cfg)
    dropped = 0
    if d.loader == "dali":
        from .data import default_cache_dir
        from .data.dali import build_dali_loader

        list_key = hashlib.sha1(str(Path(list_file).resolve()).encode()).hexdigest()
        probe_cache = (Path(d.probe_cache).expanduser() if d.probe_cache
                       else default_cache_dir() / "dali-probe" / f"{list_key}.json")

        def build():
            return build_dali_loader(records, batch_size=cfg.batch_size, num_frames=d.num_frames,
                                     sampling_rate=d.sampling_rate, input_size=d.input_size, scales=d.scales,
                                     flip=d.flip, num_sample=d.num_sample, seed=cfg.seed, shard_id=shard_rank,
                                     num_shards=num_shards, device="gpu" if device.type == "cuda" else "cpu",
                                     device_id=device.index if device.type == "cuda" else None,
                                     num_threads=max(2, d.num_workers), prefetch=d.prefetch_batches,
                                     probe_cache=probe_cache, max_skip_fraction=d.max_skip_fraction)

        # Rank 0 probes the list and writes the cache; the others then read it (on a shared file system) instead of
        # demuxing every video again, and so agree on which videos are usable.
        loader = build() if dist.is_main else None
        barrier(dist)
        if not dist.is_main:
            loader = build()
        dropped = loader.num_dropped
        log.info(loader.dropped_summary())
        description += ", DALI " + ("GPU" if device.type == "cuda" else "CPU") + " decoding"
    else:
        track_windows = None
        if cfg.tracker.placement == "store" and needs_tracks(cfg):
            from .tracks.source import TrackWindows, open_store

            track_windows = TrackWindows(cfg, open_store(cfg, readonly=True))
        dataset = VideoClipDataset(records, num_frames=d.num_frames, sampling_rate=d.sampling_rate,
                                   input_size=d.input_size, scales=d.scales, flip=d.flip, num_sample=d.num_sample,
                                   decoder=d.decoder, seed=cfg.seed, track_windows=track_windows)
        loader = build_pretrain_loader(dataset, batch_size=cfg.batch_size, num_workers=d.num_workers,
                                       rank=shard_rank, world_size=num_shards, seed=cfg.seed,
                                       pin_memory=device.type == "cuda", prefetch_factor=d.prefetch_batches)
        description += f", {d.decoder} decoding in {d.num_workers} workers"
    if loader.batches_per_epoch < 1:
        raise ValueError(f"{list_file}: {len(records)} videos give no full batch of batch_size={cfg.batch_size} per "
                         f"rank on {num_shards} rank(s); lower batch_size or add videos")
    counter = SkipCounter(records, max_skip_fraction=d.max_skip_fraction, world_size=num_shards)
    return DataSetup(loader=loader, skips=SkipReport(records, counter, dropped), description=description,
                     num_videos=len(records))
