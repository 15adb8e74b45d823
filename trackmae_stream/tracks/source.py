"""Where a batch's tracks come from when `tracker.placement=store`: K windows per video, stored tracks, remap.

Two halves, one per process:
- `TrackWindows` runs in the data set (a decoder worker): it draws the clip's window among the video's K windows
  (instead of a uniform start), looks the window up in the store (read-only), and hands the trainer either the stored
  tracks (a hit) or the window's stored frames, the whole decoded frames at the first frame of every tubelet resized
  to store_size x store_size (a miss).
- `StoreTrackSource` runs in the trainer on the preparation stream: it tracks the misses' frames on the store grid
  (the configured tracker; `tracker.store_grid`² points over the whole frame), writes them to the store, and remaps
  every clip's stored tracks to its own crop and flip (`remap.remap_to_clip`): what tracking the clip itself would
  return, interpolated from the denser stored grid. Targets, the binning statistic and masks follow as inline.

Stored coordinates are normalised to the whole frame (u = (x + 0.5) / W), so the tracking resolution (store_size)
and the decoded resolution never mix. A warm store runs no tracker at all; a cold one tracks each (video, window) once.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from ..config import TrainConfig, tracker_grid_size
from ..tracking import PointTracker, TrackerOutput, query_grid, resolve_tracker_backend
from .remap import remap_to_clip, store_query_points
from .store import TrackEntry, TrackStore
from .windows import draw_window, stored_frame_positions, window_frame_indices

log = logging.getLogger(__name__)


def default_store_path() -> Path:
    from ..data import default_cache_dir

    return default_cache_dir() / "tracks"


def store_settings(cfg: TrainConfig) -> dict[str, Any]:
    """What makes two stored entries interchangeable: the tracker, its settings, its weights, the stored geometry.
    An entry made under other settings is a miss (never reused)."""
    t = cfg.tracker
    backend = resolve_tracker_backend(t)
    settings: dict[str, Any] = {"backend": backend, "store_grid": t.store_grid, "store_size": t.store_size,
                                "tubelet": cfg.model.tubelet_size, "num_frames": cfg.data.num_frames,
                                "sampling_rate": cfg.data.sampling_rate}
    if backend == "cotracker3":
        settings.update(variant=t.variant, iters=t.iters, resolution=t.resolution, precision=t.precision,
                        checkpoint_sha256=_file_sha256(t.checkpoint))
    return settings


def open_store(cfg: TrainConfig, *, readonly: bool) -> TrackStore:
    path = Path(cfg.tracker.store_path).expanduser() if cfg.tracker.store_path else default_store_path()
    return TrackStore(path, store_settings(cfg), readonly=readonly)


class TrackWindows:
    """The data set's side (picklable; the store opens lazily in each worker)."""

    def __init__(self, cfg: TrainConfig, store: TrackStore | None):
        self.windows = cfg.tracker.windows_per_video
        self.num_frames = cfg.data.num_frames
        self.sampling_rate = cfg.data.sampling_rate
        self.store_size = cfg.tracker.store_size
        self.points = cfg.tracker.store_grid ** 2
        self.positions = stored_frame_positions(cfg.data.num_frames, cfg.model.tubelet_size)
        self.store = store

    def frame_indices(self, available: int, *, seed: int, epoch: int, index: int, attempt: int) -> tuple[int,
                                                                                                        np.ndarray]:
        """The drawn window and its source frame numbers."""
        window = draw_window(self.windows, seed=seed, epoch=epoch, index=index, attempt=attempt)
        return window, window_frame_indices(available, self.num_frames, self.sampling_rate, self.windows, window)

    def extras(self, video: str, frames: np.ndarray, window: int, indices: np.ndarray) -> dict[str, Any]:
        """Per-sample outputs: the window, the decoded frame size, the stored tracks (hit) or the frames to track."""
        height, width = frames.shape[1:3]
        stored_indices = indices[self.positions]
        entry = self.store.get(video, window, stored_indices.tolist()) if self.store is not None else None
        out: dict[str, Any] = {"window": torch.tensor(window, dtype=torch.int64),
                               "source_size": torch.tensor([width, height], dtype=torch.int64),
                               "stored_hit": torch.tensor(entry is not None),
                               "video_key": video,
                               "stored_indices": torch.from_numpy(stored_indices.astype(np.int64))}
        if entry is not None:
            out["stored_tracks"] = torch.from_numpy(np.ascontiguousarray(entry.tracks, dtype=np.float32))
            out["stored_vis"] = torch.from_numpy(np.ascontiguousarray(entry.visibility, dtype=np.float32))
        else:
            out["stored_tracks"] = torch.zeros(len(self.positions), self.points, 2)
            out["stored_vis"] = torch.zeros(len(self.positions), self.points)
            out["store_frames"] = torch.from_numpy(store_frames(frames[self.positions], self.store_size))
        return out


