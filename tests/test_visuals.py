"""The training pictures (trackmae_stream.visuals) on a synthetic batch of odd sizes."""
from __future__ import annotations

import colorsys
import math
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from trackmae_stream import kernels
from trackmae_stream.visuals import (
    GAP,
    LABEL_WIDTH,
    NO_DATA,
    add_to_tensorboard,
    flow_to_rgb,
    render_batch,
    render_clip,
    write_png,
)

# 3 tubelet slots of 2 frames, 3 x 5 tokens of 4 px: N = 45 tokens; 2 x 2 motion points per token.
B, T, H, W, KT, P, S = 2, 6, 12, 20, 2, 4, 2
GT, GH, GW = T // KT, H // P, W // P
N, M = GT * GH * GW, 31


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (B, T, H, W, 3), dtype=torch.uint8, generator=gen)
    order = torch.stack([torch.randperm(N, generator=gen) for _ in range(B)])
    masked_idx, visible_idx = order[:, :M].sort(dim=1).values, order[:, M:].sort(dim=1).values
    motion = torch.randn(B, M, 2 * S * S, generator=gen)
    return SimpleNamespace(frames=frames, masked_idx=masked_idx, visible_idx=visible_idx, motion_target=motion)


def tile(image: np.ndarray, row: int, column: int, label_width: int = LABEL_WIDTH) -> np.ndarray:
    top, left = row * (H + GAP), label_width + column * (W + GAP)
    return image[top:top + H, left:left + W]


def token_region(t: int, h: int, w: int) -> tuple[int, slice, slice]:
    """(column, rows, columns) of token (t, h, w) inside a tile."""
    return t, slice(h * P, (h + 1) * P), slice(w * P, (w + 1) * P)


def masked_tokens(batch, clip: int) -> set[int]:
    return set(batch.masked_idx[clip].tolist())


def test_grid_size_and_rows(batch):
    full = render_clip(batch.frames, batch.masked_idx, tubelet=KT, patch=P,
                       pred_spatial=torch.zeros(B, M, KT * P * P * 3), motion_target=batch.motion_target,
                       pred_motion=batch.motion_target)
    assert full.dtype == np.uint8 and full.shape == (5 * H + 4 * GAP, LABEL_WIDTH + GT * W + (GT - 1) * GAP, 3)
    bare = render_clip(batch.frames, batch.masked_idx, tubelet=KT, patch=P, label_width=0)
    assert bare.shape == (2 * H + GAP, GT * W + (GT - 1) * GAP, 3)
    # the input row: the first frame of every tubelet of the chosen clip
    for clip in range(B):
        image = render_clip(batch.frames, batch.masked_idx, tubelet=KT, patch=P, clip=clip, label_width=0)
        for t in range(GT):
            np.testing.assert_array_equal(tile(image, 0, t, 0), batch.frames[clip, t * KT].numpy())
    later = render_clip(batch.frames, batch.masked_idx, tubelet=KT, patch=P, frame_in_tubelet=1, label_width=0)
    np.testing.assert_array_equal(tile(later, 0, 2, 0), batch.frames[0, 2 * KT + 1].numpy())


