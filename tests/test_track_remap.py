"""Stored whole-frame tracks remapped to augmented clips (trackmae_stream.tracks.remap).

Three independent checks: the coordinate maps against the pixels `crop_resize_flip` really produces; the remap on
motion fields where bilinear interpolation of displacements is exact (affine); and the remap's own error on the
synthetic set, tracker-free: a store filled with ground-truth tracks against the ground-truth tracks of the clip.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from test_data_helpers import bilinear_sample
from torch import Tensor

from trackmae_stream.data.dataset import draw_crop_and_flip
from trackmae_stream.data.synthetic import (
    ClipMotion,
    _topmost_cover,
    compute_tracks,
    ensure_synthetic_dataset,
    load_motion,
)
from trackmae_stream.data.transforms import DEFAULT_SCALES, CropBox, crop_resize_flip
from trackmae_stream.kernels.motion import motion_targets_torch
from trackmae_stream.tracking.base import query_grid
from trackmae_stream.tracks.remap import (
    clip_to_source,
    pixels_to_unit,
    remap_to_clip,
    remap_tracks,
    source_to_clip,
    store_query_points,
    unit_to_pixels,
)
from trackmae_stream.tracks.windows import stored_frame_positions, window_frame_indices


def random_geometry(rng: np.random.Generator, batch: int, input_size: int,
                    sizes: tuple[tuple[int, int], ...] = ((97, 71), (64, 48), (320, 240), (128, 128))):
    """Random (crop_box, flipped, source_size) tensors: boxes of any shape inside frames of odd and even sizes."""
    boxes, flips, source = [], [], []
    for _ in range(batch):
        width, height = sizes[int(rng.integers(len(sizes)))]
        w, h = int(rng.integers(8, width + 1)), int(rng.integers(8, height + 1))
        boxes.append((int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h))
        flips.append(bool(rng.random() < 0.5))
        source.append((width, height))
    return torch.tensor(boxes), torch.tensor(flips), torch.tensor(source)


# ------------------------------------------------------------------------------------------------ coordinate maps

def test_store_query_points_are_the_patch_centred_grid_of_the_stored_frame():
    points = store_query_points(5)
    assert points.shape == (25, 2) and points.dtype == torch.float32
    np.testing.assert_allclose(points[:5, 0].numpy(), (np.arange(5) + 0.5) / 5, rtol=0, atol=1e-7)
    assert torch.all(points[:5, 1] == points[0, 1])  # row-major, v outer
    for size in (256, 200):
        np.testing.assert_allclose(unit_to_pixels(store_query_points(28), size, size).numpy(),
                                   query_grid(28, size, size, "patch_centred").numpy(), rtol=0, atol=1e-4)


def test_clip_to_source_formula_and_inverse():
    """The documented formula at one point, and clip_to_source / source_to_clip inverse to each other (float64)."""
    box, flip, size = torch.tensor([[10, 4, 30, 20]]), torch.tensor([True]), torch.tensor([[64, 48]])
    point = torch.tensor([[3.0, 5.0]], dtype=torch.float64)
    mirrored = 15 - 1 - 3.0
    expected_x = 10 + (mirrored + 0.5) * 30 / 15 - 0.5
    expected_y = 4 + (5 + 0.5) * 20 / 15 - 0.5
    source = unit_to_pixels(clip_to_source(point, box, flip, size, 15), 64, 48)
    np.testing.assert_allclose(source[0, 0].numpy(), [expected_x, expected_y], rtol=0, atol=1e-12)

    rng = np.random.default_rng(0)
    box, flip, size = random_geometry(rng, 16, 37)
    clip_points = torch.from_numpy(rng.uniform(-5, 42, size=(16, 50, 2)))
    there = clip_to_source(clip_points, box, flip, size, 37)
    assert there.shape == (16, 50, 2) and there.dtype == torch.float64
    np.testing.assert_allclose(source_to_clip(there, box, flip, size, 37).numpy(), clip_points.numpy(), rtol=0,
                               atol=1e-10)
    unit_points = torch.from_numpy(rng.uniform(-0.1, 1.1, size=(50, 2)))  # (N, 2): shared by every clip
    back = clip_to_source(source_to_clip(unit_points, box, flip, size, 37), box, flip, size, 37)
    np.testing.assert_allclose(back.numpy(), unit_points.expand(16, -1, -1).numpy(), rtol=0, atol=1e-12)
    assert clip_to_source(clip_points.float(), box, flip, size, 37).dtype == torch.float32


def smooth_image(rng: np.random.Generator, width: int, height: int, wavelength: float = 28.0) -> np.ndarray:
    """uint8 (H, W, 3): per channel 127.5 + 40 x a sum of three plane waves of the given wavelength (slopes up to
    ~27 levels per pixel, so a quarter-pixel error moves values by several levels)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for _ in range(3):
        field = np.zeros_like(xx)
        for _ in range(3):
            angle, phase = rng.uniform(0, 2 * math.pi, size=2)
            field += np.sin(2 * math.pi * (math.cos(angle) * xx + math.sin(angle) * yy) / wavelength + phase)
        channels.append(127.5 + 40.0 * field)
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", range(6))
def test_coordinate_maps_agree_with_crop_resize_flip_pixels(seed):
    """The geometry against the pixels of the real augmentation (97 x 71 source, odd clip sizes up and down, flips).

    1. Every clip pixel equals the crop bilinearly sampled at unit_to_pixels(clip_to_source(pixel)) within 1.0 grey
       level (measured <= 0.76: cv2's fixed-point weights and uint8 rounding); the same with a quarter-pixel offset,
       or without undoing the mirror, misses by > 4 levels (measured 4.3 - 7.0).
    2. Forward: the clip sampled bilinearly at source_to_clip(p) equals the source at p (2,000 random points inside
       the crop) within 3.5 levels (measured <= 2.6: interpolation of an interpolated smooth field); half a pixel
       of offset misses by > 8 (measured 8.1 - 12.9).
    """
    rng = np.random.default_rng(seed)
    width, height = 97, 71
    size = (45, 61, 119)[seed % 3]
    image = smooth_image(rng, width, height)
    w, h = int(rng.integers(20, width + 1)), int(rng.integers(20, height + 1))
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    flip = bool(seed % 2)
    clip = crop_resize_flip(image[None], CropBox(x, y, w, h), size, flip=flip)[0].astype(np.float64)
    box, flipped, source = torch.tensor([[x, y, w, h]]), torch.tensor([flip]), torch.tensor([[width, height]])

    rows, cols = np.mgrid[0:size, 0:size]
    pixels = torch.from_numpy(np.stack([cols.ravel(), rows.ravel()], axis=-1).astype(np.float64))
    in_crop = unit_to_pixels(clip_to_source(pixels, box, flipped, source, size)[0], width, height).numpy() - [x, y]
    crop = image[y:y + h, x:x + w]  # the resize clamps at the crop's edge, not the frame's
    clip_values = clip.reshape(-1, 3)
    assert np.abs(bilinear_sample(crop, in_crop) - clip_values).max() <= 1.0
    assert np.abs(bilinear_sample(crop, in_crop + [0.25, 0.0]) - clip_values).max() > 4.0
    if flip:
        unmirrored = unit_to_pixels(clip_to_source(pixels, box, ~flipped, source, size)[0], width, height).numpy()
        assert np.abs(bilinear_sample(crop, unmirrored - [x, y]) - clip_values).max() > 4.0

    points = np.stack([rng.uniform(x, x + w - 1, 2000), rng.uniform(y, y + h - 1, 2000)], axis=-1)
    in_clip = source_to_clip(pixels_to_unit(torch.from_numpy(points), width, height), box, flipped, source,
                             size)[0].numpy()
    inside = np.all((in_clip >= 0) & (in_clip <= size - 1), axis=-1)
    assert inside.mean() > 0.95
    truth = bilinear_sample(image, points[inside])
    assert np.abs(bilinear_sample(clip, in_clip[inside]) - truth).max() <= 3.5
    offset = [0.5 * size / w, 0.0]  # half a source pixel, in clip pixels
    assert np.abs(bilinear_sample(clip, in_clip[inside] + offset) - truth).max() > 8.0


