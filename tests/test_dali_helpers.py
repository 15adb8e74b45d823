"""Helpers shared by the DALI tests (this module holds no tests); no PyAV, so the GPU tests run without it."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

BT601_LUMA = np.array([0.299, 0.587, 0.114])


def swscale_rgb(path: str | Path, frame_ids: np.ndarray) -> np.ndarray:
    """RGB as OpenCV (and PyAV's rgb24, identically) convert it: FFmpeg's swscale."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return np.stack([frames[i] for i in frame_ids])


def smooth_clip(rng: np.random.Generator, num_frames: int, height: int, width: int) -> np.ndarray:
    """uint8 (T, H, W, 3): a drifting smooth colour texture (compresses well, so decoded frames keep detail)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    waves = rng.uniform(0.05, 0.3, (3, 2, 2))
    phases = rng.uniform(0, 2 * np.pi, (3, 2))
    frames = np.empty((num_frames, height, width, 3))
    for t in range(num_frames):
        for c in range(3):
            first = np.sin(waves[c, 0, 0] * (xs + 1.3 * t) + waves[c, 0, 1] * ys + phases[c, 0])
            second = np.sin(waves[c, 1, 0] * xs - waves[c, 1, 1] * (ys - 0.7 * t) + phases[c, 1])
            frames[t, ..., c] = 128 + 50 * first + 40 * second
    return np.clip(frames, 0, 255).astype(np.uint8)


def iterate_epoch(loader, epoch: int) -> list[dict[str, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)
