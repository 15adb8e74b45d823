"""The track store's K temporal windows per video and the keyed draw among them (trackmae_stream.tracks.windows)."""
from __future__ import annotations

import numpy as np
import pytest

from trackmae_stream.data.dataset import TEMPORAL, keyed_rng
from trackmae_stream.data.decode import sample_clip_indices
from trackmae_stream.tracks.windows import (
    draw_window,
    stored_frame_indices,
    stored_frame_positions,
    window_frame_indices,
    window_starts,
)

# (num_available, num_frames, sampling_rate, K): long videos, an exact fit, short ones, fewer starts than windows
CASES = [(300, 16, 4, 4), (40, 16, 2, 4), (32, 16, 2, 3), (33, 16, 2, 5), (20, 16, 2, 4), (16, 16, 4, 2),
         (250, 16, 4, 1), (100, 8, 3, 7), (17, 16, 1, 4)]


class _FixedOffset:
    """Stands in for the generator of `sample_clip_indices`: its one draw returns the given offset."""

    def __init__(self, offset: int):
        self.offset = offset

    def integers(self, low: int, high: int) -> int:
        assert low <= self.offset < high, (low, self.offset, high)
        return self.offset


@pytest.mark.parametrize("num_available,num_frames,rate,k", CASES)
def test_starts_evenly_spaced_within_the_video(num_available, num_frames, rate, k):
    starts = window_starts(num_available, num_frames, rate, k)
    assert starts.dtype == np.int64 and starts.shape == (k,)
    last = max(num_available - num_frames * rate, 0)
    assert starts[0] == 0 and (k == 1 or starts[-1] == last)
    gaps = np.diff(starts)
    if k > 1:
        step = last // (k - 1)
        assert np.all((gaps == step) | (gaps == step + 1)), gaps  # even spacing to the integer
    for window in range(k):
        indices = window_frame_indices(num_available, num_frames, rate, k, window)
        assert indices.dtype == np.int64 and indices.shape == (num_frames,)
        assert indices[0] == starts[window] and 0 <= indices.min() and indices.max() < num_available
        assert np.all(np.diff(indices) >= 0)


@pytest.mark.parametrize("num_available,num_frames,rate,k", CASES)
def test_windows_are_the_clips_sample_clip_indices_draws(num_available, num_frames, rate, k):
    """Window k is exactly `sample_clip_indices` with its offset draw replaced by s_k (the clamp rule included);
    a video shorter than the span has only the offset 0, and every window is that clip."""
    for window, start in enumerate(window_starts(num_available, num_frames, rate, k)):
        expected = sample_clip_indices(num_available, num_frames, rate, _FixedOffset(int(start)))
        np.testing.assert_array_equal(window_frame_indices(num_available, num_frames, rate, k, window), expected)
        if num_available < num_frames * rate:
            assert start == 0
            np.testing.assert_array_equal(expected, sample_clip_indices(num_available, num_frames, rate,
                                                                        np.random.default_rng(window)))


def test_short_video_repeats_its_last_strided_frame():
    np.testing.assert_array_equal(window_frame_indices(20, 16, 2, 4, 3),
                                  [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 18, 18, 18, 18, 18, 18])


def test_single_window():
    np.testing.assert_array_equal(window_starts(500, 16, 4, 1), [0])
    np.testing.assert_array_equal(window_frame_indices(500, 16, 4, 1, 0), np.arange(16) * 4)
    assert {draw_window(1, seed=3, epoch=e, index=i, attempt=0) for e in range(5) for i in range(50)} == {0}


def test_invalid_arguments():
    with pytest.raises(ValueError, match="fewer than num_frames"):
        window_starts(15, 16, 2, 4)
    with pytest.raises(ValueError, match="windows_per_video"):
        window_starts(100, 16, 2, 0)
    with pytest.raises(ValueError, match="window must be"):
        window_frame_indices(100, 16, 2, 4, 4)
    with pytest.raises(ValueError, match="windows_per_video"):
        draw_window(0, seed=0, epoch=0, index=0, attempt=0)


def test_draw_window_is_keyed_and_reproducible():
    """The draw is a function of (seed, epoch, index, attempt) alone, from the data set's TEMPORAL generator."""
    for key in [(0, 0, 0, 0), (7, 3, 12345, 2), (1, 799, 5, 0)]:
        seed, epoch, index, attempt = key
        first = draw_window(6, seed=seed, epoch=epoch, index=index, attempt=attempt)
        assert first == draw_window(6, seed=seed, epoch=epoch, index=index, attempt=attempt)
        assert first == int(keyed_rng(seed, epoch, index, attempt, TEMPORAL).integers(6))
    # a sample moves between windows across epochs (temporal augmentation stays random)
    assert len({draw_window(4, seed=0, epoch=e, index=9, attempt=0) for e in range(40)}) == 4


@pytest.mark.parametrize("k", [2, 4, 7])
def test_draw_window_is_uniform(k):
    """Chi-square of the window counts over 6,000 keys (epochs x indices) below the 0.1% critical value.

    Deterministic (keyed): the statistic is a fixed number, checked against the bound df = k - 1."""
    counts = np.bincount([draw_window(k, seed=11, epoch=e, index=i, attempt=0)
                          for e in range(6) for i in range(1000)], minlength=k)
    expected = counts.sum() / k
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    critical = {1: 10.83, 3: 16.27, 6: 22.46}[k - 1]
    assert chi2 < critical, (counts, chi2)


def test_stored_frames():
    np.testing.assert_array_equal(stored_frame_positions(16, 2), [0, 2, 4, 6, 8, 10, 12, 14])
    np.testing.assert_array_equal(stored_frame_positions(15, 2), np.arange(15)[::2])  # what clip[:, ::t] selects
    np.testing.assert_array_equal(stored_frame_positions(16, 1), np.arange(16))
    frames = stored_frame_indices(100, 16, 2, 3, 2)
    assert frames.shape == (3, 8) and frames.dtype == np.int64
    for window in range(3):
        np.testing.assert_array_equal(frames[window], window_frame_indices(100, 16, 2, 3, window)[::2])
