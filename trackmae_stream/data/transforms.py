"""Clip augmentation (VideoMAE's GroupMultiScaleCrop, horizontal flip) and whole-clip ImageNet normalisation.

The data pipeline hands the trainer uint8 frames (4x less host work and host-to-device traffic than float frames).
Training normalises on the device inside `kernels.gather_patches`, only for the visible tubelets; `normalize_clip`
normalises whole clips with the same constants, for feature extraction and evaluation.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor

from ..constants import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_SCALES: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
_MAX_RESIZE_CHANNELS = 128  # OpenCV 5 converts arrays of at most 128 channels: 42 RGB frames per resize call


@dataclass(frozen=True)
class CropBox:
    """A crop in source pixels: columns [x, x + width), rows [y, y + height)."""

    x: int
    y: int
    width: int
    height: int


def crop_size_pairs(image_width: int, image_height: int, input_size: int, scales: Sequence[float] = DEFAULT_SCALES,
                    max_distort: int = 1) -> list[tuple[int, int]]:
    """GroupMultiScaleCrop's candidate (crop_width, crop_height) pairs.

    Sizes are int(min(W, H) * scale), snapped to input_size when within 3 px; a width from scale i pairs with a
    height from scale j when |i - j| <= max_distort.
    """
    base = min(image_width, image_height)
    sizes = [int(base * scale) for scale in scales]
    snapped = [input_size if abs(size - input_size) < 3 else size for size in sizes]
    return [(w, h) for i, h in enumerate(snapped) for j, w in enumerate(snapped) if abs(i - j) <= max_distort]


def fixed_crop_offsets(image_width: int, image_height: int, crop_width: int, crop_height: int,
                       more_fix_crop: bool = True) -> list[tuple[int, int]]:
    """GroupMultiScaleCrop's fixed (x, y) offsets: corners and centre, plus 8 more positions with more_fix_crop."""
    w_step = (image_width - crop_width) // 4
    h_step = (image_height - crop_height) // 4
    steps = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2)]
    if more_fix_crop:
        steps += [(0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
    return [(i * w_step, j * h_step) for i, j in steps]


def sample_multi_scale_crop(image_width: int, image_height: int, input_size: int, rng: np.random.Generator, *,
                            scales: Sequence[float] = DEFAULT_SCALES, max_distort: int = 1, fix_crop: bool = True,
                            more_fix_crop: bool = True) -> CropBox:
    """Draw one crop with VideoMAE's GroupMultiScaleCrop semantics (uniform over pairs, then over offsets)."""
    pairs = crop_size_pairs(image_width, image_height, input_size, scales, max_distort)
    crop_width, crop_height = pairs[int(rng.integers(len(pairs)))]
    # Snapping to input_size can overshoot a frame up to 2 px smaller than input_size: clamp (PIL would pad black).
    crop_width, crop_height = min(crop_width, image_width), min(crop_height, image_height)
    if fix_crop:
        offsets = fixed_crop_offsets(image_width, image_height, crop_width, crop_height, more_fix_crop)
        x, y = offsets[int(rng.integers(len(offsets)))]
    else:
        x = int(rng.integers(0, image_width - crop_width + 1))
        y = int(rng.integers(0, image_height - crop_height + 1))
    return CropBox(x=x, y=y, width=crop_width, height=crop_height)


def sample_crop_and_flip(image_width: int, image_height: int, input_size: int, rng: np.random.Generator, *,
                         scales: Sequence[float] = DEFAULT_SCALES, max_distort: int = 1, fix_crop: bool = True,
                         more_fix_crop: bool = True, flip: bool = False) -> tuple[CropBox, bool]:
    """One clip's augmentation: a multi-scale crop, then (when `flip`) a fair coin for mirroring, from one generator."""
    box = sample_multi_scale_crop(image_width, image_height, input_size, rng, scales=scales, max_distort=max_distort,
                                  fix_crop=fix_crop, more_fix_crop=more_fix_crop)
    return box, flip and bool(rng.random() < 0.5)


def crop_resize_flip(frames: np.ndarray, box: CropBox, output_size: int, flip: bool = False) -> np.ndarray:
    """Crop uint8 (T, H, W, C) frames to `box`, resize to output_size^2 (cv2 INTER_LINEAR), optionally mirror."""
    if frames.ndim != 4:
        raise ValueError(f"frames must be (T, H, W, C), got shape {frames.shape}")
    num_frames, _, _, channels = frames.shape
    crop = frames[:, box.y:box.y + box.height, box.x:box.x + box.width]
    if crop.shape[1:3] != (box.height, box.width):
        raise ValueError(f"crop {box} leaves the {frames.shape[2]}x{frames.shape[1]} frame")
    if (box.height, box.width) != (output_size, output_size):
        # All frames in one call: frames stacked along the channel axis share the same resampling grid.
        per_call = max(1, _MAX_RESIZE_CHANNELS // channels)
        parts = []
        for start in range(0, num_frames, per_call):
            chunk = crop[start:start + per_call]
            n = chunk.shape[0]
            stacked = np.ascontiguousarray(chunk.transpose(1, 2, 0, 3)).reshape(box.height, box.width, n * channels)
            resized = cv2.resize(stacked, (output_size, output_size), interpolation=cv2.INTER_LINEAR)
            parts.append(resized.reshape(output_size, output_size, n, channels).transpose(2, 0, 1, 3))
        crop = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if flip:
        crop = crop[:, :, ::-1]
    return np.ascontiguousarray(crop)


def normalize_clip(frames_u8: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 (B, T, H, W, 3) RGB -> (B, 3, T, H, W) `dtype` on the frames' device: (x / 255 - mean) / std."""
    if frames_u8.ndim != 5 or frames_u8.shape[-1] != 3:
        raise ValueError(f"frames must be (B, T, H, W, 3), got shape {tuple(frames_u8.shape)}")
    if frames_u8.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {frames_u8.dtype}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {tuple(mean)} and {tuple(std)}")
    b, t, h, w, _ = frames_u8.shape
    clip = torch.empty((b, 3, t, h, w), dtype=torch.float32, device=frames_u8.device)
    clip.copy_(frames_u8.permute(0, 4, 1, 2, 3))  # layout change and uint8 -> float in one pass
    # Python scalars, not device tensors: no host-to-device copies per call.
    for channel, (m, s) in enumerate(zip(mean, std)):
        clip[:, channel].mul_(1.0 / (255.0 * s)).sub_(m / s)
    return clip.to(dtype)
