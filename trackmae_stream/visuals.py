"""Pictures of what the model learned: one clip of a training batch rendered as one uint8 RGB grid (TensorBoard and
`<run>/pictures/`).

One column per tubelet slot (its first frame by default); rows, top to bottom:
  - input: the clip's frames;
  - mask: the same frames with the masked tokens greyed out;
  - reconstruction (pixel spatial target only): the visible tokens as they are, the masked ones replaced by the
    pixel decoder's prediction. With per-patch-normalised targets the prediction is un-normalised with the statistics
    of the original patch (VideoMAE's visualisation: prediction * std + mean of the true pixels), so the picture shows
    the predicted structure at the true brightness and contrast, not a pure prediction;
  - motion target and motion prediction (motion target only): per track point of each masked token (s x s points per
    token, the layout of `kernels.motion`), a colour-coded flow field: hue = direction in image coordinates
    (0 deg = right, 90 deg = down), value = magnitude / scale with ONE scale for both rows. Visible tokens have no
    prediction and are drawn in flat grey. With `target.motion_norm=patch` the vectors are per-token standardised
    displacements (each token's mean motion removed), which is what the decoder predicts.
A label column on the left names the rows; the motion rows also carry the scale and a colour wheel.

Everything runs on the host in numpy, on one clip: call it only at visualisation steps (its device-to-host copies
synchronise with the device).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from .config import TrainConfig

#: Pixels between tiles, and the colour of the gaps and the label column.
GAP = 2
BACKGROUND = (24, 24, 24)
#: Masked tokens in the mask row: MASK_KEEP * pixel + (1 - MASK_KEEP) * MASK_GREY.
MASK_KEEP = 0.3
MASK_GREY = 110.0
#: Flow tiles: tokens without a vector (visible tokens: nothing is predicted there).
NO_DATA = (128, 128, 128)
#: Default label column width in pixels (0: no labels).
LABEL_WIDTH = 72
#: Without an explicit scale, flow magnitudes are divided by this percentile of the target's magnitudes (a few
#: outliers then saturate instead of darkening every other vector).
SCALE_PERCENTILE = 99.0

ArrayLike = Tensor | np.ndarray


def _host(value: ArrayLike, clip: int) -> np.ndarray:
    """Clip `clip` of a batched tensor or array on the host as numpy; only that clip leaves the device."""
    if isinstance(value, Tensor):
        value = value.detach()[clip]
        if value.is_floating_point():
            value = value.float()  # bf16/fp16 predictions: numpy has no bfloat16
        return value.cpu().numpy()
    return np.asarray(value)[clip]


def flow_to_rgb(flow: np.ndarray, scale: float) -> np.ndarray:
    """(..., 2) vectors (dx, dy) -> (..., 3) uint8 RGB: hue = atan2(dy, dx) (image coordinates, y down: 0 deg right,
    90 deg down), saturation 1, value = min(|v| / scale, 1). Non-finite vectors get NO_DATA."""
    flow = np.asarray(flow, dtype=np.float64)
    if flow.shape[-1] != 2:
        raise ValueError(f"flow must end in (dx, dy), got shape {flow.shape}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    finite = np.isfinite(flow).all(axis=-1)
    dx, dy = np.where(finite, flow[..., 0], 0.0), np.where(finite, flow[..., 1], 0.0)
    hsv = np.stack([np.degrees(np.arctan2(dy, dx)) % 360.0, np.ones_like(dx),
                    np.minimum(np.hypot(dx, dy) / scale, 1.0)], axis=-1).astype(np.float32)
    # float32 HSV: OpenCV takes H in [0, 360) and S, V in [0, 1] (no 8-bit hue quantisation to 2 degrees)
    rgb = cv2.cvtColor(hsv.reshape(-1, 1, 3), cv2.COLOR_HSV2RGB).reshape(hsv.shape)
    out = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    out[~finite] = NO_DATA
    return out


def _token_grid(frames: np.ndarray, tubelet: int, patch: int) -> tuple[int, int, int]:
    frames_n, height, width = frames.shape[:3]
    if frames_n % tubelet or height % patch or width % patch:
        raise ValueError(f"frames (T, H, W) = ({frames_n}, {height}, {width}) are not divisible by "
                         f"(tubelet, patch, patch) = ({tubelet}, {patch}, {patch})")
    return frames_n // tubelet, height // patch, width // patch


def _to_tokens(video: np.ndarray, grid: tuple[int, int, int], tubelet: int, patch: int) -> np.ndarray:
    """(T, H, W, C) -> (N, kt, p, p, C) in token order n = t*gh*gw + h*gw + w (`kernels.pixels`)."""
    gt, gh, gw = grid
    c = video.shape[-1]
    return (video.reshape(gt, tubelet, gh, patch, gw, patch, c).transpose(0, 2, 4, 1, 3, 5, 6)
            .reshape(gt * gh * gw, tubelet, patch, patch, c))


def _from_tokens(tokens: np.ndarray, grid: tuple[int, int, int], tubelet: int, patch: int) -> np.ndarray:
    """Inverse of `_to_tokens`."""
    gt, gh, gw = grid
    c = tokens.shape[-1]
    return (tokens.reshape(gt, gh, gw, tubelet, patch, patch, c).transpose(0, 3, 1, 4, 2, 5, 6)
            .reshape(gt * tubelet, gh * patch, gw * patch, c))


def reconstruct_pixels(frames: np.ndarray, masked: np.ndarray, pred: np.ndarray, *, tubelet: int, patch: int,
                       normalize_pixels: bool, eps: float = 1e-6) -> np.ndarray:
    """uint8 (T, H, W, 3) frames of one clip with the masked tokens replaced by the pixel prediction (M, kt*p*p*3),
    (kt, kh, kw, c) order. Normalised targets are undone with each original patch's per-channel mean and unbiased
    std, the inverse of `kernels.pixel_targets`' (v - mean) / (std + eps)."""
    grid = _token_grid(frames, tubelet, patch)
    points = tubelet * patch * patch
    if pred.shape != (len(masked), points * 3):
        raise ValueError(f"pixel prediction must be (M={len(masked)}, {points * 3}) = (masked tokens, "
                         f"tubelet*patch*patch*3), got {pred.shape}")
    tokens = _to_tokens(frames, grid, tubelet, patch)
    values = pred.astype(np.float64).reshape(len(masked), points, 3)
    if normalize_pixels:
        original = tokens[masked].reshape(len(masked), points, 3).astype(np.float64) / 255.0
        std = original.std(axis=1, ddof=1, keepdims=True) if points > 1 else np.zeros_like(original[:, :1])
        values = values * (std + eps) + original.mean(axis=1, keepdims=True)
    tokens = tokens.copy()
    tokens[masked] = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8).reshape(tokens[masked].shape)
    return _from_tokens(tokens, grid, tubelet, patch)


