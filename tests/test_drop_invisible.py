"""target.drop_invisible: motion targets, their validity and the binning statistic over the tracker's visible points
only, against a float64 brute-force loop; exactly the official values when everything is visible; an occluded
1000-px jump changes neither the loss nor the masks with the option on (and does with it off); the masked loss; the
batch preparer end to end with a scripted tracker."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_targets_motion import CASES, random_tracks  # the twins' shapes and tracks, shared
from torch import Tensor

from trackmae_stream import kernels
from trackmae_stream.config import load_config
from trackmae_stream.engine import compute_losses
from trackmae_stream.kernels import _triton as triton_support
from trackmae_stream.kernels.masking import motion_bin_order_torch
from trackmae_stream.pipeline import TrainBatch, build_batch_preparer
from trackmae_stream.targets import TargetBuilder
from trackmae_stream.tracking import PointTracker, TrackerOutput

needs_triton = pytest.mark.skipif(not triton_support.HAS_TRITON, reason="triton does not import")

THRESHOLD = 0.5


def random_visibility(batch: int, frames: int, grid: int, seed: int, hidden: float) -> Tensor:
    """Visibility in [0, 1], below the threshold with probability `hidden`; a few values exactly at the threshold
    (visible) and a NaN (invisible) on the way."""
    gen = torch.Generator().manual_seed(seed)
    vis = torch.rand(batch, frames, grid * grid, generator=gen) * 0.5 + 0.5
    low = torch.rand(batch, frames, grid * grid, generator=gen) < hidden
    vis = torch.where(low, torch.rand(batch, frames, grid * grid, generator=gen) * 0.499, vis)
    vis.view(-1)[::7] = THRESHOLD
    vis.view(-1)[3] = float("nan")
    return vis


# ----------------------------------------------------------------------------------- float64 brute-force definition


def stencil(index: int, grid: int, side: int) -> list[int]:
    """Raw rows (or columns) with a nonzero weight in the align_corners=True interpolation of upsampled row `index`:
    torch's float32 source position scale * index, scale = float32(G - 1) / float32(side - 1)."""
    if side == grid:
        return [index]
    src = np.float32(index) * (np.float32(grid - 1) / np.float32(side - 1))
    low = min(int(np.floor(src)), grid - 1)
    return [low] if src == low or low == grid - 1 else [low, low + 1]


def brute_force(tracks: np.ndarray, vis: np.ndarray, tokens_side: int, upsample: int, displacement: str, norm: str,
                eps: float, safe_eps: float, threshold: float) -> tuple[np.ndarray, ...]:
    """(targets, valid, token_stat, scale) as plain loops in float64: per token, per point, per step; `scale` is
    each value's normalisation divisor (1 without), to compare float32 results in pixels."""
    batch, frames, points, _ = tracks.shape
    grid = int(round(points ** 0.5))
    side = grid * upsample
    s = side // tokens_side
    pool = grid // tokens_side
    pos = tracks.astype(np.float64).reshape(batch, frames, grid, grid, 2)
    seen = np.nan_to_num(vis.astype(np.float64), nan=-1.0).reshape(batch, frames, grid, grid) >= threshold

    def sample(b, f, row, col):
        if upsample == 1:
            return pos[b, f, row, col]
        sy, sx = row * (grid - 1) / (side - 1), col * (grid - 1) / (side - 1)
        y0, x0 = min(int(sy), grid - 1), min(int(sx), grid - 1)
        y1, x1 = min(y0 + 1, grid - 1), min(x0 + 1, grid - 1)
        wy, wx = sy - y0, sx - x0
        return ((1 - wy) * ((1 - wx) * pos[b, f, y0, x0] + wx * pos[b, f, y0, x1])
                + wy * ((1 - wx) * pos[b, f, y1, x0] + wx * pos[b, f, y1, x1]))

    def visible(b, f, row, col):
        return all(seen[b, f, y, x] for y in stencil(row, grid, side) for x in stencil(col, grid, side))

    targets = np.zeros((batch, frames * tokens_side ** 2, 2 * s * s))
    valid = np.zeros(targets.shape, dtype=bool)
    scales = np.ones(targets.shape)
    for b, t, i, j in itertools.product(range(batch), range(frames), range(tokens_side), range(tokens_side)):
        k = min(t, frames - 2)
        start = 0 if displacement == "first" else k
        values, ok, scale = np.zeros((s * s, 2)), np.zeros(s * s, dtype=bool), np.ones(2)
        for r, q in itertools.product(range(s), range(s)):
            row, col = i * s + r, j * s + q
            values[r * s + q] = sample(b, k + 1, row, col) - sample(b, start, row, col)
            ok[r * s + q] = visible(b, start, row, col) and visible(b, k + 1, row, col)
        if norm != "none":
            if ok.sum() < 2:
                ok[:] = False
            else:
                kept = values[ok]
                mean = kept.mean(axis=0)
                var = ((kept - mean) ** 2).sum(axis=0) / (len(kept) - 1)
                scale = np.sqrt(var) + eps if norm == "patch" else np.sqrt(var + safe_eps ** 2)
                values = (values - mean) / scale
        values[~ok] = 0.0
        n = (t * tokens_side + i) * tokens_side + j
        targets[b, n] = values.reshape(-1)  # index 2*p + c
        valid[b, n] = np.repeat(ok, 2)
        scales[b, n] = np.tile(scale, s * s)

    stat = np.zeros((batch, tokens_side ** 2))
    for b, i, j in itertools.product(range(batch), range(tokens_side), range(tokens_side)):
        total, count = 0.0, 0
        for a, c, k in itertools.product(range(pool), range(pool), range(frames - 1)):
            y, x = i * pool + a, j * pool + c
            if seen[b, k, y, x] and seen[b, k + 1, y, x]:
                total += np.linalg.norm(pos[b, k + 1, y, x] - pos[b, k, y, x])
                count += 1
        stat[b, i * tokens_side + j] = total / count if count else 0.0
    return targets, valid, stat, scales