def store_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """(T', H, W, 3) uint8 whole frames -> (T', size, size, 3): what the store's tracker sees (aspect not kept: the
    coordinates are normalised per axis)."""
    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])


def track_store_frames(tracker: PointTracker, frames_u8: Tensor, store_grid: int) -> tuple[Tensor, Tensor]:
    """(n, T', S, S, 3) uint8 -> stored tracks (n, T', P, 2) normalised and visibility (n, T', P)."""
    n, _, size = frames_u8.shape[:3]
    frames = frames_u8.permute(0, 1, 4, 2, 3).float()
    points = store_query_points(store_grid, device=frames.device) * size - 0.5  # normalised -> store pixels
    queries = torch.cat([torch.zeros_like(points[:, :1]), points], dim=1).unsqueeze(0).expand(n, -1, -1)
    out: TrackerOutput = tracker(frames, queries.contiguous())
    return (out.tracks + 0.5) / size, out.visibility


class StoreTrackSource:
    """The trainer's side: tracks of a batch from the store (hits), the tracker (misses, then stored) and the remap."""

    def __init__(self, cfg: TrainConfig, tracker: PointTracker, store: TrackStore, device: torch.device):
        self.cfg = cfg
        self.tracker = tracker
        self.store = store
        self.device = device
        self.store_grid = cfg.tracker.store_grid
        self.num_sample = cfg.data.num_sample
        self.clip_grid = tracker_grid_size(cfg)
        self.stats = {"hits": 0, "misses": 0}

    def __call__(self, batch: dict[str, Any], frames_u8: Tensor) -> TrackerOutput:
        """Tracks (B, T', G², 2) in clip pixels and visibility of every clip of `batch` (frames (B, T, H, W, 3))."""
        hit = batch["stored_hit"]  # host tensor from the workers: counting it costs no device sync
        misses = int((~hit).sum())
        self.stats["hits"] += len(hit) - misses
        self.stats["misses"] += misses
        stored = batch["stored_tracks"].to(self.device, non_blocking=True)
        stored_vis = batch["stored_vis"].to(self.device, non_blocking=True)
        if misses:
            stored, stored_vis = self._fill(batch, stored, stored_vis)
        repeat = self.num_sample
        if repeat > 1:  # stored per sample, remapped per clip (the num_sample crops of one decode)
            stored, stored_vis = stored.repeat_interleave(repeat, 0), stored_vis.repeat_interleave(repeat, 0)
        height, width = frames_u8.shape[2:4]
        queries = query_grid(self.clip_grid, height, width, self.tracker.grid_rule, device=self.device)
        source_size = batch["source_size"].repeat_interleave(repeat, 0) if repeat > 1 else batch["source_size"]
        tracks, vis = remap_to_clip(stored, stored_vis, self.store_grid, queries,
                                    batch["crop_box"].to(self.device, non_blocking=True),
                                    batch["flipped"].to(self.device, non_blocking=True),
                                    source_size.to(self.device, non_blocking=True), width)
        return TrackerOutput(tracks=tracks, visibility=vis)

    def _fill(self, batch: dict[str, Any], stored: Tensor, stored_vis: Tensor) -> tuple[Tensor, Tensor]:
        """Track the misses (their stored frames came from the workers), write them, and put them in the batch."""
        # the collate lists the rows only when some samples hit (when all missed, every row carries frames)
        rows = batch.get("store_frames_rows", torch.arange(len(batch["stored_hit"])))
        frames = batch["store_frames"].to(self.device, non_blocking=True)
        tracks, vis = track_store_frames(self.tracker, frames, self.store_grid)
        stored, stored_vis = stored.clone(), stored_vis.clone()
        index = rows.to(self.device, non_blocking=True)
        stored[index] = tracks.to(stored.dtype)
        stored_vis[index] = vis.to(stored_vis.dtype)
        # Writing needs the values on the host: a device sync, paid once per (video, window) on a cold store.
        tracks_host, vis_host = tracks.float().cpu().numpy(), vis.float().cpu().numpy()
        # one commit per batch (LMDB syncs every commit)
        self.store.put_many([(batch["video_key"][row], int(batch["window"][row]), batch["stored_indices"][row].tolist(),
                              TrackEntry(tracks_host[i], vis_host[i])) for i, row in enumerate(rows.tolist())])
        return stored, stored_vis


def _file_sha256(path: str | None) -> str | None:
    if not path or path == "official":
        return path
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["TrackWindows", "StoreTrackSource", "store_settings", "open_store", "default_store_path",
           "store_frames", "track_store_frames"]
