"""Fill the track store ahead of training: every (video, window) of a run's list, tracked once.

`torchrun --nproc_per_node=N -m trackmae_stream.tracks precompute [--config PRESET] [section.key=value ...]` takes
the same config as training (the list, the clip geometry, the tracker and the store settings). Rank r takes every
N-th (video, window); entries already in the store (under the same settings) are skipped, so a killed precompute
reruns from where it stopped without losing anything written (each put is atomic). Unreadable videos are counted
and reported, never fatal: training skips them too. Runs on any ranks, not only the training ones: this is how
tracking leaves the training machines entirely.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch

from ..config import TrainConfig
from ..data import open_video
from ..data_setup import video_records
from ..distributed import DistInfo, all_reduce_sum, barrier
from ..tracking import build_tracker
from .source import open_store, store_frames, track_store_frames
from .store import TrackEntry
from .windows import stored_frame_positions, window_frame_indices

log = logging.getLogger(__name__)


@dataclass
class PrecomputeSummary:
    entries: int  # (video, window) pairs of the list
    tracked: int  # tracked and written now (all ranks)
    present: int  # already in the store
    failed: int  # videos that could not be decoded
    failures: list[str] = field(default_factory=list)  # this rank's "path: reason"


def precompute(cfg: TrainConfig, dist: DistInfo, *, progress: bool = True) -> PrecomputeSummary:
    records, _, description = video_records(cfg)
    windows = cfg.tracker.windows_per_video
    work = [(i, w) for i in range(len(records)) for w in range(windows)][dist.rank::dist.world_size]
    store = open_store(cfg, readonly=False)
    tracker = build_tracker(cfg.tracker, dist.device)
    positions = stored_frame_positions(cfg.data.num_frames, cfg.model.tubelet_size)
    log.info("precompute: %s, %d videos x %d windows, %d on this rank, tracker %s, store %s", description,
             len(records), windows, len(work), tracker.name, store)
    bar = None
    if progress and dist.is_main:
        from tqdm import tqdm

        tqdm.monitor_interval = 0  # no monitor thread in a process that forks decoder workers (engine.py)
        bar = tqdm(total=len(work), desc="tracks", unit="window", file=sys.stderr, dynamic_ncols=True)
    tracked = present = 0
    failures: list[str] = []
    pending: list[tuple[str, int, list[int], torch.Tensor]] = []

    def flush() -> None:
        nonlocal tracked
        if not pending:
            return
        frames = torch.stack([p[3] for p in pending]).to(dist.device)
        tracks, vis = track_store_frames(tracker, frames, cfg.tracker.store_grid)
        tracks, vis = tracks.float().cpu().numpy(), vis.float().cpu().numpy()
        # one commit per batch (LMDB syncs every commit)
        store.put_many([(video, window, indices, TrackEntry(t, v))
                        for (video, window, indices, _), t, v in zip(pending, tracks, vis)])
        tracked += len(pending)
        pending.clear()

    try:
        for index, window in work:
            record = records[index]
            video = str(record.path)
            try:
                with open_video(record.path, cfg.data.decoder) as reader:
                    available = reader.num_frames
                    if available < cfg.data.num_frames:
                        raise ValueError(f"too short: {available} frames < num_frames {cfg.data.num_frames}")
                    indices = window_frame_indices(available, cfg.data.num_frames, cfg.data.sampling_rate, windows,
                                                   window)[positions].tolist()
                    if store.contains(video, window, indices):
                        present += 1
                    else:
                        frames = reader.read(indices)
                        pending.append((video, window, indices,
                                        torch.from_numpy(store_frames(frames, cfg.tracker.store_size))))
            except Exception as error:  # one bad video never stops the fill; it is reported
                failures.append(f"{video}: {type(error).__name__}: {error}")
                log.warning("precompute: skipping %s (%s)", video, error)
            if len(pending) >= cfg.batch_size:
                flush()
            if bar is not None:
                bar.update(1)
        flush()
    finally:
        if bar is not None:
            bar.close()
        store.close()
    totals = all_reduce_sum(torch.tensor([tracked, present, len(failures)], dtype=torch.float64,
                                         device=dist.device), dist).tolist()
    barrier(dist)
    return PrecomputeSummary(entries=len(records) * windows, tracked=int(totals[0]), present=int(totals[1]),
                             failed=int(totals[2]), failures=failures)


__all__ = ["precompute", "PrecomputeSummary"]
