"""LucasKanadeTracker scored against the synthetic set's exact ground-truth tracks."""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from trackmae_stream.tracking.base import query_grid
from trackmae_stream.tracking.lucas_kanade import LucasKanadeTracker

synthetic = pytest.importorskip("trackmae_stream.data.synthetic")

NUM_FRAMES, SAMPLING_RATE, GRID = 8, 2, 14


def decode_rgb(path) -> np.ndarray:
    """All frames of a video as uint8 (T, H, W, 3), decoded with PyAV (independent of the data package's loaders)."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def tracked_synthetic_clips():
    """Six clips (one per class pair) of 8 frames at sampling rate 2 from frame 0, tracked on a 14 x 14 grid."""
    dataset = synthetic.ensure_synthetic_dataset(task="legacy")  # the thresholds below were measured on it
    frame_ids = np.arange(NUM_FRAMES) * SAMPLING_RATE
    queries = query_grid(GRID, dataset.size, dataset.size, "cotracker").numpy()
    clips, truth, visible = [], [], []
    for video in dataset.videos[::8]:
        clips.append(decode_rgb(video)[frame_ids])
        tracks, vis = synthetic.ground_truth_tracks(video, queries)  # queries are frame-0 points: clips start at 0
        truth.append(tracks[frame_ids])
        visible.append(vis[frame_ids])
    frames = torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float()
    tracker = LucasKanadeTracker()
    out = tracker.track_grid(frames, GRID)
    return out.tracks.numpy(), out.visibility.numpy(), np.stack(truth), np.stack(visible)


def test_end_point_error_far_below_zero_motion(tracked_synthetic_clips):
    """Mean end-point error over ground-truth-visible points (frames 1..7) < 0.3 x the zero-motion baseline
    (measured: ~0.2 x, i.e. ~1 px against ~5 px; median ~0.1 px), and the tracks really move."""
    tracks, _, truth, visible = tracked_synthetic_clips
    scored = visible[:, 1:] & visible[:, :1]
    error = np.linalg.norm(tracks[:, 1:] - truth[:, 1:], axis=-1)[scored]
    zero_motion = np.linalg.norm(truth[:, :1] - truth[:, 1:], axis=-1)[scored]
    assert zero_motion.mean() > 2.0, "the synthetic clips should move by pixels"
    assert error.mean() < 0.3 * zero_motion.mean(), (error.mean(), zero_motion.mean())
    assert np.median(error) < 0.25, np.median(error)


def test_visibility_flags_unreliable_tracks(tracked_synthetic_clips):
    """Points the tracker scores visible (> 0.5) are tracked much better than those it scores invisible."""
    tracks, visibility, truth, visible = tracked_synthetic_clips
    scored = visible[:, 1:] & visible[:, :1]
    error = np.linalg.norm(tracks[:, 1:] - truth[:, 1:], axis=-1)
    confident = visibility[:, 1:] > 0.5
    assert 0.5 < (confident & scored).sum() / scored.sum() < 1.0
    assert error[scored & confident].mean() < 0.5 * error[scored & ~confident].mean()
