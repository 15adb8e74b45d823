"""The embedded default data set: procedural videos whose class is decided by motion, with exact point tracks.

Each clip shows textured objects (ellipses and rectangles) moving over a textured background while the camera pans.
Two named tasks (`task=`), each its own set of folders:

  - "motion" (the default): 8 classes, the objects' common direction of travel on screen (right, down_right, down,
    ..., up_right: 45-degree steps, y pointing down; each object within +-10 degrees of it) at 1.6-2.4 px per frame
    at 128 px (2.8-4.2 px per sampled frame after sampling_rate 2 and resizing to 112 px). 4-6 objects (half axes
    0.12-0.24 x the frame side) tile the frame periodically (`ClipMotion.object_wrap_period`): an object leaving one
    side re-enters on the opposite one, so start positions are uniform over the frame and every single frame has the
    same distribution for every class. Sizes, shapes, textures, rotation (sense and speed) and the camera pan (at
    most 0.25 px per frame, any direction, and its wobble) are drawn independently of the class: only motion
    separates the classes. Object textures are coarse (stripes of 1-2 periods per frame side, no noise finer than
    1/8 of it), so that an object's displacement between two sampled frames is well below half a texture period
    (`_sample_motion_appearance`).
  - "legacy": the set of SYNTHETIC_VERSION 2, kept byte for byte: the class is the direction of travel (right, left,
    down, up) combined with the rotation sense (cw, ccw). Objects start where they stay in frame for the whole clip,
    so their frame-0 positions leak the direction (a linear probe on them gets ~68% on direction).

Geometry (pixel-centre convention: pixel (row i, column j) has its centre at (x, y) = (j, i)):
  - camera: the pixel at p shows the background's world point w = p + camera(t); camera(t) = origin + v t plus a
    small sinusoidal wobble, so background motion is not constant-velocity;
  - object k: the pixel at p shows the object's local point l = R(-angle_k(t)) (p - centre_k(t)), with
    centre_k(t) = centre_k(0) + u_k t and angle_k(t) = angle_k(0) + omega_k t; R(a) = [[cos, -sin], [sin, cos]], so with
    y pointing down a positive omega turns clockwise on screen. Later objects are drawn on top of earlier ones. With a
    wrap period P > 0 object k has a copy at every centre_k(t) + P (i, j) (an infinite periodic tiling; copies of
    one object never overlap).
A frame-0 point belongs to the topmost surface (object copy or background) covering it; its track follows that
surface (a point on a copy leaving the frame becomes invisible: it does not jump to the copy entering on the other
side), and it is visible at t when no object above its surface covers the tracked position and the position lies
inside the frame.

Each clip is encoded as a real video file (VP9 in .webm by default, which DALI's CPU decoder reads; H.264 in .mp4 on
request), and `<stem>.tracks.npz` beside it holds the motion parameters plus the tracks of a regular lattice of
frame-0 points. `ground_truth_tracks` recomputes exact tracks for any frame-0 points from the stored parameters.

Every parameter set (task included) lives in its own folder of the cache, `synthetic-v<version>-<hash of the
parameters>`, so that runs asking for different sets never touch each other's files (`ensure_synthetic_dataset`).
The train/validation split is part of the set (`train.list`, `val.list`): every run on a set is evaluated on the
same clips.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import cv2
import numpy as np

from ..errors import UserError

log = logging.getLogger(__name__)

#: Bump when rendering, encoding or file layout changes: a set of another version lives in another folder.
#: 2: one folder per parameter set (`synthetic-v2-<hash>`), generated with the user's umask.
#: 3: named tasks (`task` in the parameters; "legacy" renders v2's clips), every class with >= 2 clips holds out >= 1.
#: 5: the motion task's coarse object textures, 4-6 larger objects, slower pan (sets of 3 and 4 were development
#: snapshots of the motion task that a ViT trained on the labels could not learn within a CPU budget).
SYNTHETIC_VERSION = 5
# The "legacy" task: direction of travel x rotation sense.
DIRECTIONS: dict[str, tuple[float, float]] = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "down": (0.0, 1.0),
                                              "up": (0.0, -1.0)}
ROTATION_SENSES: dict[str, float] = {"cw": 1.0, "ccw": -1.0}
CLASS_NAMES: list[str] = [f"{d}_{r}" for d in DIRECTIONS for r in ROTATION_SENSES]
#: The "motion" task: the on-screen direction of travel in 45-degree steps, clockwise from "right" (y points down).
MOTION_DIRECTIONS: dict[str, float] = {name: math.radians(45.0 * i) for i, name in enumerate(
    ["right", "down_right", "down", "down_left", "left", "up_left", "up", "up_right"])}
MOTION_CLASS_NAMES: list[str] = list(MOTION_DIRECTIONS)
TASKS: dict[str, list[str]] = {"motion": MOTION_CLASS_NAMES, "legacy": CLASS_NAMES}
DEFAULT_TASK = "motion"
#: Motion task, per frame at 128 px (scaled with the frame size): object speed range, heading jitter around the
#: class direction, largest camera pan. At the default clips (sampling_rate 2, 128 -> 112 px) an object moves
#: 2.8-4.2 px per sampled frame, the pan at most 0.44 px.
MOTION_SPEED = (1.6, 2.4)
MOTION_HEADING_JITTER = math.radians(10.0)
MOTION_MAX_PAN = 0.25
CODECS: dict[str, tuple[str, str]] = {"vp9": ("libvpx-vp9", ".webm"), "h264": ("libx264", ".mp4")}
FPS = 25
#: Keyframe interval: short GOPs make seeking to a random clip offset cheap (DALI and the CPU readers both seek).
GOP_SIZE = 16
#: Lattice step of the stored frame-0 query points, as a fraction of the frame size (16 x 16 points).
LATTICE_POINTS_PER_SIDE = 16
SHAPE_ELLIPSE, SHAPE_RECTANGLE = 0, 1
_MANIFEST = "manifest.json"
_BACKGROUND_TEXTURE_FACTOR = 2  # background texture side = factor * frame size (it wraps around)
_OBJECT_TEXTURE_SIDE = 64


class SyntheticSetError(UserError, OSError):
    """The synthetic set cannot be put where it belongs (a foreign folder in the way, an unwritable cache folder)."""


def default_cache_dir() -> Path:
    """`$TRACKMAE_CACHE_DIR` if set, else `~/.cache/trackmae_stream`."""
    env = os.environ.get("TRACKMAE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "trackmae_stream"


@dataclass
class SyntheticDataset:
    """A generated synthetic set. `videos`/`labels` cover all clips; the list files split them per class."""

    root: Path
    list_file: Path  # train list: `videos/clip_0000.webm label` lines, relative to root
    val_list_file: Path  # held-out clips (for linear probes), same format
    videos: list[Path]
    labels: list[int]
    class_names: list[str]
    num_frames: int
    size: int
    task: str = DEFAULT_TASK


@dataclass(frozen=True)
class ClipMotion:
    """Motion parameters of one clip; everything ground truth needs (appearance is not part of it)."""

    size: int
    num_frames: int
    camera_origin: np.ndarray  # (2,) world (x, y) shown at pixel (0, 0) at t = 0
    camera_velocity: np.ndarray  # (2,) px / frame
    camera_wobble_amplitude: np.ndarray  # (2,) px
    camera_wobble_period: float  # frames
    camera_wobble_phase: float  # radians
    object_shape: np.ndarray  # (K,) SHAPE_ELLIPSE or SHAPE_RECTANGLE
    object_half_axes: np.ndarray  # (K, 2) half extents (a, b) along the object's local x and y
    object_centre: np.ndarray  # (K, 2) centre at t = 0
    object_velocity: np.ndarray  # (K, 2) px / frame
    object_angle: np.ndarray  # (K,) radians at t = 0
    object_angular_velocity: np.ndarray  # (K,) radians / frame, > 0 is clockwise on screen
    object_wrap_period: float = 0.0  # > 0: each object tiles the plane with this period in x and y (motion task)

    def camera(self, t: np.ndarray) -> np.ndarray:
        """(len(t), 2) world offset of the frame at times t."""
        t = np.asarray(t, dtype=np.float64)[:, None]
        wobble = self.camera_wobble_amplitude * (
            np.sin(2 * math.pi * t / self.camera_wobble_period + self.camera_wobble_phase)
            - math.sin(self.camera_wobble_phase))
        return self.camera_origin + self.camera_velocity * t + wobble

    def object_poses(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centres (len(t), K, 2) and angles (len(t), K) of the objects at times t."""
        t = np.asarray(t, dtype=np.float64)
        centres = self.object_centre[None] + self.object_velocity[None] * t[:, None, None]
        angles = self.object_angle[None] + self.object_angular_velocity[None] * t[:, None]
        return centres, angles

    def copy_offsets(self) -> np.ndarray:
        """(M, 2) offsets of the object copies that can touch the frame: (0, 0) alone without wrapping, else the 3 x 3
        neighbourhood of the wrapped centre (enough while an object's reach is below the period)."""
        if self.object_wrap_period <= 0:
            return np.zeros((1, 2))
        steps = np.array([-1.0, 0.0, 1.0]) * self.object_wrap_period
        return np.stack(np.meshgrid(steps, steps, indexing="ij"), axis=-1).reshape(-1, 2)

    def copy_centres(self, centres: np.ndarray) -> np.ndarray:
        """(..., K, M, 2) centres of every copy of (..., K, 2) object centres (`copy_offsets`)."""
        centres = np.asarray(centres, dtype=np.float64)
        if self.object_wrap_period > 0:
            centres = np.mod(centres, self.object_wrap_period)
        return centres[..., None, :] + self.copy_offsets()

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f"motion_{f.name}": np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays, source: str = "arrays") -> ClipMotion:
        values = {}
        for f in fields(cls):
            key = f"motion_{f.name}"
            if key not in arrays and f.name == "object_wrap_period":
                continue  # written before wrapping existed: the field's default (no wrapping)
            if key not in arrays:
                raise KeyError(f"{source}: missing key {key!r} (not a synthetic tracks file of version "
                               f"{SYNTHETIC_VERSION}?)")
            value = np.asarray(arrays[key])
            if f.name in ("size", "num_frames"):
                value = int(value)
            elif f.name in ("camera_wobble_period", "camera_wobble_phase", "object_wrap_period"):
                value = float(value)
            elif f.name == "object_shape":
                value = value.astype(np.int64)
            else:
                value = value.astype(np.float64)
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class ClipAppearance:
    """Textures of one clip (float32 RGB in [0, 255], periodic so that sampling wraps without seams)."""

    background: np.ndarray  # (N, N, 3)
    objects: tuple[np.ndarray, ...]  # K x (M, M, 3)