def motion_field(values: np.ndarray, masked: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """Per-token motion vectors (M, 2*s*s) at `masked` -> the point field (T', gh*s, gw*s, 2), NaN at tokens
    without a value. Within a token, points are row-major (s x s) and each holds (dx, dy) (`kernels.motion`)."""
    gt, gh, gw = grid
    dim = values.shape[-1]
    side = math.isqrt(dim // 2)
    if dim != 2 * side * side or side < 1:
        raise ValueError(f"motion vectors must have 2*s*s values per token, got {dim}")
    if values.shape[0] != len(masked):
        raise ValueError(f"motion values hold {values.shape[0]} tokens, masked_idx {len(masked)}")
    field = np.full((gt * gh * gw, side, side, 2), np.nan)
    field[masked] = values.astype(np.float64).reshape(len(masked), side, side, 2)
    return field.reshape(gt, gh, gw, side, side, 2).transpose(0, 1, 3, 2, 4, 5).reshape(gt, gh * side, gw * side, 2)


def _resize_nearest(tiles: np.ndarray, height: int, width: int) -> np.ndarray:
    """(K, h, w, C) -> (K, height, width, C) by index mapping: exact block replication when h | height."""
    rows = np.arange(height) * tiles.shape[1] // height
    cols = np.arange(width) * tiles.shape[2] // width
    return tiles[:, rows][:, :, cols]


def _label_cell(lines: list[str], height: int, width: int, wheel: bool) -> np.ndarray:
    """A label-column cell: lines of text from the top, then (flow rows) a colour wheel in the space left."""
    cell = np.empty((height, width, 3), dtype=np.uint8)
    cell[:] = BACKGROUND
    font = cv2.FONT_HERSHEY_SIMPLEX
    font_scale = 0.4
    widest = max(cv2.getTextSize(line, font, font_scale, 1)[0][0] for line in lines)
    font_scale *= min(1.0, max(width - 6, 6) / max(widest, 1))  # shrink to fit the column, never grow
    line_height = cv2.getTextSize("Ag", font, font_scale, 1)[0][1] + 4
    y = 2
    for line in lines:
        y += line_height
        cv2.putText(cell, line, (3, y - 3), font, font_scale, (235, 235, 235), 1, cv2.LINE_AA)
    radius = (min(width - 6, height - y - 4)) // 2
    if wheel and radius >= 6:
        centre_y, centre_x = y + 2 + radius, width // 2
        yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1].astype(np.float64)
        disc = np.hypot(xx, yy) <= radius
        colours = flow_to_rgb(np.stack([xx, yy], axis=-1), float(radius))
        region = cell[centre_y - radius:centre_y + radius + 1, centre_x - radius:centre_x + radius + 1]
        region[disc] = colours[disc]
    return cell


def _assemble(rows: list[tuple[list[str], np.ndarray, bool]], label_width: int) -> np.ndarray:
    """Rows of (label lines, tiles (K, H, W, 3) uint8, draw a colour wheel) -> one image with GAP-pixel gaps."""
    count, height, width = rows[0][1].shape[:3]
    image = np.empty((len(rows) * height + (len(rows) - 1) * GAP, label_width + count * width + (count - 1) * GAP, 3),
                     dtype=np.uint8)
    image[:] = BACKGROUND
    for r, (lines, tiles, wheel) in enumerate(rows):
        top = r * (height + GAP)
        if label_width:
            image[top:top + height, :label_width] = _label_cell(lines, height, label_width, wheel)
        for k in range(count):
            left = label_width + k * (width + GAP)
            image[top:top + height, left:left + width] = tiles[k]
    return image


def render_clip(frames_u8: ArrayLike, masked_idx: ArrayLike, *, tubelet: int, patch: int,
                pred_spatial: ArrayLike | None = None, motion_target: ArrayLike | None = None,
                pred_motion: ArrayLike | None = None, motion_valid: ArrayLike | None = None,
                normalize_pixels: bool = True, clip: int = 0,
                frame_in_tubelet: int = 0, flow_scale: float | None = None,
                label_width: int = LABEL_WIDTH) -> np.ndarray:
    """One clip of a training batch as a uint8 RGB image (H_img, W_img, 3); see the module doc for the rows.

    Args:
        frames_u8: (B, T, H, W, 3) uint8 RGB clip frames, the ones the batch's tokens were cut from (any device).
        masked_idx: (B, M) token indices of the masked tokens (`TrainBatch.masked_idx`); the rest are visible.
        tubelet, patch: the model's tubelet and patch size.
        pred_spatial: (B, M, tubelet*patch*patch*3) the pixel target's prediction (`pred["pixel"]`), or None for no
            reconstruction row (no spatial target, or CLIP features: they are not pixels).
        motion_target, pred_motion: (B, M, 2*s*s) `TrainBatch.targets["track_motion"]` and its prediction; a row is
            drawn for each one given.
        motion_valid: (B, M, 2*s*s) bool `TrainBatch.valid["track_motion"]` (`drop_invisible`): target values outside
            the loss are drawn as NO_DATA (the prediction there is drawn as it is: nothing constrains it).
        normalize_pixels: whether the pixel targets were per-patch normalised (`target.normalize_pixels`).
        clip: which clip of the batch; only that clip leaves the device.
        frame_in_tubelet: which frame of each tubelet the columns show.
        flow_scale: the magnitude drawn at full brightness; None: the 99th percentile of the target's magnitudes.
        label_width: width of the label column (0: none).
    """
    if not isinstance(tubelet, int) or not isinstance(patch, int) or tubelet < 1 or patch < 1:
        raise ValueError(f"tubelet and patch must be ints >= 1, got {tubelet!r}, {patch!r}")
    if not 0 <= frame_in_tubelet < tubelet:
        raise ValueError(f"frame_in_tubelet must lie in [0, {tubelet}), got {frame_in_tubelet}")
    frames = _host(frames_u8, clip)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames_u8 must be uint8 (B, T, H, W, 3), got clip {clip} of {frames.dtype} {frames.shape}")
    grid = _token_grid(frames, tubelet, patch)
    num_tokens = grid[0] * grid[1] * grid[2]
    masked = _host(masked_idx, clip).astype(np.int64).reshape(-1)
    if masked.size and (masked.min() < 0 or masked.max() >= num_tokens or len(np.unique(masked)) != masked.size):
        raise ValueError(f"masked_idx must hold distinct token indices in [0, {num_tokens})")
    is_masked = np.zeros(num_tokens, dtype=bool)
    is_masked[masked] = True
    height, width = frames.shape[1:3]
    pick = slice(frame_in_tubelet, None, tubelet)

    shown = frames[pick]
    pixel_mask = _resize_nearest(is_masked.reshape(grid)[..., None], height, width)  # (T', H, W, 1)
    greyed = np.rint(MASK_KEEP * shown + (1.0 - MASK_KEEP) * MASK_GREY).astype(np.uint8)
    rows: list[tuple[list[str], np.ndarray, bool]] = [
        (["input"], shown, False),
        (["mask", f"{masked.size}/{num_tokens}"], np.where(pixel_mask, greyed, shown), False),
    ]
    if pred_spatial is not None:
        recon = reconstruct_pixels(frames, masked, _host(pred_spatial, clip), tubelet=tubelet,
                                   patch=patch, normalize_pixels=normalize_pixels)
        rows.append((["pixels", "predicted"], recon[pick], False))
    values = {name: _host(v, clip).astype(np.float64)
              for name, v in (("target", motion_target), ("predicted", pred_motion)) if v is not None}
    if motion_valid is not None and "target" in values:
        valid = _host(motion_valid, clip).astype(bool)
        if valid.shape != values["target"].shape:
            raise ValueError(f"motion_valid must match the motion target's {values['target'].shape}, got "
                             f"{valid.shape}")
        # a point is drawn only when both its coordinates enter the loss
        valid = valid.reshape(len(masked), -1, 2).all(-1, keepdims=True)
        values["target"] = np.where(valid, values["target"].reshape(len(masked), -1, 2), np.nan).reshape(
            values["target"].shape)
    fields = {name: motion_field(v, masked, grid) for name, v in values.items()}
    if fields:
        if flow_scale is None:
            reference = fields.get("target", next(iter(fields.values())))
            magnitude = np.hypot(reference[..., 0], reference[..., 1])
            magnitude = magnitude[np.isfinite(magnitude)]
            flow_scale = float(np.percentile(magnitude, SCALE_PERCENTILE)) if magnitude.size else 1.0
            flow_scale = flow_scale if flow_scale > 0 else 1.0
        for name, field in fields.items():
            tiles = _resize_nearest(flow_to_rgb(field, flow_scale), height, width)
            rows.append((["motion", name, f"|v|={flow_scale:.3g}"], tiles, True))
    return _assemble(rows, label_width)


def render_batch(cfg: TrainConfig, frames_u8: ArrayLike, batch: Any, pred: Mapping[str, Tensor], *,
                 clip: int = 0, label_width: int = LABEL_WIDTH) -> np.ndarray:
    """`render_clip` with the sizes and target options of a run config: `batch` is the step's `TrainBatch` (its
    `masked_idx`, `targets` and `valid` are read), `pred` the model's output dict (keyed by target name), `frames_u8`
    the (B, T, H, W, 3) uint8 frames the batch was prepared from. Targets are drawn by what their class declares
    (`Target.picture`): "pixels" as a reconstruction, "flow" as a colour-coded field; others are not drawn."""
    from .targets import TARGETS

    kinds = {name: TARGETS[entry["type"]].picture for name, entry in cfg.target.enabled().items()}
    pixels = next((name for name, kind in kinds.items() if kind == "pixels"), None)
    flow = next((name for name, kind in kinds.items() if kind == "flow"), None)
    return render_clip(frames_u8, batch.masked_idx, tubelet=cfg.model.tubelet_size, patch=cfg.model.patch_size,
                       pred_spatial=pred.get(pixels) if pixels else None,
                       motion_target=batch.targets.get(flow) if flow else None,
                       pred_motion=pred.get(flow) if flow else None,
                       motion_valid=batch.valid.get(flow) if flow else None,
                       normalize_pixels=bool(cfg.target[pixels]["normalize"]) if pixels else True, clip=clip,
                       label_width=label_width)


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG, atomically (a temporary file in the same folder, then a rename), so that a
    reader never sees half a picture. Creates the folder. Returns the path."""
    path = Path(path)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name keeps the .png suffix: cv2.imwrite picks the format from it
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write the image {path}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def add_to_tensorboard(writer: Any, tag: str, image: np.ndarray, step: int) -> None:
    """Add an RGB uint8 (H, W, 3) image to a TensorBoard SummaryWriter; a None writer (TensorBoard off, or a rank
    other than 0) does nothing."""
    if writer is None:
        return
    writer.add_image(tag, torch.from_numpy(np.ascontiguousarray(image)), global_step=step, dataformats="HWC")


__all__ = ["render_clip", "render_batch", "reconstruct_pixels", "motion_field", "flow_to_rgb", "write_png",
           "add_to_tensorboard"]
