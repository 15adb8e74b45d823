"""The K fixed temporal windows per video that the track store holds, and the keyed draw among them.

Definitions (num_available = frames the video has, T = num_frames, r = sampling_rate, span = T * r, K =
`tracker.windows_per_video` >= 1):

- last start L = max(num_available - span, 0): the last offset at which a whole span fits (0 when none fits);
- window k (0 <= k < K) starts at s_k = floor(k * L / (K - 1)) for K > 1 (integer arithmetic: s_0 = 0,
  s_{K-1} = L, consecutive starts differ by floor(L / (K-1)) or one more), s_0 = 0 for K = 1. Short videos
  (L < K - 1) give repeated starts, and a video shorter than the span gives every window start 0: K draws among
  copies of one window, which is what uniform sampling would offer there too;
- window k's source frames: s_k + min(i, (num_available - 1 - s_k) // r) * r for i = 0 .. T-1, the clamp of
  `sample_clip_indices` (VideoMAE's: a video shorter than the span repeats its last strided frame), so a window is
  exactly the clip `sample_clip_indices` returns when its generator draws the offset s_k;
- stored frames: the clip frames at positions 0, t, 2t, ... (t = tubelet size; the frames the inline tracker sees,
  `clip[:, ::t]`), the first of them being the query frame of the stored tracks;
- the sampler draws k uniformly from the generator keyed by (seed, epoch, index, attempt, TEMPORAL) (`keyed_rng`):
  the same sample gets the same window on any worker count and after a resume, and it replaces the data set's
  uniform offset draw (which uses the same key) under `tracker.placement=store`.

Temporal augmentation thus stays random, among K offsets instead of L + 1.
"""
from __future__ import annotations

import numpy as np

from ..data.dataset import TEMPORAL, keyed_rng


def _check(num_available: int, num_frames: int, sampling_rate: int, windows_per_video: int) -> None:
    if num_frames < 1 or sampling_rate < 1:
        raise ValueError(f"num_frames and sampling_rate must be >= 1, got {num_frames}, {sampling_rate}")
    if windows_per_video < 1:
        raise ValueError(f"windows_per_video must be >= 1, got {windows_per_video}")
    if num_available < num_frames:  # the same rule as sample_clip_indices: the data set skips such a video
        raise ValueError(f"video has {num_available} frames, fewer than num_frames={num_frames}")


def window_starts(num_available: int, num_frames: int, sampling_rate: int, windows_per_video: int) -> np.ndarray:
    """int64 (K,) first source frame of each window: evenly spaced from 0 to the last start that fits the span."""
    _check(num_available, num_frames, sampling_rate, windows_per_video)
    last = max(num_available - num_frames * sampling_rate, 0)
    if windows_per_video == 1:
        return np.zeros(1, dtype=np.int64)
    k = np.arange(windows_per_video, dtype=np.int64)
    return (k * last) // (windows_per_video - 1)  # exact integers: no float rounding differs between machines


def window_frame_indices(num_available: int, num_frames: int, sampling_rate: int, windows_per_video: int,
                         window: int) -> np.ndarray:
    """int64 (num_frames,) source frame numbers of window `window` (the clamp rule of `sample_clip_indices`)."""
    starts = window_starts(num_available, num_frames, sampling_rate, windows_per_video)
    if not 0 <= window < windows_per_video:
        raise ValueError(f"window must be in [0, {windows_per_video}), got {window}")
    offset = int(starts[window])
    steps = np.minimum(np.arange(num_frames), (num_available - 1 - offset) // sampling_rate)
    return (offset + steps * sampling_rate).astype(np.int64)


def draw_window(windows_per_video: int, *, seed: int, epoch: int, index: int, attempt: int) -> int:
    """Which of the K windows sample `index` uses at `epoch` (uniform, keyed like the data set's temporal draw)."""
    if windows_per_video < 1:
        raise ValueError(f"windows_per_video must be >= 1, got {windows_per_video}")
    return int(keyed_rng(seed, epoch, index, attempt, TEMPORAL).integers(windows_per_video))


def stored_frame_positions(num_frames: int, tubelet: int) -> np.ndarray:
    """int64 (T',) positions in the clip of the stored frames: 0, t, 2t, ... (the frames `clip[:, ::t]` selects)."""
    if num_frames < 1 or tubelet < 1:
        raise ValueError(f"num_frames and tubelet must be >= 1, got {num_frames}, {tubelet}")
    return np.arange(0, num_frames, tubelet, dtype=np.int64)


def stored_frame_indices(num_available: int, num_frames: int, sampling_rate: int, windows_per_video: int,
                         tubelet: int) -> np.ndarray:
    """int64 (K, T') source frame numbers the store tracks for each window of a video (query frame first)."""
    positions = stored_frame_positions(num_frames, tubelet)
    return np.stack([window_frame_indices(num_available, num_frames, sampling_rate, windows_per_video, k)[positions]
                     for k in range(windows_per_video)])