# ----------------------------------------------------------------------------------- remap on exact motion fields

def affine_store(rng: np.random.Generator, batch: int, frames: int, grid: int, dtype=torch.float32):
    """Stored tracks of the grid under per-clip affine motion x(t) = A(t) x + b(t), A(0) = I, b(0) = 0, and a
    function giving the exact tracks of any frame-0 points (B, N, 2)."""
    a = np.eye(2) + rng.normal(0, 0.05, size=(batch, frames, 2, 2))
    b = rng.normal(0, 0.05, size=(batch, frames, 2))
    a[:, 0], b[:, 0] = np.eye(2), 0.0
    a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)

    def exact(points: Tensor) -> Tensor:
        return torch.einsum("btij,bnj->btni", a_t, points.double()) + b_t[:, :, None]

    return exact(exact_grid(grid).expand(batch, -1, -1)).to(dtype), exact


def exact_grid(grid: int) -> Tensor:
    """`store_query_points` in float64 (the float32 grid is off by up to 3e-8)."""
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([u, v], dim=-1).reshape(-1, 2)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_remap_is_exact_for_affine_motion_inside_the_hull(dtype, tolerance):
    """Rigid motion, zoom, shear: displacements affine in the frame-0 position are reproduced exactly (B = 3)."""
    rng = np.random.default_rng(1)
    grid = 9
    stored, exact = affine_store(rng, 3, 5, grid, dtype)
    hull = (0.5 / grid, 1 - 0.5 / grid)
    queries = torch.from_numpy(rng.uniform(*hull, size=(3, 200, 2))).to(dtype)
    tracks, vis = remap_tracks(stored, torch.ones(stored.shape[:3]), grid, queries)
    assert tracks.shape == (3, 5, 200, 2) and tracks.dtype == dtype and vis.shape == (3, 5, 200)
    assert (tracks - exact(queries)).abs().max() < tolerance
    assert torch.equal(tracks[:, 0], queries)  # the query frame returns the query itself
    assert torch.all(vis == 1)


