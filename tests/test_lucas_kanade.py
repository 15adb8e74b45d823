"""LucasKanadeTracker against independent references: OpenCV's calcOpticalFlowPyrLK and analytic translations."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from trackmae_stream.tracking.lucas_kanade import LucasKanadeTracker


def cosine_texture(height: int, width: int, shift_xy: tuple[float, float], seed: int) -> np.ndarray:
    """A smooth random texture (sum of 16 cosines, periods 14..40 px) sampled at (x - sx, y - sy), float64 in [0, 255].

    Evaluated analytically, so frames built with different shifts are exact sub-pixel translations of each other.
    """
    rng = np.random.default_rng(seed)
    count = 16
    periods = rng.uniform(14.0, 40.0, count)
    angles = rng.uniform(0.0, math.pi, count)
    phases = rng.uniform(0.0, 2 * math.pi, count)
    amplitudes = rng.uniform(0.5, 1.0, count)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    xs, ys = xs - shift_xy[0], ys - shift_xy[1]
    image = np.zeros((height, width))
    for period, angle, phase, amplitude in zip(periods, angles, phases, amplitudes):
        image += amplitude * np.cos(2 * math.pi / period * (xs * math.cos(angle) + ys * math.sin(angle)) + phase)
    return 127.5 + 127.5 * image / amplitudes.sum()


def grey_clip_to_frames(grey: np.ndarray) -> torch.Tensor:
    """(B, T, H, W) grey -> (B, T, 3, H, W) float32 with equal channels (grey conversion is then the identity)."""
    frames = torch.from_numpy(np.ascontiguousarray(grey)).float()
    return frames.unsqueeze(2).expand(-1, -1, 3, -1, -1).contiguous()


def warped_uint8_clip(height: int, width: int, num_frames: int, seed: int) -> np.ndarray:
    """(T, H, W) uint8: a blurred-noise texture under a random small affine motion that accumulates frame to frame."""
    rng = np.random.default_rng(seed)
    canvas = cv2.GaussianBlur(rng.uniform(0, 255, (2 * height, 2 * width)).astype(np.float32), (0, 0), 1.5)
    canvas = (canvas - canvas.min()) / (canvas.max() - canvas.min()) * 255.0
    frames = []
    affine = np.array([[1.0, 0.0, width / 2], [0.0, 1.0, height / 2]])
    for _ in range(num_frames):
        frames.append(cv2.warpAffine(canvas, affine.astype(np.float32), (width, height),
                                     flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP))
        step = np.array([[1.0 + rng.uniform(-0.02, 0.02), rng.uniform(-0.03, 0.03), rng.uniform(-4, 4)],
                         [rng.uniform(-0.03, 0.03), 1.0 + rng.uniform(-0.02, 0.02), rng.uniform(-4, 4)]])
        affine = np.vstack([affine, [0, 0, 1]]) @ np.vstack([step, [0, 0, 1]])
        affine = affine[:2]
    return np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8)


def make_queries(points_xy: np.ndarray, query_frame: int | np.ndarray = 0) -> torch.Tensor:
    """(B, N, 2) points -> (B, N, 3) queries (t, x, y)."""
    xy = torch.from_numpy(np.asarray(points_xy, dtype=np.float32))
    t = torch.as_tensor(query_frame, dtype=torch.float32).expand(xy.shape[:2]).unsqueeze(-1)
    return torch.cat([t, xy], dim=-1)


def test_matches_opencv_pyramidal_lk_on_textured_points():
    """Frame-to-frame chains agree with cv2.calcOpticalFlowPyrLK (same window, levels, iterations, eps).

    OpenCV works on an 8-bit pyramid with 14-bit fixed-point interpolation, we in float32: on points OpenCV keeps
    (status 1) whose windows stay inside the frame, the two agree to 0.01 px at worst and 0.001 px at the median
    (measured: 0.003 and 0.0001 px over 4 chained steps).
    97 x 131 frames with a 21 px window exercise OpenCV's level rule (3 levels used out of 4 asked for).
    """
    height, width, num_frames, num_points = 97, 131, 5, 60
    tracker = LucasKanadeTracker(window=21, levels=3, iters=10, eps=0.01)
    assert tracker.num_levels(height, width) == 3
    rng = np.random.default_rng(1)
    clips = np.stack([warped_uint8_clip(height, width, num_frames, seed) for seed in (11, 12)])
    points = np.stack([rng.uniform(12, width - 13, num_points), rng.uniform(12, height - 13, num_points)], -1)
    points = np.stack([points, points[::-1].copy()]).astype(np.float32)  # (2, N, 2)

    ours = tracker(grey_clip_to_frames(clips), make_queries(points)).tracks.numpy()
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 10, 0.01)
    differences = []
    for b in range(2):
        current = points[b].reshape(-1, 1, 2)
        kept = np.ones(num_points, dtype=bool)
        for t in range(1, num_frames):
            current, status, _ = cv2.calcOpticalFlowPyrLK(clips[b, t - 1], clips[b, t], current, None,
                                                          winSize=(21, 21), maxLevel=3, criteria=criteria)
            xy = current.reshape(-1, 2)
            kept &= (status.ravel() == 1) & (xy[:, 0] > 10) & (xy[:, 0] < width - 11)
            kept &= (xy[:, 1] > 10) & (xy[:, 1] < height - 11)
            differences.append(np.linalg.norm(ours[b, t] - xy, axis=-1)[kept])
    differences = np.concatenate(differences)
    assert differences.size > 0.6 * 2 * (num_frames - 1) * num_points, "too few comparable points"
    moved = np.linalg.norm(ours[:, -1] - points, axis=-1)
    assert np.median(moved) > 3.0, "the test clip should move points by several pixels"
    assert np.median(differences) < 1e-3, np.median(differences)
    assert differences.max() < 0.01, differences.max()


TRANSLATION_SIZE = (83, 101)
TRANSLATION_STEPS = np.array([[0.37, -0.61], [-1.43, 0.88]])  # pixels per frame, one row per clip
TRANSLATION_FRAMES = 6


@pytest.fixture(scope="module")
def translating_clip() -> torch.Tensor:
    """Two clips (B=2, T=6, 83 x 101) of analytic textures translating by a constant sub-pixel step per frame."""
    height, width = TRANSLATION_SIZE
    return grey_clip_to_frames(np.stack([
        np.stack([cosine_texture(height, width, tuple(TRANSLATION_STEPS[b] * t), seed=b)
                  for t in range(TRANSLATION_FRAMES)]) for b in range(2)]))


def points_kept_inside(rng: np.random.Generator, count: int, margin: float) -> np.ndarray:
    """(2, count, 2) points whose +-margin window stays inside every frame of `translating_clip`."""
    height, width = TRANSLATION_SIZE
    travel = TRANSLATION_STEPS * (TRANSLATION_FRAMES - 1)
    low = margin + np.maximum(-travel, 0.0)  # (2, 2) as (x, y) per clip
    high = np.array([width - 1, height - 1]) - margin - np.maximum(travel, 0.0)
    return low[:, None] + rng.uniform(size=(2, count, 2)) * (high - low)[:, None]


def test_subpixel_translation_is_recovered_exactly(translating_clip):
    """Known answer: a point at p in frame 0 lies at p + t * step in frame t.

    The only approximation left is bilinear interpolation of the sampled texture, which biases LK by up to a few
    hundredths of a pixel (OpenCV shows the same 0.035 px worst case on these frames): max error < 0.05 px, median
    < 0.01 px, over 5 chained steps, with windows kept inside the frame.
    """
    points = points_kept_inside(np.random.default_rng(2), 23, margin=8.0)
    out = LucasKanadeTracker(window=15, levels=2, iters=20, eps=1e-3).forward(translating_clip, make_queries(points))
    t = np.arange(TRANSLATION_FRAMES).reshape(1, -1, 1, 1)
    expected = points[:, None] + t * TRANSLATION_STEPS[:, None, None, :]
    error = np.linalg.norm(out.tracks.numpy() - expected, axis=-1)
    assert error.max() < 0.05, error.max()
    assert np.median(error) < 0.01, np.median(error)
    assert out.tracks.shape == (2, TRANSLATION_FRAMES, 23, 2) and out.tracks.dtype == torch.float32
    assert out.visibility.shape == (2, TRANSLATION_FRAMES, 23)
    assert out.visibility.min() > 0.9


def test_queries_after_the_first_frame_are_tracked_both_ways(translating_clip):
    """Points queried at frames 0, 2 and 5 follow the known translation before and after their query frame."""
    points = points_kept_inside(np.random.default_rng(3), 9, margin=8.0)
    query_frames = np.tile(np.repeat([0, 2, 5], 3), (2, 1))
    # shift each point so that it sits at the sampled position at its own query frame
    points = points + query_frames[..., None] * TRANSLATION_STEPS[:, None, :]
    out = LucasKanadeTracker(window=15, levels=2, iters=20, eps=1e-3).forward(
        translating_clip, make_queries(points, query_frames))
    t = np.arange(TRANSLATION_FRAMES).reshape(1, -1, 1, 1)
    expected = points[:, None] + (t - query_frames[:, None, :, None]) * TRANSLATION_STEPS[:, None, None, :]
    error = np.linalg.norm(out.tracks.numpy() - expected, axis=-1)
    assert error.max() < 0.05, error.max()
    at_query = out.tracks.numpy()[np.arange(2)[:, None], query_frames, np.arange(9)[None, :]]
    np.testing.assert_allclose(at_query, points, atol=1e-5)
    assert out.visibility.min() > 0.9


def test_batch_equals_per_sample(translating_clip):
    frames = translating_clip
    rng = np.random.default_rng(4)
    points = np.stack([rng.uniform(5, 96, (2, 17)), rng.uniform(5, 78, (2, 17))], -1)
    queries = make_queries(points, rng.integers(0, TRANSLATION_FRAMES, (2, 17)))
    tracker = LucasKanadeTracker(window=11, levels=2, iters=6)
    batched = tracker(frames, queries)
    for b in range(2):
        single = tracker(frames[b:b + 1], queries[b:b + 1])
        torch.testing.assert_close(batched.tracks[b:b + 1], single.tracks, atol=1e-4, rtol=0)
        torch.testing.assert_close(batched.visibility[b:b + 1], single.visibility, atol=1e-4, rtol=0)


def test_visibility_drops_where_content_is_replaced():
    """From frame 3 on, the right half of the frame shows an unrelated texture: forward-backward checking must score
    those points low, and points on the unchanged left half high."""
    height, width, num_frames = 67, 121, 5
    moving = np.stack([cosine_texture(height, width, (0.8 * t, 0.3 * t), seed=7) for t in range(num_frames)])
    replaced = moving.copy()
    replaced[3:, :, width // 2:] = cosine_texture(height, width, (0.0, 0.0), seed=8)[:, width // 2:]
    rng = np.random.default_rng(5)
    left = np.stack([rng.uniform(10, width // 2 - 18, 20), rng.uniform(10, height - 10, 20)], -1)
    right = np.stack([rng.uniform(width // 2 + 14, width - 14, 20), rng.uniform(10, height - 10, 20)], -1)
    points = np.concatenate([left, right])[None]
    out = LucasKanadeTracker(window=15, levels=2).forward(grey_clip_to_frames(replaced[None]), make_queries(points))
    visibility = out.visibility[0].numpy()
    assert visibility[:, :20].min() > 0.9
    assert visibility[:3, 20:].min() > 0.9  # before the replacement
    assert visibility[3:, 20:].mean() < 0.2, visibility[3:, 20:].mean(axis=1)
    # visibility never recovers along a chain
    assert (np.diff(visibility, axis=0) <= 1e-6).all()


def test_points_leaving_the_frame_become_invisible():
    height, width = 65, 81
    frames = np.stack([cosine_texture(height, width, (3.0 * t, 0.0), seed=9) for t in range(5)])
    points = np.array([[[width - 6.0, 30.0], [20.0, 30.0]]])
    out = LucasKanadeTracker(window=11, levels=1).forward(grey_clip_to_frames(frames[None]), make_queries(points))
    assert out.visibility[0, -1, 0] == 0.0  # x = 75 + 12 > 80.5
    assert out.visibility[0, -1, 1] > 0.9


def test_track_grid_and_name():
    tracker = LucasKanadeTracker()
    assert tracker.name == "lucas-kanade"
    frames = torch.rand(1, 4, 3, 64, 72, generator=torch.Generator().manual_seed(0)) * 255
    out = tracker.track_grid(frames, grid_size=5)
    assert out.tracks.shape == (1, 4, 25, 2)
    assert torch.isfinite(out.tracks).all()
    assert ((out.visibility >= 0) & (out.visibility <= 1)).all()


@pytest.mark.parametrize("kwargs", [dict(window=20), dict(window=1), dict(levels=-1), dict(iters=0),
                                    dict(fb_threshold=0.0), dict(grid_rule="nope")])
def test_bad_constructor_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        LucasKanadeTracker(**kwargs)


def test_bad_inputs_raise():
    tracker = LucasKanadeTracker(window=7, levels=0)
    frames = torch.rand(2, 4, 3, 32, 32) * 255
    with pytest.raises(ValueError, match="frames"):
        tracker(frames[:, :, :1], torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="queries"):
        tracker(frames, torch.zeros(1, 3, 3))
    with pytest.raises(TypeError, match="float"):
        tracker(frames.to(torch.uint8), torch.zeros(2, 3, 3))


def test_pyramid_and_gradients_match_opencv():
    """build_pyramid reproduces cv2.pyrDown (float input) level by level and cv2.Scharr / 32 with reflect-101 borders,
    and stops where OpenCV does (a level must be larger than the window)."""
    rng = np.random.default_rng(7)
    grey = rng.uniform(0, 255, (2, 1, 101, 75)).astype(np.float32)
    tracker = LucasKanadeTracker(window=11, levels=5)
    images, grads = tracker.build_pyramid(torch.from_numpy(grey))
    assert len(images) == len(grads) == tracker.num_levels(101, 75) == 3  # 101x75 -> 51x38 -> 26x19; 13x10 < 11
    for b in range(2):
        expected = grey[b, 0]
        for level, (image, grad) in enumerate(zip(images, grads)):
            if level > 0:
                expected = cv2.pyrDown(expected)
            np.testing.assert_allclose(image[b, 0].numpy(), expected, rtol=0, atol=1e-3)
            for channel, (dx, dy) in enumerate([(1, 0), (0, 1)]):
                scharr = cv2.Scharr(expected, cv2.CV_32F, dx, dy, borderType=cv2.BORDER_REFLECT_101) / 32.0
                np.testing.assert_allclose(grad[b, channel].numpy(), scharr, rtol=0, atol=1e-3)


@pytest.mark.gpu
def test_cpu_and_gpu_agree():
    """The same code on CUDA, TF32 allowed as the trainer allows it: tracks of well-textured points agree to 1e-3 px
    at the median and 0.02 px at worst (a float rounding can move one convergence test by an iteration, and an
    iteration stops below eps = 0.01 px)."""
    height, width, num_frames = 129, 161, 6
    clips = np.stack([warped_uint8_clip(height, width, num_frames, seed) for seed in (21, 22, 23)])
    frames = torch.from_numpy(clips).float().unsqueeze(2).expand(-1, -1, 3, -1, -1).contiguous()
    rng = np.random.default_rng(6)
    points = np.stack([rng.uniform(15, width - 16, (3, 50)), rng.uniform(15, height - 16, (3, 50))], -1)
    queries = make_queries(points, rng.integers(0, num_frames, (3, 50)))
    tracker = LucasKanadeTracker()
    cpu = tracker(frames, queries)
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        gpu = tracker.cuda()(frames.cuda(), queries.cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
    assert gpu.tracks.is_cuda and gpu.visibility.is_cuda
    reliable = (cpu.visibility > 0.5) & (gpu.visibility.cpu() > 0.5)
    assert reliable.float().mean() > 0.8
    error = (gpu.tracks.cpu() - cpu.tracks).norm(dim=-1)[reliable]
    assert error.median() < 1e-3 and error.max() < 0.02, (error.median(), error.max())
    assert (gpu.visibility.cpu() - cpu.visibility).abs()[reliable].median() < 1e-2