# ----------------------------------------------------------------------------------------------- geometry

def _rotate(xy: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotate (..., 2) vectors by angle (broadcast against xy[..., 0]) with R(a) = [[cos, -sin], [sin, cos]]."""
    c, s = np.cos(angle), np.sin(angle)
    x, y = xy[..., 0], xy[..., 1]
    return np.stack([c * x - s * y, s * x + c * y], axis=-1)


def _signed_distance(local_xy: np.ndarray, shape: int, half_axes: np.ndarray) -> np.ndarray:
    """Approximate signed distance in pixels (> 0 inside) of local points to an object's outline."""
    a, b = float(half_axes[0]), float(half_axes[1])
    x, y = local_xy[..., 0], local_xy[..., 1]
    if shape == SHAPE_ELLIPSE:
        radius = np.sqrt((x / a) ** 2 + (y / b) ** 2)
        return (1.0 - radius) * min(a, b)
    return np.minimum(a - np.abs(x), b - np.abs(y))


def _topmost_cover_copy(points: np.ndarray, centres: np.ndarray, angles: np.ndarray,
                        motion: ClipMotion) -> tuple[np.ndarray, np.ndarray]:
    """Topmost object covering each point (-1: background) and which of its copies (`ClipMotion.copy_offsets`).

    points (T, P, 2); centres (T, K, 2) (unwrapped); angles (T, K) -> two (T, P) int64 arrays.
    """
    top = np.full(points.shape[:2], -1, dtype=np.int64)
    top_copy = np.zeros(points.shape[:2], dtype=np.int64)
    copies = motion.copy_centres(centres)  # (T, K, M, 2)
    for k in range(len(motion.object_shape)):  # increasing k = drawn later = on top
        # all copies at once (T, P, M); copies of one object never overlap, so at most one holds a point
        local = _rotate(points[:, :, None] - copies[:, None, k], -angles[:, None, None, k])
        inside = _signed_distance(local, int(motion.object_shape[k]), motion.object_half_axes[k]) > 0
        covered = inside.any(axis=-1)
        top[covered] = k
        top_copy[covered] = inside.argmax(axis=-1)[covered]
    return top, top_copy


def _topmost_cover(points: np.ndarray, centres: np.ndarray, angles: np.ndarray, motion: ClipMotion) -> np.ndarray:
    """Index of the topmost object covering each point, -1 for background.

    points (T, P, 2); centres (T, K, 2) (unwrapped); angles (T, K) -> (T, P) int64.
    """
    return _topmost_cover_copy(points, centres, angles, motion)[0]


def compute_tracks(motion: ClipMotion, query_xy: np.ndarray,
                   frames: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact tracks (T, P, 2) float32 and visibility (T, P) bool of points `query_xy` (P, 2) queried at frame
    `frames[0]`, at the frame numbers `frames` (T,) (default: every frame, queried at frame 0). The numbers may be
    any reals, e.g. a clip's sampled frames; the motion is defined at every time."""
    query = np.asarray(query_xy, dtype=np.float64)
    if query.ndim != 2 or query.shape[1] != 2:
        raise ValueError(f"query_xy must have shape (P, 2), got {query.shape}")
    t = np.arange(motion.num_frames) if frames is None else np.asarray(frames, dtype=np.float64).reshape(-1)
    if len(t) == 0:
        raise ValueError("frames must hold at least the query frame")
    camera = motion.camera(t)  # (T, 2)
    centres, angles = motion.object_poses(t)
    owner, owner_copy = (a[0] for a in _topmost_cover_copy(query[None], centres[:1], angles[:1], motion))  # (P,)
    start_copies = motion.copy_centres(centres[0])  # (K, M, 2)

    tracks = query[None] + camera[0] - camera[:, None]  # background points move against the camera
    for k in range(len(motion.object_shape)):
        for m in range(start_copies.shape[1]):
            on_copy = (owner == k) & (owner_copy == m)
            if not on_copy.any():
                continue
            # the copy moves with its object from where it was at frame 0 (no wrapping along the track)
            copy_centres = start_copies[k, m] + centres[:, k] - centres[0, k]  # (T, 2)
            local = _rotate(query[on_copy] - copy_centres[0], -angles[0, k])  # (p, 2) fixed on the object
            tracks[:, on_copy] = copy_centres[:, None] + _rotate(local[None], angles[:, None, k])
    size = motion.size
    inside = np.all((tracks >= -0.5) & (tracks <= size - 0.5), axis=-1)
    visible = inside & (_topmost_cover(tracks, centres, angles, motion) == owner[None])
    return tracks.astype(np.float32), visible


def lattice_queries(size: int, points_per_side: int = LATTICE_POINTS_PER_SIDE) -> np.ndarray:
    """(P, 2) float32 frame-0 lattice: the centres of a points_per_side^2 partition of the frame, row-major."""
    centres = (np.arange(points_per_side) + 0.5) * size / points_per_side - 0.5
    gy, gx = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([gx, gy], axis=-1).reshape(-1, 2).astype(np.float32)


# --------------------------------------------------------------------------------------------- appearance

def _periodic_noise(rng: np.random.Generator, side: int, channels: int, slope: float,
                    min_wavelength: float) -> np.ndarray:
    """Band-limited 1/f^slope noise (side, side, channels), zero mean, unit std per channel, periodic."""
    radius = np.sqrt(np.fft.fftfreq(side)[:, None] ** 2 + np.fft.rfftfreq(side)[None, :] ** 2)
    amplitude = np.maximum(radius, 1.0 / side) ** (-slope) * np.exp(-(radius * min_wavelength) ** 2)
    amplitude[0, 0] = 0.0
    white = rng.standard_normal((side, side, channels), dtype=np.float32)
    spectrum = np.fft.rfft2(white, axes=(0, 1)) * amplitude[..., None].astype(np.float32)
    noise = np.fft.irfft2(spectrum, s=(side, side), axes=(0, 1))
    noise -= noise.mean(axis=(0, 1))
    return noise / noise.std(axis=(0, 1))


def _colourise(rng: np.random.Generator, noise: np.ndarray, contrast: float) -> np.ndarray:
    """Map 3-channel noise to RGB around a random base colour with a random colour mixing."""
    base = rng.uniform(70, 185, size=3)
    mixing = rng.normal(0.0, 1.0, size=(3, 3)) * 0.35 + np.eye(3)
    return np.clip(base + contrast * noise @ mixing.T, 0, 255).astype(np.float32)


def _sample_appearance(rng: np.random.Generator, size: int, num_objects: int) -> ClipAppearance:
    side = _BACKGROUND_TEXTURE_FACTOR * size
    background = _colourise(rng, _periodic_noise(rng, side, 3, slope=1.0, min_wavelength=3.0), contrast=38.0)
    objects = []
    m = _OBJECT_TEXTURE_SIDE
    yy, xx = np.mgrid[0:m, 0:m].astype(np.float64)
    for _ in range(num_objects):
        noise = _periodic_noise(rng, m, 3, slope=0.5, min_wavelength=2.5)
        # Stripes with an integer number of periods (so the texture stays periodic) make rotation easy to see.
        kx, ky = rng.integers(-6, 7, size=2)
        if kx == 0 and ky == 0:
            kx = 5
        stripes = np.sin(2 * math.pi * (kx * xx + ky * yy) / m)[..., None]
        objects.append(_colourise(rng, 0.7 * noise + 0.9 * stripes, contrast=45.0))
    return ClipAppearance(background=background, objects=tuple(objects))


def _sample_motion_appearance(rng: np.random.Generator, size: int, num_objects: int) -> ClipAppearance:
    """The motion task's textures: the legacy background, and coarse object textures that scale with the frame.

    The object texture is as wide as the frame; its stripes have 1-2 periods per side (periods >= 45 px at 128 px
    frames) and its noise no detail below 1/8 of the side (16 px): an object moves far less than half a stripe
    period per sampled frame (3.2-4.8 px at 128 px), so its direction is unambiguous between two frames. (With the
    legacy object textures, periods down to ~8 px, the default ViT trained on the labels stayed at chance.)
    """
    side = _BACKGROUND_TEXTURE_FACTOR * size
    background = _colourise(rng, _periodic_noise(rng, side, 3, slope=1.0, min_wavelength=3.0), contrast=38.0)
    m = max(32, 2 * _OBJECT_TEXTURE_SIDE * size // 128)
    yy, xx = np.mgrid[0:m, 0:m].astype(np.float64)
    objects = []
    for _ in range(num_objects):
        noise = _periodic_noise(rng, m, 3, slope=1.0, min_wavelength=16.0 * size / 128)
        kx, ky = rng.integers(-2, 3, size=2)
        if kx == 0 and ky == 0:
            kx = 2
        stripes = np.sin(2 * math.pi * (kx * xx + ky * yy) / m)[..., None]
        objects.append(_colourise(rng, 0.7 * noise + 0.9 * stripes, contrast=60.0))
    return ClipAppearance(background=background, objects=tuple(objects))


def sample_clip(rng: np.random.Generator, label: int, size: int, num_frames: int,
                task: str = DEFAULT_TASK) -> tuple[ClipMotion, ClipAppearance]:
    """Draw the motion and appearance of one clip of class `label` (an index into TASKS[task])."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    if not 0 <= label < len(TASKS[task]):
        raise ValueError(f"label must be in [0, {len(TASKS[task])}), got {label}")
    if task == "motion":
        return _sample_motion_clip(rng, label, size, num_frames)
    return _sample_legacy_clip(rng, label, size, num_frames)


def _sample_motion_clip(rng: np.random.Generator, label: int, size: int,
                        num_frames: int) -> tuple[ClipMotion, ClipAppearance]:
    """The motion task: only the objects' headings depend on `label`; every other draw has one distribution."""
    scale = size / 128.0
    # Many large objects: most tokens of a clip carry the class's motion. (With 2-4 objects of 0.1-0.2 x size and a
    # pan up to 0.5 px per frame, the ViT of the default preset trained on the labels took 1000-2000+ steps to leave
    # chance; with these settings ~400, and 97% held out after 2000 steps at 64 px.)
    num_objects = int(rng.integers(4, 7))
    headings = MOTION_DIRECTIONS[MOTION_CLASS_NAMES[label]] + rng.uniform(-1, 1, size=num_objects) * \
        MOTION_HEADING_JITTER
    speeds = rng.uniform(*MOTION_SPEED, size=num_objects) * scale
    velocity = np.stack([np.cos(headings), np.sin(headings)], axis=-1) * speeds[:, None]
    # rotation is a nuisance here: random sense, up to 3 degrees per frame
    angular_velocity = rng.choice([-1.0, 1.0], size=num_objects) * np.radians(rng.uniform(0.0, 3.0, num_objects))
    # half-diagonal <= 0.24 * sqrt(2) * size < size / 2: the copies of one object never overlap
    half_axes = rng.uniform(0.12, 0.24, size=(num_objects, 2)) * size
    shapes = rng.integers(0, 2, size=num_objects)
    # Uniform over the periodic frame: translating a uniform distribution on the torus leaves it uniform, so the
    # positions in any frame say nothing about the direction of travel.
    centre = rng.uniform(0, size, size=(num_objects, 2))
    pan_heading = rng.uniform(0, 2 * math.pi)
    motion = ClipMotion(
        size=size,
        num_frames=num_frames,
        camera_origin=rng.uniform(0, _BACKGROUND_TEXTURE_FACTOR * size, size=2),
        camera_velocity=np.array([math.cos(pan_heading), math.sin(pan_heading)]) * rng.uniform(0, MOTION_MAX_PAN)
        * scale,
        camera_wobble_amplitude=rng.uniform(0.0, 0.5, size=2) * scale,
        camera_wobble_period=float(rng.uniform(12.0, 30.0)),
        camera_wobble_phase=float(rng.uniform(0, 2 * math.pi)),
        object_shape=shapes.astype(np.int64),
        object_half_axes=half_axes,
        object_centre=centre,
        object_velocity=velocity,
        object_angle=rng.uniform(0, 2 * math.pi, size=num_objects),
        object_angular_velocity=angular_velocity,
        object_wrap_period=float(size),
    )
    return motion, _sample_motion_appearance(rng, size, num_objects)


def _sample_legacy_clip(rng: np.random.Generator, label: int, size: int,
                        num_frames: int) -> tuple[ClipMotion, ClipAppearance]:
    """The legacy task (SYNTHETIC_VERSION 2's draws, unchanged)."""
    direction_name, sense_name = CLASS_NAMES[label].split("_")
    scale = size / 128.0
    num_objects = int(rng.integers(2, 4))

    heading = math.atan2(DIRECTIONS[direction_name][1], DIRECTIONS[direction_name][0])
    headings = heading + rng.uniform(-0.35, 0.35, size=num_objects)  # +-20 degrees around the class direction
    speeds = rng.uniform(0.7, 1.5, size=num_objects) * scale
    velocity = np.stack([np.cos(headings), np.sin(headings)], axis=-1) * speeds[:, None]
    angular_velocity = ROTATION_SENSES[sense_name] * np.radians(rng.uniform(2.0, 5.0, size=num_objects))
    half_axes = rng.uniform(0.09, 0.17, size=(num_objects, 2)) * size
    shapes = rng.integers(0, 2, size=num_objects)

    # Start where the centre stays inside the frame for the whole clip when the clip is short enough.
    travel = velocity * (num_frames - 1)
    margin = half_axes.max(axis=1, keepdims=True) * 0.6
    low = margin - np.minimum(travel, 0.0)
    high = size - 1 - margin - np.maximum(travel, 0.0)
    centre = np.where(low <= high, low + rng.random((num_objects, 2)) * np.maximum(high - low, 0.0),
                      (low + high) / 2)

    pan_heading = rng.uniform(0, 2 * math.pi)
    motion = ClipMotion(
        size=size,
        num_frames=num_frames,
        camera_origin=rng.uniform(0, _BACKGROUND_TEXTURE_FACTOR * size, size=2),
        camera_velocity=np.array([math.cos(pan_heading), math.sin(pan_heading)]) * rng.uniform(0.3, 1.0) * scale,
        camera_wobble_amplitude=rng.uniform(0.0, 1.5, size=2) * scale,
        camera_wobble_period=float(rng.uniform(12.0, 30.0)),
        camera_wobble_phase=float(rng.uniform(0, 2 * math.pi)),
        object_shape=shapes.astype(np.int64),
        object_half_axes=half_axes,
        object_centre=centre,
        object_velocity=velocity,
        object_angle=rng.uniform(0, 2 * math.pi, size=num_objects),
        object_angular_velocity=angular_velocity,
    )
    return motion, _sample_appearance(rng, size, num_objects)


def render_clip(motion: ClipMotion, appearance: ClipAppearance) -> np.ndarray:
    """Render the clip losslessly: uint8 (T, size, size, 3) RGB."""
    size = motion.size
    t = np.arange(motion.num_frames)
    camera = motion.camera(t)
    centres, angles = motion.object_poses(t)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    pixels = np.stack([xs, ys], axis=-1)
    # Half-diagonal (+ the soft edge) bounds an object's footprint: only its bounding box is computed.
    reach = np.sqrt((motion.object_half_axes ** 2).sum(axis=1)) + 1.5
    frames = np.empty((motion.num_frames, size, size, 3), dtype=np.uint8)
    copies = motion.copy_centres(centres)  # (T, K, M, 2)
    for i in range(motion.num_frames):
        frame = cv2.remap(appearance.background, xs + np.float32(camera[i, 0]), ys + np.float32(camera[i, 1]),
                          cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
        for k, texture in enumerate(appearance.objects):
            for copy_centre in copies[i, k]:
                x0, y0 = np.maximum(np.floor(copy_centre - reach[k]).astype(int), 0)
                x1, y1 = np.minimum(np.ceil(copy_centre + reach[k]).astype(int) + 1, size)
                if x0 >= x1 or y0 >= y1:
                    continue  # entirely outside the frame
                box = (slice(y0, y1), slice(x0, x1))
                local = _rotate(pixels[box] - copy_centre.astype(np.float32), np.float32(-angles[i, k]))
                # Soft one-pixel edge: coverage 0.5 exactly where the signed distance is 0 (the ground-truth outline).
                alpha = np.clip(_signed_distance(local, int(motion.object_shape[k]), motion.object_half_axes[k])
                                + 0.5, 0.0, 1.0)[..., None]
                centre = np.float32(texture.shape[0] / 2.0)
                colour = cv2.remap(texture, local[..., 0] + centre, local[..., 1] + centre,
                                   cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
                frame[box] = frame[box] * (1.0 - alpha) + colour * alpha
        frames[i] = np.clip(frame + 0.5, 0, 255).astype(np.uint8)
    return frames


# ---------------------------------------------------------------------------------------------- encoding

def encode_video(frames: np.ndarray, path: str | Path, codec: str = "vp9", fps: int = FPS) -> Path:
    """Encode uint8 (T, H, W, 3) RGB frames (H, W even) as VP9/.webm or H.264/.mp4.

    PyAV (libvpx-vp9 / libx264, constant quality, GOP_SIZE keyframe interval, bit-exact muxing) when it is
    installed; without it (the GPU image), VP9 falls back to OpenCV's writer (default quality, ~10x slower).
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame height and width must be even for yuv420p, got {frames.shape[1:3]}")
    path = Path(path)
    try:
        import av
    except ImportError:
        return _encode_with_opencv(frames, path, codec, fps)
    encoder, _ = CODECS[codec]
    # bitexact: no random segment UID or encoder-version string, so the same frames give the same bytes.
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = GOP_SIZE
        if codec == "vp9":
            # Constant quality, fastest real-time preset: the whole default set encodes in a few seconds.
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "18", "b": "0", "row-mt": "1"}
        else:
            stream.options = {"preset": "veryfast", "crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _encode_with_opencv(frames: np.ndarray, path: Path, codec: str, fps: int) -> Path:
    if codec != "vp9":
        raise ImportError(f"encoding {codec} needs PyAV (pip install av); without it only vp9 is available")
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"VP90"), fps,
                             (frames.shape[2], frames.shape[1]))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: neither PyAV nor OpenCV's VP9 writer is available to encode the video")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


# ------------------------------------------------------------------------------------------ ground truth

def tracks_path(video_path: str | Path) -> Path:
    """`<stem>.tracks.npz` beside a synthetic video."""
    video_path = Path(video_path)
    return video_path.with_name(video_path.stem + ".tracks.npz")


def load_motion(video_path: str | Path) -> ClipMotion:
    """The motion parameters stored beside a synthetic video."""
    path = tracks_path(video_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no ground-truth tracks file beside {video_path}")
    with np.load(path) as arrays:
        return ClipMotion.from_arrays(arrays, source=str(path))


def ground_truth_tracks(video_path: str | Path, query_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact tracks (T, P, 2) float32 and visibility (T, P) bool of arbitrary frame-0 points (P, 2) (x, y)."""
    return compute_tracks(load_motion(video_path), query_xy)


# ------------------------------------------------------------------------------------------- the data set

def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _num_held_out(count: int, val_fraction: float) -> int:
    """Held-out clips of a class of `count`: floor(count * val_fraction), but at least 1 (when val_fraction > 0 and
    the class has 2 clips or more: a 16-clip set must not get an empty validation list) and at most count - 1."""
    if val_fraction <= 0 or count < 2:
        return 0
    return min(max(1, int(count * val_fraction)), count - 1)


def _split_per_class(labels: list[int], val_fraction: float) -> list[bool]:
    """is_val flags: the last `_num_held_out` clips of each class are held out."""
    is_val = [False] * len(labels)
    for label in sorted(set(labels)):
        members = [i for i, lab in enumerate(labels) if lab == label]
        for i in members[len(members) - _num_held_out(len(members), val_fraction):]:
            is_val[i] = True
    return is_val


#: Key of the motion task's per-clip generators: [seed, _MOTION_STREAM, split (0 train, 1 val), class, number of the
#: clip within its class and split]. Clips do not depend on the set's size: a larger set (or split) extends a
#: smaller one, and the held-out clips of one split are the same whatever num_videos holds beside them.
_MOTION_STREAM = 1


def _clip_seeds(params: dict, labels: list[int], is_val: list[bool]) -> list[np.random.SeedSequence]:
    """The generator key of every clip (legacy: [seed, index], as SYNTHETIC_VERSION 2 drew them)."""
    if params["task"] == "legacy":
        return [np.random.SeedSequence([params["seed"], index]) for index in range(len(labels))]
    seen: dict[tuple[int, bool], int] = {}
    seeds = []
    for label, held_out in zip(labels, is_val):
        number = seen.get((label, held_out), 0)
        seen[label, held_out] = number + 1
        seeds.append(np.random.SeedSequence([params["seed"], _MOTION_STREAM, int(held_out), label, number]))
    return seeds


def _generate_into(folder: Path, params: dict) -> None:
    """Render, encode and describe every clip into `folder` (which must exist), manifest last."""
    _, extension = CODECS[params["codec"]]
    (folder / "videos").mkdir()
    size, num_frames, task = params["size"], params["num_frames"], params["task"]
    class_names = TASKS[task]
    queries = lattice_queries(size)
    labels = [index % len(class_names) for index in range(params["num_videos"])]
    is_val = _split_per_class(labels, params["val_fraction"])
    relative_videos = []
    log.info("generating the synthetic set (task %s, %d clips of %d frames at %d px) in %s", task, len(labels),
             num_frames, size, folder.parent)
    for index, (label, seed) in enumerate(zip(labels, _clip_seeds(params, labels, is_val))):
        rng = np.random.default_rng(seed)
        motion, appearance = sample_clip(rng, label, size, num_frames, task=task)
        relative = f"videos/clip_{index:04d}{extension}"
        encode_video(render_clip(motion, appearance), folder / relative, params["codec"])
        tracks, visible = compute_tracks(motion, queries)
        np.savez(tracks_path(folder / relative), query_xy=queries, tracks=tracks, visible=visible,
                 label=np.int64(label), **motion.to_arrays())
        relative_videos.append(relative)

    for name, wanted in (("train.list", False), ("val.list", True)):
        lines = [f"{rel} {lab}\n" for rel, lab, val in zip(relative_videos, labels, is_val) if val == wanted]
        (folder / name).write_text("".join(lines))
    (folder / "classes.txt").write_text("".join(f"{name}\n" for name in class_names))

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = {
        "version": SYNTHETIC_VERSION,
        "params": params,
        "class_names": class_names,
        "videos": relative_videos,
        "labels": labels,
        "files": {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _file_digest(p)}
                  for p in files},
    }
    (folder / _MANIFEST).write_text(json.dumps(manifest, indent=1))


def _load_if_valid(root: Path, params: dict) -> SyntheticDataset | None:
    """The data set at `root` if its manifest matches `params` and every file is intact, else None."""
    try:
        manifest = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != SYNTHETIC_VERSION or manifest.get("params") != params:
        return None
    for relative, record in manifest.get("files", {}).items():
        path = root / relative
        try:
            if path.stat().st_size != record["bytes"] or _file_digest(path) != record["sha256"]:
                return None
        except OSError:
            return None
    return SyntheticDataset(
        root=root,
        list_file=root / "train.list",
        val_list_file=root / "val.list",
        videos=[root / rel for rel in manifest["videos"]],
        labels=[int(label) for label in manifest["labels"]],
        class_names=list(manifest["class_names"]),
        num_frames=params["num_frames"],
        size=params["size"],
        task=params["task"],
    )


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Inter-process lock (e.g. two torchrun ranks on one machine generating the same set)."""
    with open(lock_path, "a+") as handle:  # open() honours the umask, like every file written here
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fresh_folder(parent: Path, prefix: str) -> Path:
    """A new, empty folder `parent/<prefix><pid>-<random>`. Unlike tempfile.mkdtemp (always 0700), os.mkdir applies
    the user's umask, so the set renamed into place is as readable as any other folder the user creates."""
    while True:
        folder = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def _remove_leftovers(root: Path) -> None:
    """Delete the staging and trash folders of generations of `root` that were killed (the caller holds the lock, so
    no live process owns them)."""
    for pattern in (f".{root.name}.tmp-*", f".{root.name}.old-*"):
        for leftover in root.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _refuse_foreign(root: Path) -> None:
    """Raise SyntheticSetError when `root` holds something other than a generated set (it is never overwritten)."""
    if root.is_file() or (root.is_dir() and not (root / _MANIFEST).exists() and any(root.iterdir())):
        raise SyntheticSetError(f"{root}: exists, is not empty and has no {_MANIFEST}; refusing to overwrite it "
                                "with the synthetic data set (move it away or choose another data.synthetic_dir)")


def _replace_folder(new: Path, root: Path) -> None:
    """Put `new` at `root`, moving aside a broken generated set of the same parameters (never a foreign folder).

    A folder cannot be renamed over a non-empty one, so the old set goes to a trash folder first; a reader without
    the lock that looks in between finds no manifest, takes the lock and waits for the new set.
    """
    if root.exists():
        _refuse_foreign(root)
        trash = _fresh_folder(root.parent, f".{root.name}.old-")
        os.replace(root, trash / "set")
        os.replace(new, root)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(new, root)


def _params(num_videos: int, size: int, num_frames: int, seed: int, codec: str, val_fraction: float,
            task: str) -> dict:
    """The generation parameters, validated, as the manifest records them (and the folder name hashes them)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}")
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    if size < 32 or size % 2:
        raise ValueError(f"size must be an even number >= 32, got {size}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2, got {num_frames}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return {"num_videos": int(num_videos), "size": int(size), "num_frames": int(num_frames), "seed": int(seed),
            "codec": codec, "val_fraction": float(val_fraction), "task": task}


def _set_name(params: dict) -> str:
    """`synthetic-v<version>-<10 hex digits of the parameters' hash>`: one folder per parameter set and version."""
    key = json.dumps({"version": SYNTHETIC_VERSION, **params}, sort_keys=True)
    return f"synthetic-v{SYNTHETIC_VERSION}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _is_set_of(folder: Path, params: dict) -> bool:
    """Whether `folder` is itself a set of these parameters (its manifest says so, intact or not)."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("version") == SYNTHETIC_VERSION and \
        manifest.get("params") == params


def synthetic_set_dir(cache_dir: str | Path | None = None, *, num_videos: int = 48, size: int = 128,
                      num_frames: int = 40, seed: int = 0, codec: str = "vp9", val_fraction: float = 0.25,
                      task: str = DEFAULT_TASK) -> Path:
    """The folder of the set with these parameters: `<cache_dir>/synthetic-v<version>-<hash>` (cache_dir default:
    `default_cache_dir()`), or `cache_dir` itself when it already is that set (a set's own folder given back)."""
    params = _params(num_videos, size, num_frames, seed, codec, val_fraction, task)
    return _set_dir(cache_dir, params)


def _set_dir(cache_dir: str | Path | None, params: dict) -> Path:
    cache = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()).absolute()
    return cache if _is_set_of(cache, params) else cache / _set_name(params)


def ensure_synthetic_dataset(cache_dir: str | Path | None = None, *, num_videos: int = 48, size: int = 128,
                             num_frames: int = 40, seed: int = 0, codec: str = "vp9",
                             val_fraction: float = 0.25, task: str = DEFAULT_TASK) -> SyntheticDataset:
    """The synthetic set with these parameters, generated on first use in its own folder (`synthetic_set_dir`).

    `task` names what decides the class ("motion", the default, or "legacy": see the module's docstring). The
    last `val_fraction` of each class's clips (at least one of every class with two or more) form `val.list`, the
    set's fixed evaluation split.

    Each parameter set (and generator version) has its own folder, so a run asking for another set never touches the
    one a concurrent run reads. A manifest records the parameters, the version and every file's size and SHA-256; a
    set with a missing or corrupt file is regenerated. Generation runs under an exclusive lock file beside the folder
    (concurrent callers of the same set wait for one generation), writes into a temporary folder and renames it into
    place, so a reader never sees half a set; reading a complete set takes no lock. Folders and files honour the
    umask. Leftovers of a killed generation are removed by the next one.
    """
    params = _params(num_videos, size, num_frames, seed, codec, val_fraction, task)
    root = _set_dir(cache_dir, params)
    dataset = _load_if_valid(root, params)
    if dataset is not None:
        return dataset
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(root.parent / f".{root.name}.lock"):
            dataset = _load_if_valid(root, params)  # another process may have finished while we waited
            if dataset is not None:
                return dataset
            _remove_leftovers(root)
            _refuse_foreign(root)  # before generating, not after
            staging = _fresh_folder(root.parent, f".{root.name}.tmp-")
            try:
                _generate_into(staging, params)
                _replace_folder(staging, root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:  # a full disk, a read-only or foreign cache folder: say which folder
        if isinstance(error, SyntheticSetError):
            raise
        raise SyntheticSetError(f"{root}: cannot generate the synthetic data set there ({error}); free space or "
                                "set data.synthetic_dir / $TRACKMAE_CACHE_DIR to a writable folder") from error
    dataset = _load_if_valid(root, params)
    if dataset is None:
        raise RuntimeError(f"{root}: the synthetic data set failed its own check right after generation")
    return dataset