def test_border_rule_takes_the_clamped_displacement():
    """Outside the hull (the last half grid step at the frame's edge) a query moves like its per-axis clamped
    position on the hull; a pure translation is therefore exact everywhere."""
    rng = np.random.default_rng(2)
    grid = 6
    stored, exact = affine_store(rng, 2, 4, grid, torch.float64)
    queries = torch.from_numpy(rng.uniform(-0.05, 1.05, size=(2, 300, 2)))
    clamped = queries.clamp(0.5 / grid, 1 - 0.5 / grid)
    tracks, _ = remap_tracks(stored, torch.ones(stored.shape[:3]), grid, queries)
    expected = queries[:, None] + exact(clamped) - clamped[:, None]
    assert (tracks - expected).abs().max() < 1e-12

    shift = torch.from_numpy(rng.normal(0, 0.1, size=(2, 4, 1, 2)))
    shift[:, 0] = 0
    translated = exact_grid(grid) + shift
    tracks, _ = remap_tracks(translated, torch.ones(translated.shape[:3]), grid, queries)
    assert (tracks - (queries[:, None] + shift)).abs().max() < 1e-12


def test_displacements_not_positions_are_interpolated():
    """A tracker whose frame-0 output is off its query (jitter) still gives track(0) = q and the right motion."""
    grid = 4
    points = store_query_points(grid).double()
    jitter = torch.randn(grid * grid, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e-3
    stored = torch.stack([points + jitter, points + jitter + torch.tensor([0.1, -0.05], dtype=torch.float64)])[None]
    queries = torch.rand(1, 30, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tracks, _ = remap_tracks(stored, torch.ones(1, 2, grid * grid), grid, queries)
    assert torch.equal(tracks[:, 0], queries)
    assert (tracks[:, 1] - queries - torch.tensor([0.1, -0.05], dtype=torch.float64)).abs().max() < 1e-12


def test_visibility_is_the_min_over_contributing_stencil_points():
    """Grid 4 (points at exact binary fractions, so zero weights are exactly zero)."""
    grid = 4
    stored = store_query_points(grid)[None, None].expand(1, 2, -1, -1).clone()
    vis = torch.ones(1, 2, grid * grid)
    vis[0, 1, 1 * grid + 1] = 0.2  # point (column 1, row 1) = (0.375, 0.375) is hidden at frame 1
    vis[0, 1, 0] = 0.6  # the top-left corner point (0.125, 0.125)
    q = torch.tensor([[0.375, 0.375],  # on the hidden point itself
                      [0.5, 0.25],  # the middle of a cell whose corners include it
                      [0.125, 0.5],  # on the edge between column 0's points: the hidden one has weight 0
                      [0.625, 0.375],  # on the neighbouring point (2, 1)
                      [0.02, 0.03],  # outside the hull at the top-left: clamped onto the corner point
                      [0.9, 0.9],  # outside the hull at the bottom-right
                      [0.875, 0.875]])[None]  # on the last point (the last cell's far corner)
    _, visibility = remap_tracks(stored, vis, grid, q)
    np.testing.assert_array_equal(visibility[0, 1].numpy(), np.float32([0.2, 0.2, 1.0, 1.0, 0.6, 1.0, 1.0]))
    assert torch.all(visibility[0, 0] == 1)


def test_remap_to_clip_is_the_composition_of_the_maps():
    """remap_to_clip == source_to_clip(remap_tracks(clip_to_source(.))) (float64, any smooth stored motion, a batch
    of different crops), and a batch equals its clips one by one."""
    rng = np.random.default_rng(3)
    batch, frames, grid, size = 5, 4, 12, 56
    box, flip, source = random_geometry(rng, batch, size)
    base = store_query_points(grid).double()
    wave = 0.02 * torch.sin(6.0 * base.flip(-1))  # a smooth non-affine field
    steps = torch.arange(frames, dtype=torch.float64)[None, :, None, None]
    stored = base + steps * (wave + torch.from_numpy(rng.normal(0, 0.01, size=(batch, 1, 1, 2))))
    stored_vis = torch.from_numpy(rng.uniform(0.3, 1.0, size=(batch, frames, grid * grid)))
    queries = query_grid(7, size, size, "cotracker").double()
    tracks, vis = remap_to_clip(stored, stored_vis, grid, queries, box, flip, source, size)
    assert tracks.shape == (batch, frames, 49, 2) and vis.shape == (batch, frames, 49)

    unit_tracks, unit_vis = remap_tracks(stored, stored_vis, grid, clip_to_source(queries, box, flip, source, size))
    composed = source_to_clip(unit_tracks.reshape(batch, -1, 2), box, flip, source, size).reshape(tracks.shape)
    assert (tracks - composed).abs().max() < 1e-9
    assert torch.equal(tracks[:, 0], queries.expand(batch, -1, -1))
    inside = ((composed >= -0.5) & (composed <= size - 0.5)).all(-1)
    assert torch.equal(vis, unit_vis * inside)
    no_crop_rule = remap_to_clip(stored, stored_vis, grid, queries, box, flip, source, size, crop_visibility=False)
    assert torch.equal(no_crop_rule[1], unit_vis)

    for i in range(batch):
        one = remap_to_clip(stored[i:i + 1].float(), stored_vis[i:i + 1].float(), grid, queries.float(),
                            box[i:i + 1], flip[i:i + 1], source[i:i + 1], size)
        assert (one[0][0] - tracks[i]).abs().max() < 1e-3 and (one[1][0] - vis[i]).abs().max() < 1e-6


def test_identity_crop_returns_the_stored_tracks():
    """Crop = the whole frame at its own size, clip grid = the stored grid: the stored tracks in pixels (and their
    mirror image when flipped)."""
    grid, size = 8, 64
    rng = np.random.default_rng(4)
    stored = (store_query_points(grid).double() + torch.from_numpy(rng.normal(0, 0.02, size=(1, 3, grid * grid, 2))))
    stored[:, 0] = store_query_points(grid).double()
    vis = torch.ones(1, 3, grid * grid)
    queries = query_grid(grid, size, size, "patch_centred").double()
    box, source = torch.tensor([[0, 0, size, size]]), torch.tensor([[size, size]])
    tracks, _ = remap_to_clip(stored, vis, grid, queries, box, torch.tensor([False]), source, size,
                              crop_visibility=False)
    assert (tracks[0] - unit_to_pixels(stored[0], size, size)).abs().max() < 1e-9
    mirrored, _ = remap_to_clip(stored, vis, grid, queries, box, torch.tensor([True]), source, size,
                                crop_visibility=False)
    # clip column j shows source column G-1-j, and a source x shows at size - 1 - x
    expected = unit_to_pixels(stored[0], size, size).reshape(3, grid, grid, 2).flip(2).reshape(3, -1, 2)
    expected[..., 0] = size - 1 - expected[..., 0]
    assert (mirrored[0] - expected).abs().max() < 1e-9


def test_argument_checks():
    stored, vis = torch.zeros(1, 2, 16, 2), torch.ones(1, 2, 16)
    with pytest.raises(ValueError, match="store_grid"):
        remap_tracks(stored, vis, 5, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="stored_vis"):
        remap_tracks(stored, vis[:, :1], 4, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="queries"):
        remap_tracks(stored, vis, 4, torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="crop_box"):
        clip_to_source(torch.zeros(3, 2), torch.zeros(1, 3), torch.zeros(1, dtype=torch.bool), torch.ones(1, 2), 8)


# ---------------------------------------------------------------- the remap's own error on the synthetic set

NUM_FRAMES, SAMPLING_RATE, TUBELET, WINDOWS, INPUT_SIZE, CLIP_GRID, REPEATS = 16, 2, 2, 4, 112, 7, 3
STORE_GRIDS = (14, 28, 56)


def shifted_motion(motion: ClipMotion, start: int) -> ClipMotion:
    """The same scene with frame `start` as frame 0: ground truth for points queried at a window's first frame.

    camera'(t) = camera(t + s) (origin camera(s), wobble phase advanced) and object poses advanced by s."""
    phase = motion.camera_wobble_phase + 2 * math.pi * start / motion.camera_wobble_period
    return dataclasses.replace(
        motion, num_frames=motion.num_frames - start, camera_origin=motion.camera(np.array([start]))[0],
        camera_wobble_phase=phase, object_centre=motion.object_centre + motion.object_velocity * start,
        object_angle=motion.object_angle + motion.object_angular_velocity * start)


def frame0_owner(motion: ClipMotion, points: np.ndarray) -> np.ndarray:
    """(P,) surface each frame-0 point lies on (-1: background, k: object k)."""
    centres, angles = motion.object_poses(np.array([0]))
    return _topmost_cover(points[None], centres, angles, motion)[0]


def single_surface(unit_queries: np.ndarray, query_owner: np.ndarray, grid_owner: np.ndarray, grid: int):
    """Whether every stencil point with a nonzero weight lies on the query's own surface, and the query lies inside
    the grid's hull: where the remap must be exact (rigid surfaces move affinely). numpy, independent of the module."""
    g = unit_queries * grid - 0.5
    in_hull = np.all((g >= 0) & (g <= grid - 1), axis=-1)
    g = np.clip(g, 0, grid - 1)
    low = np.minimum(np.floor(g), grid - 2).astype(np.int64)
    w = g - low
    same = np.ones(len(unit_queries), dtype=bool)
    for a in (0, 1):
        for b in (0, 1):
            weight = (w[:, 0] if a else 1 - w[:, 0]) * (w[:, 1] if b else 1 - w[:, 1])
            owner = grid_owner.reshape(grid, grid)[low[:, 1] + b, low[:, 0] + a]
            same &= (weight == 0) | (owner == query_owner)
    return same & in_hull


@pytest.fixture(scope="module")
def synthetic_remaps(tmp_path_factory):
    """For each store grid: 4 videos x 4 windows x 3 augmentations (draw_crop_and_flip, flips on) of 16 frames at
    rate 2, 112 px clips (the embedded default), the default 7 x 7 `cotracker` clip grid, stored every 2nd frame.
    (a) ground truth of the clip: clip query -> clip_to_source -> exact tracks -> source_to_clip, visible when the
    ground truth is and inside the clip; (c) remap_to_clip of a store filled with exact tracks of the G x G grid."""
    # the legacy task: 2-3 objects (the bounds below were measured there; the motion task's 4-6 tiling objects put
    # more stencils across two surfaces)
    dataset = ensure_synthetic_dataset(tmp_path_factory.mktemp("remap") / "set", num_videos=4, size=128,
                                       num_frames=40, seed=0, task="legacy")
    side = dataset.size
    size_t = torch.tensor([[side, side]])
    clip_queries = query_grid(CLIP_GRID, INPUT_SIZE, INPUT_SIZE, "cotracker").double()
    positions = stored_frame_positions(NUM_FRAMES, TUBELET)
    results = {grid: {"truth": [], "truth_vis": [], "store": [], "store_vis": [], "single": []}
               for grid in STORE_GRIDS}
    for number, video in enumerate(dataset.videos):
        motion = load_motion(video)
        for window in range(WINDOWS):
            frames = window_frame_indices(motion.num_frames, NUM_FRAMES, SAMPLING_RATE, WINDOWS, window)
            start = int(frames[0])
            scene = shifted_motion(motion, start)
            times = np.arange(scene.num_frames)
            np.testing.assert_allclose(scene.camera(times), motion.camera(times + start), atol=1e-9)
            np.testing.assert_allclose(scene.object_poses(times)[1], motion.object_poses(times + start)[1],
                                       atol=1e-12)
            stored_times = frames[positions] - start
            for repeat in range(REPEATS):
                box, flip = draw_crop_and_flip(side, side, INPUT_SIZE, seed=0, epoch=0, index=number, attempt=window,
                                               repeat=repeat, scales=DEFAULT_SCALES, max_distort=1, fix_crop=True,
                                               more_fix_crop=True, flip=True)
                box_t, flip_t = torch.tensor([[box.x, box.y, box.width, box.height]]), torch.tensor([flip])
                unit_queries = clip_to_source(clip_queries, box_t, flip_t, size_t, INPUT_SIZE)[0]
                source_queries = unit_to_pixels(unit_queries, side, side).numpy()
                exact, visible = compute_tracks(scene, source_queries)
                truth = source_to_clip(pixels_to_unit(torch.from_numpy(exact[stored_times]).double(), side, side)
                                       .reshape(1, -1, 2), box_t, flip_t, size_t, INPUT_SIZE)
                truth = truth.reshape(len(positions), -1, 2)
                truth_vis = visible[stored_times] & np.all((truth.numpy() >= -0.5)
                                                           & (truth.numpy() <= INPUT_SIZE - 0.5), axis=-1)
                query_owner = frame0_owner(scene, source_queries)
                for grid in STORE_GRIDS:
                    grid_pixels = unit_to_pixels(store_query_points(grid).double(), side, side).numpy()
                    grid_tracks, grid_vis = compute_tracks(scene, grid_pixels)
                    stored = pixels_to_unit(torch.from_numpy(grid_tracks[stored_times]), side, side)[None]
                    stored_vis = torch.from_numpy(grid_vis[stored_times]).float()[None]
                    tracks, vis = remap_to_clip(stored, stored_vis, grid, clip_queries.float(), box_t, flip_t,
                                                size_t, INPUT_SIZE)
                    out = results[grid]
                    out["truth"].append(truth.float())
                    out["truth_vis"].append(truth_vis)
                    out["store"].append(tracks[0])
                    out["store_vis"].append(vis[0].numpy() > 0.5)
                    out["single"].append(single_surface(unit_queries.numpy(), query_owner,
                                                        frame0_owner(scene, grid_pixels), grid))
    return {grid: {key: (torch.stack(v) if key in ("truth", "store") else np.stack(v)) for key, v in out.items()}
            for grid, out in results.items()}


def end_point_errors(result: dict) -> tuple[np.ndarray, np.ndarray]:
    """Errors (clip pixels) at ground-truth-visible (clip, frame, point) triples, and the single-surface flag."""
    error = (result["store"] - result["truth"]).norm(dim=-1).numpy()
    visible = result["truth_vis"]
    single = np.broadcast_to(result["single"][:, None], visible.shape)
    return error[visible], single[visible]


def test_store_of_ground_truth_is_exact_on_rigid_stencils(synthetic_remaps):
    """Where the query and every stencil point it takes a share from lie on one surface (rigid: background
    translation or an object's rotation + translation, affine in the frame-0 position) and inside the hull, the
    remap reproduces the ground truth of the clip: max error < 1e-3 px (measured ~1e-5, float32 rounding)."""
    for grid in STORE_GRIDS:
        error, single = end_point_errors(synthetic_remaps[grid])
        assert single.mean() > 0.5
        assert error[single].max() < 1e-3, (grid, error[single].max())


def test_store_of_ground_truth_end_point_error(synthetic_remaps):
    """End-point error of store(ground truth) against the clip's ground truth, in clip pixels, over the visible
    (clip, stored frame, point) triples of the fixture (~14,000; 112 px clips of 128 px frames). Measured on the
    default synthetic set (the 8-direction motion task; in brackets the version-2 set of 4 directions x 2 senses):

        store_grid   median   p90              p99          max          mean          > 0.5 px       visibility
        14           1.9e-6   3.1    [3.5]     27.1 [23.3]  77.9 [96.4]  1.44 [1.33]   0.153 [0.169]  0.905 [0.895]
        28           9.5e-7   8.5e-6 [0.22]    21.8 [19.9]  68.8 [71.2]  0.75 [0.87]   0.067 [0.094]  0.950 [0.940]
        56           9.5e-7   7.6e-6 [8.5e-6]  15.3 [13.6]  56.3 [71.2]  0.43 [0.43]   0.038 [0.053]  0.965 [0.963]

    Exact almost everywhere (float32 rounding); the tail is the stencils that straddle two surfaces moving
    differently (an object over the panning background): the mix is off by up to their relative motion since the
    query frame, and the share of such points shrinks with the grid's density (the max does not: it is the relative
    motion itself). Bounds (with room for the generator's variants): median < 1e-3 px at every grid; at 28, p90 <
    1.5 px, mean < 2 px, share > 0.5 px below 0.15, visibility agreement > 0.9; mean and share fall by > 20% per
    doubling of the grid, and the visibility agreement rises.
    """
    stats = {}
    for grid in STORE_GRIDS:
        error, _ = end_point_errors(synthetic_remaps[grid])
        result = synthetic_remaps[grid]
        stats[grid] = (np.median(error), np.percentile(error, 90), error.mean(), (error > 0.5).mean(),
                       (result["store_vis"] == result["truth_vis"]).mean())
        print(f"store_grid {grid}: {error.size} points, median {np.median(error):.2g} p90 {stats[grid][1]:.2g} "
              f"p99 {np.percentile(error, 99):.3g} max {error.max():.3g} mean {stats[grid][2]:.3g} "
              f"> 0.5 px {stats[grid][3]:.3f} visibility agrees {stats[grid][4]:.3f}")
        assert stats[grid][0] < 1e-3, (grid, stats[grid])
    assert stats[28][1] < 1.5 and stats[28][2] < 2.0 and stats[28][3] < 0.15 and stats[28][4] > 0.9, stats[28]
    for coarse, fine in ((14, 28), (28, 56)):
        assert stats[fine][2] < 0.8 * stats[coarse][2], stats  # mean error
        assert stats[fine][3] < 0.8 * stats[coarse][3], stats  # share of points off by > 0.5 px
        assert stats[fine][4] > stats[coarse][4], stats


def relative_mse(reference: torch.Tensor, other: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """mean((other - reference)^2) / mean(reference^2), over `keep` when given."""
    if keep is not None:
        reference, other = reference[keep], other[keep]
    return float(((other - reference) ** 2).mean() / (reference ** 2).mean())


def test_store_of_ground_truth_motion_targets(synthetic_remaps):
    """Motion targets (kernels' definition, 7 x 7 tokens, υ = 2, 'frame' displacements) of store(ground truth)
    against those of the clip's ground truth, as relative MSE (mean squared difference / mean square of the
    ground-truth target). Measured:

        store_grid   'none'          'patch' (all)   'patch' (deforming)   binning statistic
        14           0.065 [0.068]   0.52 [0.60]     0.21 [0.30]           0.083 [0.063]
        28           0.035 [0.040]   0.31 [0.41]     0.10 [0.19]           0.045 [0.033]
        56           0.016 [0.020]   0.22 [0.27]     0.056 [0.085]         0.022 [0.019]

    (default synthetic set; in brackets the version-2 set).
    'patch' over all tokens is dominated by the official definition's own flaw: a rigidly moving token's std is
    float rounding, which 1/(std + 1e-6) blows up into O(1) noise on both sides alike; over the (token, slot,
    coordinate) groups whose ground-truth std exceeds 0.05 px ('deforming') the comparison measures the remap.
    Bounds at 28: 'none' and the statistic < 0.08, 'patch' < 0.6, 'patch' (deforming) < 0.3; every measure falls
    as the grid densifies.
    """
    stats = {}
    tokens = INPUT_SIZE // 16
    for grid in STORE_GRIDS:
        result = synthetic_remaps[grid]
        truth, store = result["truth"], result["store"]
        raw_truth, stat_truth = motion_targets_torch(truth, tokens_side=tokens, norm="none")
        raw_store, stat_store = motion_targets_torch(store, tokens_side=tokens, norm="none")
        patch_truth, _ = motion_targets_torch(truth, tokens_side=tokens, norm="patch")
        patch_store, _ = motion_targets_torch(store, tokens_side=tokens, norm="patch")
        per_point = raw_truth.reshape(*raw_truth.shape[:2], -1, 2)
        deforming = (per_point.std(dim=2, keepdim=True) > 0.05).expand_as(per_point).reshape(raw_truth.shape)
        stats[grid] = (relative_mse(raw_truth, raw_store), relative_mse(patch_truth, patch_store),
                       relative_mse(patch_truth, patch_store, deforming), relative_mse(stat_truth, stat_store))
    print("relative MSE (none, patch, patch deforming, statistic):", stats)
    assert stats[28][0] < 0.08 and stats[28][1] < 0.6 and stats[28][2] < 0.3 and stats[28][3] < 0.08, stats[28]
    for coarse, fine in ((14, 28), (28, 56)):
        assert all(f < c for f, c in zip(stats[fine], stats[coarse])), stats
