"""Helpers shared by the data tests (this module holds no tests).

The small synthetic set is generated once per session under pytest's base temp folder; every module asks
`ensure_synthetic_dataset` for the same root and parameters, so only the first call renders anything.
"""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from trackmae_stream.data.synthetic import SyntheticDataset, ensure_synthetic_dataset

SMALL_SET = dict(num_videos=16, size=64, num_frames=24, seed=3, val_fraction=0.5)


def small_synthetic_set(tmp_path_factory) -> SyntheticDataset:
    return ensure_synthetic_dataset(tmp_path_factory.getbasetemp() / "synthetic-small", **SMALL_SET)


def decode_all_frames(path: str | Path) -> np.ndarray:
    """Brute-force reference decode: every frame in stream order, no seeking, (N, H, W, 3) uint8 RGB."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def bilinear_resize_reference(image: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
    """float64 bilinear resize with half-pixel centres and edge clamping (the convention of cv2.INTER_LINEAR)."""
    image = np.asarray(image, dtype=np.float64)
    in_height, in_width = image.shape[:2]
    out = np.empty((out_height, out_width) + image.shape[2:], dtype=np.float64)
    for i in range(out_height):
        y = min(max((i + 0.5) * in_height / out_height - 0.5, 0.0), in_height - 1)
        y0 = int(np.floor(y))
        y1 = min(y0 + 1, in_height - 1)
        wy = y - y0
        for j in range(out_width):
            x = min(max((j + 0.5) * in_width / out_width - 0.5, 0.0), in_width - 1)
            x0 = int(np.floor(x))
            x1 = min(x0 + 1, in_width - 1)
            wx = x - x0
            out[i, j] = ((1 - wy) * ((1 - wx) * image[y0, x0] + wx * image[y0, x1])
                         + wy * ((1 - wx) * image[y1, x0] + wx * image[y1, x1]))
    return out


def bilinear_sample(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """float64 bilinear samples (P, C) of an (H, W, C) image at (P, 2) (x, y) pixel-centre positions (clamped)."""
    image = np.asarray(image, dtype=np.float64)
    height, width = image.shape[:2]
    x = np.clip(xy[:, 0], 0, width - 1)
    y = np.clip(xy[:, 1], 0, height - 1)
    x0 = np.minimum(np.floor(x).astype(int), width - 2)
    y0 = np.minimum(np.floor(y).astype(int), height - 2)
    wx = (x - x0)[:, None]
    wy = (y - y0)[:, None]
    return ((1 - wy) * ((1 - wx) * image[y0, x0] + wx * image[y0, x0 + 1])
            + wy * ((1 - wx) * image[y0 + 1, x0] + wx * image[y0 + 1, x0 + 1]))
