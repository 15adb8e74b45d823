"""`tracker.backend=synthetic_gt`: the exact tracks of the synthetic set's clips, computed from the motion each video's
`<stem>.tracks.npz` stores, instead of tracking pixels.

It separates tracker quality from the method: a run with exact tracks shows what the motion target can give, a run
with a real tracker what that tracker leaves of it. The tracks are those of the clip's own query grid (the configured
`tracker.grid_rule` and grid size on the cropped, resized, possibly mirrored clip), mapped to the source video through
the clip's crop box and flip, followed exactly through the clip's sampled frames (`synthetic.compute_tracks` at the
first frame of every tubelet) and mapped back: no interpolation, no tracker error. Visibility is exact too (1 where
the point's surface is on top and inside the frame, else 0).

It needs each clip's identity and geometry (`source_index`, `frame_indices`, `crop_box`, `flipped` of the loader
batch), so it plugs in as the preparer's per-batch track source (`clip_track_source`); tracking bare frames is not
possible and says so. The arithmetic is float64 numpy on the host, a few thousand points per clip; the result is
copied to the device once per batch.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError, TrainConfig, tracker_grid_size
from .base import PointTracker, TrackerOutput, query_grid

#: motion parameters kept per process (a few hundred bytes each)
_MOTION_CACHE_SIZE = 4096


class SyntheticGroundTruthTracker(PointTracker):
    name = "synthetic_gt"

    def __init__(self, grid_rule: str = "cotracker"):
        super().__init__(grid_rule)

    def forward(self, frames: Tensor, queries: Tensor) -> TrackerOutput:
        raise RuntimeError("tracker.backend=synthetic_gt reads each clip's stored motion; it cannot track bare frames "
                           "(it runs as the preparer's track source: data.source=synthetic, tracker.placement=inline)")

    def gflop(self, n_frames: int, n_points: int, height: int, width: int, *,
              explicit_queries: bool = False) -> float | None:
        return 0.0  # no network: closed-form geometry on the host

    def clip_track_source(self, cfg: TrainConfig, device: torch.device) -> SyntheticTrackSource:
        if cfg.data.source != "synthetic":
            raise ConfigError(f"tracker.backend=synthetic_gt needs data.source=synthetic (got {cfg.data.source!r}): "
                              "only the synthetic set stores its clips' motion")
        if cfg.tracker.placement != "inline":
            raise ConfigError(f"tracker.backend=synthetic_gt computes exact tracks per clip; tracker.placement="
                              f"{cfg.tracker.placement!r} is not needed with it (use inline)")
        from ..data_setup import video_records

        records, _, _ = video_records(cfg)
        return SyntheticTrackSource([str(r.path) for r in records], grid_size=tracker_grid_size(cfg),
                                    grid_rule=self.grid_rule, tubelet=cfg.model.tubelet_size,
                                    input_size=cfg.data.input_size, device=device)


class SyntheticTrackSource:
    """Per batch: (loader batch, frames_u8 (B, T, H, W, 3)) -> TrackerOutput with tracks (B, T', G², 2) in clip pixels
    and visibility (B, T', G²), T' = T / tubelet (the first frame of every tubelet)."""

    def __init__(self, videos: list[str], *, grid_size: int, grid_rule: str, tubelet: int, input_size: int,
                 device: torch.device):
        self.videos = videos
        self.grid_size = grid_size
        self.grid_rule = grid_rule
        self.tubelet = tubelet
        self.input_size = input_size
        self.device = device
        self._motions: OrderedDict[int, Any] = OrderedDict()

    def _motion(self, index: int):
        from ..data.synthetic import load_motion

        motion = self._motions.get(index)
        if motion is None:
            motion = load_motion(self.videos[index])
            self._motions[index] = motion
            if len(self._motions) > _MOTION_CACHE_SIZE:
                self._motions.popitem(last=False)
        else:
            self._motions.move_to_end(index)
        return motion

    def __call__(self, batch: dict[str, Any], frames_u8: Tensor) -> TrackerOutput:
        b, _, h, w, _ = frames_u8.shape
        if h != self.input_size or w != self.input_size:
            raise ValueError(f"synthetic_gt: clips of {h}x{w}, expected {self.input_size}x{self.input_size}")
        source = np.asarray(batch["source_index"]).reshape(-1)
        repeats = b // len(source)  # data.num_sample clips cut from one decode sit next to each other
        source = np.repeat(source, repeats)
        frame_numbers = np.asarray(batch["frame_indices"])[:, :: self.tubelet]
        boxes = np.asarray(batch["crop_box"], dtype=np.float64)
        flipped = np.asarray(batch["flipped"]).astype(bool).reshape(-1)
        grid = query_grid(self.grid_size, h, w, self.grid_rule).double().numpy()  # (G², 2) clip pixels
        tracks = np.empty((b, frame_numbers.shape[1], len(grid), 2), dtype=np.float32)
        visible = np.empty(tracks.shape[:3], dtype=np.float32)
        for i in range(b):
            tracks[i], visible[i] = clip_tracks(self._motion(int(source[i])), grid, frame_numbers[i], boxes[i],
                                                bool(flipped[i]), self.input_size)
        return TrackerOutput(tracks=torch.from_numpy(tracks).to(self.device),
                             visibility=torch.from_numpy(visible).to(self.device))


def clip_tracks(motion, clip_points: np.ndarray, frame_numbers: np.ndarray, crop_box: np.ndarray, flipped: bool,
                input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact tracks (T', P, 2) in clip pixels and visibility (T', P) of clip points (P, 2) queried at frame_numbers[0].

    The clip's geometry (the loader's multi-scale crop then resize to input_size, then an optional mirror; pixel-centre
    convention) maps a clip pixel c to the source pixel s = box_xy + (c' + 0.5) * box_wh / input_size - 0.5, with
    c' = c, or (input_size - 1 - x, y) when mirrored; tracks follow in the source and come back by the inverse.
    """
    from ..data.synthetic import compute_tracks

    x0, y0, bw, bh = (float(v) for v in crop_box)
    scale = np.array([bw / input_size, bh / input_size])
    pts = np.asarray(clip_points, dtype=np.float64).copy()
    if flipped:
        pts[:, 0] = (input_size - 1) - pts[:, 0]
    source_pts = np.array([x0, y0]) + (pts + 0.5) * scale - 0.5
    tracks, visible = compute_tracks(motion, source_pts, frames=np.asarray(frame_numbers))
    clip = (tracks.astype(np.float64) + 0.5 - np.array([x0, y0])) / scale - 0.5
    if flipped:
        clip[..., 0] = (input_size - 1) - clip[..., 0]
    return clip.astype(np.float32), visible.astype(np.float32)
