"""Draw point tracks on video frames and save them as an image strip (.png/.jpg) or a video (.mp4/.webm/.gif)."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_CODECS = {".mp4": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9", ".gif": "gif"}


def track_colors(num_tracks: int) -> np.ndarray:
    """(N, 3) uint8 RGB colours along a rainbow, in query order (a row-major grid reads as bands of colour)."""
    ramp = np.linspace(0, 255, max(num_tracks, 1)).astype(np.uint8).reshape(-1, 1)
    bgr = cv2.applyColorMap(ramp, cv2.COLORMAP_RAINBOW).reshape(-1, 3)
    return bgr[:num_tracks, ::-1].copy()


def draw_tracks(frames: np.ndarray, tracks: np.ndarray, visibility: np.ndarray | None = None, trail: int = 8,
                radius: int | None = None) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 RGB with each track's recent path and current point drawn on a copy.

    tracks (T, N, 2) as (x, y) px; visibility (T, N) bool (None = all visible). Visible points are filled discs,
    occluded ones hollow circles; the trail covers the last `trail` frames.
    """
    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8; got {frames.shape} {frames.dtype}")
    n_frames, height, width = frames.shape[:3]
    if tracks.shape[:1] != (n_frames,) or tracks.ndim != 3 or tracks.shape[2] != 2:
        raise ValueError(f"tracks must be (T={n_frames}, N, 2); got {tracks.shape}")
    if visibility is None:
        visibility = np.ones(tracks.shape[:2], dtype=bool)
    radius = radius or max(1, round(min(height, width) / 100))
    colors = [tuple(int(c) for c in rgb) for rgb in track_colors(tracks.shape[1])]
    finite = np.isfinite(tracks).all(-1)
    # cv2 draws with integer coordinates; 4 fractional bits give sub-pixel placement.
    shift = 4
    fixed = np.round(np.nan_to_num(tracks) * (1 << shift)).astype(np.int32)
    out = frames.copy()
    for t in range(n_frames):
        canvas = out[t]
        start = max(0, t - trail)
        for n, color in enumerate(colors):
            segment = fixed[start:t + 1, n][finite[start:t + 1, n]]
            if len(segment) > 1:
                cv2.polylines(canvas, [segment.reshape(-1, 1, 2)], False, color, 1, cv2.LINE_AA, shift)
            if finite[t, n]:
                thickness = -1 if visibility[t, n] else 1
                cv2.circle(canvas, tuple(int(v) for v in fixed[t, n]), radius << shift, color, thickness,
                           cv2.LINE_AA, shift)
    return out


def image_strip(frames: np.ndarray, max_frames: int = 8) -> np.ndarray:
    """Up to `max_frames` evenly spaced frames side by side: (H, k * W, 3)."""
    picks = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
    return np.concatenate([frames[i] for i in picks], axis=1)


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: float = 10.0) -> None:
    """Encode (T, H, W, 3) uint8 RGB frames with PyAV; the codec follows the suffix (VIDEO_CODECS)."""
    import av  # imported here: only the video output needs it

    path = Path(path)
    codec = VIDEO_CODECS.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"{path}: unsupported video suffix; use one of {sorted(VIDEO_CODECS)}")
    height, width = frames.shape[1:3]
    if codec != "gif":  # yuv420p needs even sizes
        frames = frames[:, : height - height % 2, : width - width % 2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=max(1, round(fps)))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def save_visualization(frames: np.ndarray, tracks: np.ndarray, visibility: np.ndarray | None,
                       path: str | os.PathLike, fps: float = 10.0, trail: int = 8, max_strip_frames: int = 8) -> Path:
    """Draw the tracks and save: an image suffix gives an image strip, a video suffix a video. Returns the path."""
    path = Path(path)
    drawn = draw_tracks(frames, tracks, visibility, trail=trail)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        strip = image_strip(drawn, max_strip_frames)
        if not cv2.imwrite(str(path), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write the image {path}")
    elif suffix in VIDEO_CODECS:
        write_video(drawn, path, fps)
    else:
        raise ValueError(f"{path}: unknown visualisation suffix; use one of "
                         f"{sorted(IMAGE_SUFFIXES + tuple(VIDEO_CODECS))}")
    return path