@pytest.mark.parametrize("clip", [0, 1])
def test_mask_row_changes_masked_tokens_only(batch, clip):
    image = render_clip(batch.frames, batch.masked_idx, tubelet=KT, patch=P, clip=clip)
    masked = masked_tokens(batch, clip)
    for n in range(N):
        t, rows, cols = token_region(n // (GH * GW), n // GW % GH, n % GW)
        shown = tile(image, 1, t)[rows, cols].astype(int)
        original = batch.frames[clip, t * KT].numpy()[rows, cols].astype(int)
        if n in masked:
            assert np.abs(shown - original).mean() > 20, n  # greyed out, visibly
        else:
            np.testing.assert_array_equal(shown, original)


@pytest.mark.parametrize("normalize", [True, False])
def test_perfect_prediction_reconstructs_the_frames(batch, normalize):
    target = kernels.pixel_targets(batch.frames, batch.masked_idx, tubelet=KT, patch=P, layout="BTHWC",
                                   normalize=normalize, backend="torch")
    for clip in range(B):
        image = render_clip(batch.frames, batch.masked_idx, tubelet=KT, patch=P, pred_spatial=target,
                            normalize_pixels=normalize, clip=clip)
        for t in range(GT):
            diff = np.abs(tile(image, 2, t).astype(int) - batch.frames[clip, t * KT].numpy().astype(int))
            assert diff.max() <= 1, (clip, t, diff.max())


def test_wrong_prediction_changes_masked_tokens_only(batch):
    """A zero prediction of normalised targets is each masked patch's flat mean; visible tokens stay exact."""
    image = render_clip(batch.frames, batch.masked_idx, tubelet=KT, patch=P,
                        pred_spatial=torch.zeros(B, M, KT * P * P * 3, dtype=torch.bfloat16))
    masked = masked_tokens(batch, 0)
    for n in range(N):
        t, rows, cols = token_region(n // (GH * GW), n // GW % GH, n % GW)
        shown = tile(image, 2, t)[rows, cols]
        original = batch.frames[0, t * KT].numpy()[rows, cols]
        if n in masked:
            tokens = batch.frames[0, t * KT:(t + 1) * KT].numpy()[:, rows, cols].reshape(-1, 3).astype(float)
            np.testing.assert_allclose(shown.reshape(-1, 3), np.broadcast_to(tokens.mean(0), (P * P, 3)), atol=0.51)
        else:
            np.testing.assert_array_equal(shown, original)


def expected_colour(dx: float, dy: float, scale: float) -> np.ndarray:
    """HSV -> RGB computed independently: hue = direction (image coordinates), value = |v| / scale."""
    hue = (math.degrees(math.atan2(dy, dx)) % 360.0) / 360.0
    return np.array(colorsys.hsv_to_rgb(hue, 1.0, min(math.hypot(dx, dy) / scale, 1.0))) * 255.0


@pytest.mark.parametrize("angle", [0, 30, 90, 135, 200, 270, 315])
@pytest.mark.parametrize("magnitude", [0.5, 2.0, 5.0])
def test_flow_colour_wheel(angle, magnitude):
    dx, dy = magnitude * math.cos(math.radians(angle)), magnitude * math.sin(math.radians(angle))
    colour = flow_to_rgb(np.array([dx, dy]), scale=2.0)
    np.testing.assert_allclose(colour, expected_colour(dx, dy, 2.0), atol=1.0)


def test_flow_colour_known_directions():
    right, down, left = flow_to_rgb(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), scale=1.0)
    np.testing.assert_array_equal(right, (255, 0, 0))  # hue 0
    np.testing.assert_allclose(down, (127.5, 255, 0), atol=1)  # hue 90: y points down in images
    np.testing.assert_array_equal(left, (0, 255, 255))  # hue 180
    np.testing.assert_array_equal(flow_to_rgb(np.array([np.nan, 0.0]), 1.0), NO_DATA)


def test_motion_rows_share_one_scale_and_follow_the_point_layout(batch):
    # every point of every masked token moves by (3, -4) in the target (up and right), the prediction by half the
    # opposite vector: the default scale is then 5 (the target's 99th percentile magnitude)
    target = torch.tensor([3.0, -4.0]).repeat(B, M, S * S)
    image = render_clip(batch.frames, batch.masked_idx, tubelet=KT, patch=P, motion_target=target,
                        pred_motion=-0.5 * target)
    masked = masked_tokens(batch, 0)
    for n in range(N):
        t, rows, cols = token_region(n // (GH * GW), n // GW % GH, n % GW)
        for row, (dx, dy) in ((2, (3.0, -4.0)), (3, (-1.5, 2.0))):
            region = tile(image, row, t)[rows, cols].reshape(-1, 3)
            expected = expected_colour(dx, dy, 5.0) if n in masked else np.array(NO_DATA)
            np.testing.assert_allclose(region, np.broadcast_to(expected, region.shape), atol=1.0)
    # within a token: point q = a * s + b (row-major) covers pixel block (a, b); give point q the vector (q + 1, 0)
    ramp = torch.zeros(B, M, S * S, 2)
    ramp[..., 0] = torch.arange(1, S * S + 1, dtype=torch.float32)
    image = render_clip(batch.frames, batch.masked_idx, tubelet=KT, patch=P, motion_target=ramp.flatten(2),
                        flow_scale=float(S * S), label_width=0)
    n = sorted(masked)[0]
    t, rows, cols = token_region(n // (GH * GW), n // GW % GH, n % GW)
    block = P // S
    region = tile(image, 2, t, 0)[rows, cols]
    for a in range(S):
        for b in range(S):
            red = region[a * block:(a + 1) * block, b * block:(b + 1) * block, 0]
            assert np.all(np.abs(red.astype(int) - 255 * (a * S + b + 1) / (S * S)) <= 1), (a, b, red)


def test_motion_values_outside_the_loss_are_not_drawn(batch):
    """target.drop_invisible: target points whose values carry motion_valid=False show NO_DATA; the prediction is
    drawn everywhere."""
    target = torch.tensor([1.0, 0.0]).repeat(B, M, S * S)
    valid = torch.ones(B, M, 2 * S * S, dtype=torch.bool)
    valid[0, 0, 1] = False  # the first masked token: point 0 (top-left block) loses its y value
    image = render_clip(batch.frames, batch.masked_idx, tubelet=KT, patch=P, motion_target=target,
                        pred_motion=target, motion_valid=valid, flow_scale=1.0, label_width=0)
    n = batch.masked_idx[0, 0].item()
    t, rows, cols = token_region(n // (GH * GW), n // GW % GH, n % GW)
    block = P // S
    target_region, pred_region = tile(image, 2, t, 0)[rows, cols], tile(image, 3, t, 0)[rows, cols]
    np.testing.assert_array_equal(target_region[:block, :block].reshape(-1, 3), [NO_DATA] * block * block)
    np.testing.assert_array_equal(target_region[block:, block:].reshape(-1, 3), [(255, 0, 0)] * block * block)
    np.testing.assert_array_equal(pred_region.reshape(-1, 3), [(255, 0, 0)] * P * P)


def test_render_batch_reads_the_config(batch):
    from trackmae_stream.config import load_config

    cfg = load_config("default", [f"model.tubelet_size={KT}", f"model.patch_size={P}", "target.pixel.normalize=false"],
                      check=False)
    target = kernels.pixel_targets(batch.frames, batch.masked_idx, tubelet=KT, patch=P, layout="BTHWC",
                                   normalize=False, backend="torch")
    step = SimpleNamespace(masked_idx=batch.masked_idx, targets={"track_motion": batch.motion_target}, valid={})
    pred = {"pixel": target, "track_motion": batch.motion_target}
    expected = render_clip(batch.frames, batch.masked_idx, tubelet=KT, patch=P, pred_spatial=target,
                           motion_target=batch.motion_target, pred_motion=batch.motion_target,
                           normalize_pixels=False, clip=1)
    np.testing.assert_array_equal(render_batch(cfg, batch.frames, step, pred, clip=1), expected)
    cfg = load_config("default", [f"model.tubelet_size={KT}", f"model.patch_size={P}", "target.spatial=clip"],
                      check=False)  # features, not pixels: no reconstruction row
    pred = {"clip": torch.zeros(B, M, 7), "track_motion": batch.motion_target}
    assert render_batch(cfg, batch.frames, step, pred).shape[0] == 4 * H + 3 * GAP


def test_bad_inputs(batch):
    with pytest.raises(ValueError, match="masked_idx"):
        render_clip(batch.frames, batch.masked_idx + N, tubelet=KT, patch=P)
    with pytest.raises(ValueError, match="pixel prediction"):
        render_clip(batch.frames, batch.masked_idx, tubelet=KT, patch=P, pred_spatial=torch.zeros(B, M, 5))
    with pytest.raises(ValueError, match="2\\*s\\*s"):
        render_clip(batch.frames, batch.masked_idx, tubelet=KT, patch=P, motion_target=torch.zeros(B, M, 6))
    with pytest.raises(ValueError, match="not divisible"):
        render_clip(batch.frames, batch.masked_idx, tubelet=4, patch=P)


def test_write_png_is_atomic_and_rgb(tmp_path):
    image = np.zeros((5, 7, 3), dtype=np.uint8)
    image[..., 0] = 200  # red
    path = write_png(tmp_path / "pictures" / "step_1.png", image)
    np.testing.assert_array_equal(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), image)
    write_png(path, image[::-1].copy())  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_1.png"]  # no temporary file left
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "bad.png", image.astype(np.float32))


def test_add_to_tensorboard():
    from torch.utils.tensorboard import summary

    calls = []

    class Writer:
        def add_image(self, tag, value, global_step=None, dataformats="CHW"):
            calls.append((tag, value, global_step, dataformats))
            # what SummaryWriter does with it: the encoded image must be the RGB picture, uncropped and unscaled
            proto = summary.image(tag, value, dataformats=dataformats).value[0].image
            decoded = cv2.imdecode(np.frombuffer(proto.encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
            np.testing.assert_array_equal(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), image)

    image = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    add_to_tensorboard(Writer(), "train/pictures", image, 42)
    assert [(c[0], tuple(c[1].shape), c[2], c[3]) for c in calls] == [("train/pictures", (9, 13, 3), 42, "HWC")]
    add_to_tensorboard(None, "train/pictures", image, 42)  # TensorBoard off: nothing happens