@pytest.mark.parametrize("shape,option", CASES)
def test_targets_validity_and_statistic_match_brute_force(shape, option):
    batch, frames, grid, upsample, tokens_side = shape
    displacement, norm = option
    tracks = random_tracks(batch, frames, grid, seed=sum(shape))
    vis = random_visibility(batch, frames, grid, seed=3 * sum(shape), hidden=0.1)
    targets, stat, valid = kernels.motion_targets_visible(
        tracks, vis, tokens_side=tokens_side, upsample=upsample, displacement=displacement, norm=norm,
        safe_eps=0.3, visibility_threshold=THRESHOLD, backend="torch")
    expected_targets, expected_valid, expected_stat, scale = brute_force(
        tracks.numpy(), vis.numpy(), tokens_side, upsample, displacement, norm, 1e-6, 0.3, THRESHOLD)
    assert valid.dtype == torch.bool and torch.equal(valid, torch.from_numpy(expected_valid))
    # the draw exercises dropped values and partly valid tokens (fully valid ones: the all-visible test)
    per_token = valid.sum(dim=-1)
    assert bool((~valid).any())
    if valid.shape[-1] > 2:  # more than one point per token
        assert bool(((per_token > 0) & (per_token < valid.shape[-1])).any())
    assert bool((targets[~valid] == 0).all())
    # float32 rounding of the positions (~1e-5 px) is amplified by 1/std where a token keeps few valid points:
    # compare in pixels (as the official-vector tests do)
    expected = torch.from_numpy(expected_targets)
    in_pixels = (targets.double() - expected).abs() * torch.from_numpy(scale) / (1 + expected.abs())
    assert float(in_pixels.max()) <= 2e-5, float(in_pixels.max())
    torch.testing.assert_close(stat.double(), torch.from_numpy(expected_stat), rtol=1e-6, atol=1e-5)
    alone = kernels.motion_token_stat(tracks, tokens_side=tokens_side, visibility=vis,
                                      visibility_threshold=THRESHOLD)  # the stat-only path (no motion target)
    torch.testing.assert_close(alone, stat, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", ["patch", "patch_safe", "none"])
def test_a_token_with_fewer_than_two_valid_points_is_dropped_when_normalised(norm):
    """One token of 2x2 points (no upsampling): 1 valid point has no std (dropped under the per-token norms, kept
    raw under "none"); 2 valid points are normalised over those two only (+-1/sqrt(2) with "patch")."""
    tracks = random_tracks(1, 2, 2, seed=3)
    for visible_points, kept in ((1, norm == "none"), (2, True)):
        vis = torch.zeros(1, 2, 4)
        vis[:, :, :visible_points] = 1.0
        targets, _, valid = kernels.motion_targets_visible(tracks, vis, tokens_side=1, upsample=1, norm=norm,
                                                           backend="torch")
        assert valid[0, 0].tolist() == [kept] * 2 * visible_points + [False] * 2 * (4 - visible_points)
        assert bool((targets[~valid] == 0).all())
        if kept and norm != "none":  # two points: centred values +-d/2, unbiased std |d|/sqrt(2)
            pair = targets[0, 0, :4].reshape(2, 2)
            torch.testing.assert_close(pair[0], -pair[1])
            if norm == "patch":
                torch.testing.assert_close(pair[0].abs(), torch.full((2,), 2 ** -0.5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,option", CASES)
def test_all_visible_gives_exactly_the_official_values(shape, option):
    batch, frames, grid, upsample, tokens_side = shape
    displacement, norm = option
    tracks = random_tracks(batch, frames, grid, seed=5 * sum(shape))
    kwargs = dict(tokens_side=tokens_side, upsample=upsample, displacement=displacement, norm=norm, safe_eps=0.3)
    official, official_stat = kernels.motion_targets(tracks, backend="torch", **kwargs)
    for vis in (torch.ones(batch, frames, grid * grid), torch.full((batch, frames, grid * grid), THRESHOLD)):
        targets, stat, valid = kernels.motion_targets_visible(tracks, vis, visibility_threshold=THRESHOLD,
                                                              backend="torch", **kwargs)
        assert torch.equal(targets, official) and torch.equal(stat, official_stat) and bool(valid.all())
        alone = kernels.motion_token_stat(tracks, tokens_side=tokens_side, visibility=vis)
        assert torch.equal(alone, kernels.motion_token_stat(tracks, tokens_side=tokens_side))


@needs_triton
@pytest.mark.parametrize("norm", ["patch", "none"])
def test_triton_backend_gives_the_same_option(norm):
    """The option sits on top of either backend: all visible gives the kernel's own values; otherwise the same as
    the torch twin within the kernels' float tolerance."""
    tracks = random_tracks(2, 4, 6, seed=11)
    kwargs = dict(tokens_side=3, upsample=2, norm=norm)
    official, official_stat = kernels.motion_targets(tracks, backend="triton", **kwargs)
    targets, stat, valid = kernels.motion_targets_visible(tracks, torch.ones(2, 4, 36), backend="triton", **kwargs)
    assert torch.equal(targets, official) and torch.equal(stat, official_stat) and bool(valid.all())
    vis = random_visibility(2, 4, 6, seed=12, hidden=0.1)
    got = kernels.motion_targets_visible(tracks, vis, backend="triton", **kwargs)
    want = kernels.motion_targets_visible(tracks, vis, backend="torch", **kwargs)
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ an occluded jump


def motion_batch(targets: Tensor, valid: Tensor | None) -> TrainBatch:
    """A batch holding only motion targets, every token masked."""
    batch, tokens, _ = targets.shape
    idx = torch.arange(tokens).expand(batch, -1)
    return TrainBatch(patches=torch.zeros(batch, 0, 1), visible_idx=idx[:, :0], masked_idx=idx,
                      targets={"track_motion": targets}, skipped=None, source_index=None,
                      valid={} if valid is None else {"track_motion": valid})


def motion_losses(pred: Tensor, batch: TrainBatch, weight: float) -> dict[str, Tensor]:
    """The trainer's losses of a run whose only target is track_motion, with loss weight `weight`."""
    cfg = load_config("default", OVERRIDES + ["target.pixel=false", f"target.track_motion.weight={weight}"])
    return compute_losses({"track_motion": pred}, batch, TargetBuilder(cfg))


@pytest.mark.parametrize("norm", ["patch", "none"])
def test_an_occluded_jump_changes_neither_loss_nor_masks_with_the_option_on(norm):
    """A raw point hidden (visibility 0.05) from frame 2 on, jumping by 1000 px there, as Lucas-Kanade points on
    occluders do: with drop_invisible the loss and the bins are the same with or without the jump; off, both move."""
    batch, frames, grid, tokens_side = 1, 4, 6, 3
    clean = random_tracks(batch, frames, grid, seed=21)
    point = 2 * grid + 2  # raw (2, 2): inside token (1, 1), away from the grid border
    token = 1 * tokens_side + 1
    rows = [2, 2, 3, 3]
    cols = [2, 3, 2, 3]
    for r, c in zip(rows, cols):  # token (1, 1) nearly static: the lowest statistic of the clean clip
        clean[:, :, r * grid + c] = clean[:, :1, r * grid + c] + 0.01 * torch.arange(frames)[None, :, None]
    jumped = clean.clone()
    jumped[:, 2:, point, 0] += 1000.0
    vis = torch.ones(batch, frames, grid * grid)
    vis[:, 2:, point] = 0.05
    pred = torch.randn(batch, frames * tokens_side ** 2, 32, generator=torch.Generator().manual_seed(1))
    kwargs = dict(tokens_side=tokens_side, upsample=2, norm=norm, backend="torch")

    def losses_and_stat(tracks: Tensor, drop: bool) -> tuple[dict[str, Tensor], Tensor]:
        if drop:
            targets, stat, valid = kernels.motion_targets_visible(tracks, vis, **kwargs)
        else:
            (targets, stat), valid = kernels.motion_targets(tracks, **kwargs), None
        return motion_losses(pred, motion_batch(targets, valid), 1.0), stat

    high_bin = (tokens_side ** 2 + 1) // 2
    on_clean, stat_on_clean = losses_and_stat(clean, True)
    on_jumped, stat_on_jumped = losses_and_stat(jumped, True)
    for key in ("loss", "loss_track_motion", "zero_track_motion"):
        assert torch.equal(on_clean[key], on_jumped[key]), key
    assert torch.equal(stat_on_clean, stat_on_jumped)  # hence the same bins and masks
    assert int(motion_bin_order_torch(stat_on_clean)[0, -1]) == token  # and the static token stays last

    off_clean, stat_off_clean = losses_and_stat(clean, False)
    off_jumped, stat_off_jumped = losses_and_stat(jumped, False)
    # per-token normalisation squashes the jump to O(1) values, raw displacements keep it
    assert float((off_jumped["loss"] - off_clean["loss"]).abs()) > (1e-3 if norm == "patch" else 100.0)
    order_clean, order_jumped = motion_bin_order_torch(stat_off_clean), motion_bin_order_torch(stat_off_jumped)
    assert int(order_jumped[0, 0]) == token and int(order_clean[0, -1]) == token  # last to first
    assert float(stat_off_jumped[0, token]) > 1000.0 / 3 / 4 - 1  # one of 4 points, one of 3 steps
    # the jump pushes another token out of the high-motion bin: different masks for the same draws
    assert set(order_clean[0, :high_bin].tolist()) != set(order_jumped[0, :high_bin].tolist())


# ------------------------------------------------------------------------------------------------ the masked loss


def test_masked_loss_is_the_mean_over_valid_values():
    gen = torch.Generator().manual_seed(4)
    targets = torch.randn(3, 7, 8, generator=gen)
    valid = torch.rand(3, 7, 8, generator=gen) < 0.6
    targets = torch.where(valid, targets, 0.0)
    pred = torch.randn(3, 7, 8, generator=gen, requires_grad=True)
    losses = motion_losses(pred, motion_batch(targets, valid), 0.5)
    error = total = zero = 0.0
    for index in itertools.product(range(3), range(7), range(8)):
        if valid[index]:
            error += (float(pred[index].detach()) - float(targets[index])) ** 2
            zero += float(targets[index]) ** 2
            total += 1
    values = {key: float(value.detach()) for key, value in losses.items() if value.dim() == 0}
    assert abs(values["loss_track_motion"] - error / total) < 1e-5
    assert abs(values["zero_track_motion"] - zero / total) < 1e-5
    assert abs(values["loss"] - 0.5 * error / total) < 1e-5
    losses["loss"].backward()
    assert bool((pred.grad[~valid] == 0).all()) and bool((pred.grad[valid] != 0).all())

    # all valid: the plain MSE; none valid: 0 and a zero gradient, not 0 / 0
    full = motion_losses(pred, motion_batch(targets, torch.ones_like(valid)), 1.0)
    plain = motion_losses(pred, motion_batch(targets, None), 1.0)
    torch.testing.assert_close(full["loss"], plain["loss"], rtol=1e-6, atol=0)
    torch.testing.assert_close(full["zero_track_motion"], plain["zero_track_motion"], rtol=1e-6, atol=0)
    pred.grad = None
    empty = motion_losses(pred, motion_batch(targets, torch.zeros_like(valid)), 1.0)
    assert float(empty["loss"].detach()) == 0.0 and float(empty["zero_track_motion"]) == 0.0
    empty["loss"].backward()
    assert bool((pred.grad == 0).all())


# ------------------------------------------------------------------------------------------------ end to end


class ScriptedTracker(PointTracker):
    """A real tracker of the project's interface that returns the tracks and visibility it was given."""

    name = "scripted"

    def __init__(self, tracks: Tensor, visibility: Tensor):
        super().__init__()
        self.tracks, self.visibility = tracks, visibility

    def forward(self, frames: Tensor, queries: Tensor) -> TrackerOutput:
        assert frames.shape[:2] == self.tracks.shape[:2] and queries.shape[1] == self.tracks.shape[2]
        return TrackerOutput(tracks=self.tracks, visibility=self.visibility)


OVERRIDES = ["data.num_frames=8", "data.input_size=64", "batch_size=3", "seed=5", "tracker.backend=lucas-kanade",
             "target.motion_norm=patch"]


def test_batch_preparer_masks_and_weights_follow_the_visibility():
    """8 frames of 64 px: 4 tubelets, 4x4 tokens, a 4x4 tracker grid upsampled to 8x8 (2x2 points per token). Clip 0
    loses raw point (1, 2) from frame 1 on: every value of its token becomes invalid (each of its points has that
    raw point in its bilinear stencil) and so do its neighbours' shared points; its statistic is 0, the lowest. Clips
    1 and 2 stay visible: exactly the targets and masks of the option off."""
    device = torch.device("cpu")
    tracks = random_tracks(3, 4, 4, seed=8) * 1.5
    vis = torch.ones(3, 4, 16)
    point = 1 * 4 + 2
    vis[0, 1:, point] = 0.2
    tracks[0, 1:, point] += torch.tensor([40.0, -25.0])  # the occluder's jump
    frames = torch.randint(0, 255, (3, 8, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    host = {"frames": frames, "skipped": torch.full((3, 4), -1), "source_index": torch.arange(3)}

    preparers = {}
    for drop in (True, False):
        cfg = load_config("default", OVERRIDES + [f"target.track_motion.drop_invisible={drop}"])
        preparer = build_batch_preparer(cfg, device)
        preparer.tracker = ScriptedTracker(tracks, vis)
        preparers[drop] = preparer
    on, off = preparers[True](host, 2), preparers[False](host, 2)
    assert off.valid == {}
    on_valid, on_target = on.valid["track_motion"], on.targets["track_motion"]
    assert on_valid.dtype == torch.bool and on_valid.shape == on_target.shape

    targets, stat, valid = kernels.motion_targets_visible(tracks, vis, tokens_side=4, upsample=2)
    assert float(stat[0, point]) == 0.0 and int(motion_bin_order_torch(stat)[0, -1]) == point
    expected_mask = preparers[True].masks(2, 3, device, token_stat=stat)
    assert torch.equal(on.visible_idx, expected_mask.visible_idx)
    assert torch.equal(on.masked_idx, expected_mask.masked_idx)
    assert torch.equal(on_valid, kernels.gather_tokens(valid, on.masked_idx, backend="torch"))
    assert torch.equal(on_target, kernels.gather_tokens(targets, on.masked_idx))
    assert bool((on_target[~on_valid] == 0).all())
    # the occluded token: no valid value in any slot it is masked in; a masked token of a visible clip: all valid
    slots = on.masked_idx[0] % 16 == point
    assert bool(slots.any()) and not bool(on_valid[0, slots].any())
    assert bool(on_valid[1:].all())
    # the visible clips are prepared exactly as without the option
    assert torch.equal(on.masked_idx[1:], off.masked_idx[1:])
    assert torch.equal(on_target[1:], off.targets["track_motion"][1:])
    assert torch.equal(on.patches[1:], off.patches[1:])
    assert torch.equal(on.targets["pixel"][1:], off.targets["pixel"][1:])
    # the stat-only path (no motion target) draws the same masks from the same visible-only statistic
    stat_only = build_batch_preparer(load_config("default", OVERRIDES + [
        "target.track_motion.drop_invisible=true", "target.track_motion.enabled=false"]), device)
    stat_only.tracker = ScriptedTracker(tracks, vis)
    alone = stat_only(host, 2)
    assert alone.valid == {} and torch.equal(alone.visible_idx, on.visible_idx)
