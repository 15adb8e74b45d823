"""The synthetic tasks: in the "motion" task a single frame (pixels, or the objects' true positions) says nothing
about the class while two frames do, and the same measurement finds the legacy task's frame-0 leak; the wrapping
geometry; the task and the split as parts of the set.

The probes here are the probe's own logistic regression (`fit_linear_probe`) on clips rendered in memory (no
encoding), half for fitting and half held out; "at chance" means that chance lies inside the 99% Wilson interval of
the held-out accuracy, "above chance" that the interval's lower end lies above twice chance.
"""
from __future__ import annotations

import dataclasses
import json
import math

import cv2
import numpy as np
import pytest
import torch

from trackmae_stream.data import read_video_list
from trackmae_stream.data.synthetic import (
    CLASS_NAMES,
    DIRECTIONS,
    MOTION_CLASS_NAMES,
    MOTION_SPEED,
    ROTATION_SENSES,
    SHAPE_RECTANGLE,
    TASKS,
    ClipMotion,
    ensure_synthetic_dataset,
    load_motion,
    render_clip,
    sample_clip,
    synthetic_set_dir,
)
from trackmae_stream.data.synthetic import compute_tracks as exact_tracks
from trackmae_stream.probe import fit_linear_probe, wilson_interval

Z99 = 2.5758293035489
SIZE, FRAMES = 64, 40  # the default set's geometry (128 px, 40 frames) at half the side: the same travel / size
NUM_CLIPS = 400


def frame_at(motion: ClipMotion, appearance, t: int) -> np.ndarray:
    """Frame t of a clip rendered alone (the scene advanced by t frames, rendered as a 1-frame clip)."""
    phase = motion.camera_wobble_phase + 2 * math.pi * t / motion.camera_wobble_period
    shifted = dataclasses.replace(motion, num_frames=1, camera_origin=motion.camera(np.array([t]))[0],
                                  camera_wobble_phase=phase,
                                  object_centre=motion.object_centre + motion.object_velocity * t,
                                  object_angle=motion.object_angle + motion.object_angular_velocity * t)
    return render_clip(shifted, appearance)[0]


def pixel_features(frame: np.ndarray) -> np.ndarray:
    """A single frame: 8 x 8 colour thumbnail and a 4 x 4 map of gradient energy (where the striped objects are)."""
    grey = frame.astype(np.float32).mean(-1)
    thumb = cv2.resize(frame.astype(np.float32), (8, 8), interpolation=cv2.INTER_AREA).ravel() / 255
    energy = np.gradient(grey, axis=1) ** 2 + np.gradient(grey, axis=0) ** 2
    return np.concatenate([thumb, np.log1p(cv2.resize(energy, (4, 4), interpolation=cv2.INTER_AREA).ravel())])


def motion_energy(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Two frames: the global Lucas-Kanade normal-equation flow (-sum It Ix / sum Ix^2, -sum It Iy / sum Iy^2)."""
    a, b = (cv2.GaussianBlur(f.astype(np.float32).mean(-1), (0, 0), 1.5) for f in (first, second))
    gx, gy = np.gradient((a + b) / 2, axis=1), np.gradient((a + b) / 2, axis=0)
    it = b - a
    return np.array([-(it * gx).sum() / (gx ** 2).sum(), -(it * gy).sum() / (gy ** 2).sum()])


def centre_features(motion: ClipMotion) -> np.ndarray:
    """Frame-0 object centres (where they are drawn): their mean and a 3 x 3 occupancy histogram."""
    centres = np.mod(motion.object_centre, motion.size) if motion.object_wrap_period else motion.object_centre
    histogram = np.histogram2d(centres[:, 0], centres[:, 1], bins=3, range=[[0, motion.size]] * 2)[0]
    return np.concatenate([centres.mean(0) / motion.size, histogram.ravel()])


def held_out_accuracy(features: list[np.ndarray], labels: list[int]) -> tuple[float, tuple[float, float]]:
    x, y = torch.tensor(np.stack(features)), torch.tensor(labels)
    half = len(y) // 2
    result = fit_linear_probe(x[:half], y[:half], x[half:], y[half:], weight_decay=1e-2)
    return result.top1, wilson_interval(result.val_correct, result.num_val, z=Z99)


def assert_at_chance(features, labels, chance):
    top1, (low, high) = held_out_accuracy(features, labels)
    assert low <= chance <= high, (top1, low, high)


def assert_above_chance(features, labels, chance):
    top1, (low, high) = held_out_accuracy(features, labels)
    assert low > 2 * chance, (top1, low, high)


def test_motion_task_frame_0_is_the_same_for_every_class():
    """Only the headings depend on the label, and they are drawn from the same numbers for every label: from one
    generator, every class gives the same frame 0 (pixels and scene), so frame 0 carries no information at all."""
    for seed in range(3):
        scenes = [sample_clip(np.random.default_rng(seed), label, SIZE, FRAMES, task="motion")
                  for label in range(len(MOTION_CLASS_NAMES))]
        first_motion, first_appearance = scenes[0]
        first_frame = frame_at(first_motion, first_appearance, 0)
        for motion, appearance in scenes[1:]:
            np.testing.assert_array_equal(frame_at(motion, appearance, 0), first_frame)
            for field in dataclasses.fields(ClipMotion):
                if field.name != "object_velocity":
                    np.testing.assert_array_equal(getattr(motion, field.name), getattr(first_motion, field.name))
            assert not np.array_equal(motion.object_velocity, first_motion.object_velocity)


@pytest.fixture(scope="module")
def motion_clips():
    """NUM_CLIPS motion-task clips (balanced): (motion, frame 0, frame 2, frame 20, last frame, label)."""
    clips = []
    for i in range(NUM_CLIPS):
        label = i % len(MOTION_CLASS_NAMES)
        motion, appearance = sample_clip(np.random.default_rng([5, i]), label, SIZE, FRAMES, task="motion")
        frames = render_clip(dataclasses.replace(motion, num_frames=3), appearance)
        clips.append((motion, frames[0], frames[2], frame_at(motion, appearance, FRAMES // 2),
                      frame_at(motion, appearance, FRAMES - 1), label))
    return clips


def test_motion_task_later_single_frames_are_at_chance_two_frames_are_not(motion_clips):
    """Later frames differ between classes (the objects moved), but not in distribution: uniform positions on the
    periodic frame stay uniform. (Measured held-out accuracy over 200 clips: frame 20 12%, frame 39 13%, true
    frame-0 positions 13%; two frames 99%, the true displacement 100%.)"""
    labels = [clip[-1] for clip in motion_clips]
    chance = 1 / len(MOTION_CLASS_NAMES)
    assert_at_chance([pixel_features(clip[3]) for clip in motion_clips], labels, chance)  # the middle frame
    assert_at_chance([pixel_features(clip[4]) for clip in motion_clips], labels, chance)  # the last frame
    assert_at_chance([centre_features(clip[0]) for clip in motion_clips], labels, chance)  # true frame-0 positions
    # the measurement can tell: two frames 2 apart, and the true displacement (~100%)
    assert_above_chance([motion_energy(clip[1], clip[2]) for clip in motion_clips], labels, chance)
    displacement = [clip[0].object_velocity.mean(0) for clip in motion_clips]
    assert_above_chance(displacement, labels, chance)


def test_the_same_measurement_finds_the_legacy_leak():
    """Legacy objects start where they stay in frame: frame 0 tells the direction (the issue's 68%)."""
    pixels, centres, directions = [], [], []
    for i in range(NUM_CLIPS):
        label = i % len(CLASS_NAMES)
        motion, appearance = sample_clip(np.random.default_rng([6, i]), label, SIZE, FRAMES, task="legacy")
        pixels.append(pixel_features(frame_at(motion, appearance, 0)))
        centres.append(centre_features(motion))
        directions.append(label // len(ROTATION_SENSES))  # the direction part of the class
    chance = 1 / len(DIRECTIONS)
    top1, (low, _) = held_out_accuracy(centres, directions)
    assert low > 1.8 * chance, top1  # measured 0.705 (chance 0.25)
    top1, (low, _) = held_out_accuracy(pixels, directions)
    assert low > 1.2 * chance, top1  # measured 0.445


def test_motion_is_visible_at_the_default_clip_resolution():
    """Every object moves >= 2.8 px per sampled frame of the default clips (rate 2, 128 px set -> 112 px input),
    within 10 degrees of its class's direction, whatever the frame size."""
    assert MOTION_SPEED[0] * 2 * 112 / 128 >= 2.8
    for size in (64, 128):
        for label, name in enumerate(MOTION_CLASS_NAMES):
            motion, _ = sample_clip(np.random.default_rng(label), label, size, 40, task="motion")
            speed = np.linalg.norm(motion.object_velocity, axis=1) * 128 / size
            assert np.all((speed >= MOTION_SPEED[0]) & (speed <= MOTION_SPEED[1]))
            angle = np.degrees(np.arctan2(motion.object_velocity[:, 1], motion.object_velocity[:, 0]))
            assert np.all(np.abs((angle - 45 * label + 180) % 360 - 180) <= 10 + 1e-9), name
            assert motion.object_wrap_period == size


def _one_square(size: int = 64) -> ClipMotion:
    """One 16 x 16 square straddling the right edge (centre x = 60), moving right 2 px per frame, static camera."""
    zero = np.zeros(2)
    return ClipMotion(size=size, num_frames=9, camera_origin=zero, camera_velocity=zero,
                      camera_wobble_amplitude=zero, camera_wobble_period=20.0, camera_wobble_phase=0.0,
                      object_shape=np.array([SHAPE_RECTANGLE]), object_half_axes=np.array([[8.0, 8.0]]),
                      object_centre=np.array([[60.0, 30.0]]), object_velocity=np.array([[2.0, 0.0]]),
                      object_angle=np.zeros(1), object_angular_velocity=np.zeros(1),
                      object_wrap_period=float(size))


def test_wrapped_objects_reenter_and_their_points_leave_the_frame():
    motion = _one_square()
    flat = type("Flat", (), {})()
    flat.background = np.zeros((128, 128, 3), np.float32)
    flat.objects = (np.full((64, 64, 3), 200.0, np.float32),)
    frames = render_clip(motion, flat)
    # frame 0: the square covers 52 < x < 68 (the outline pixels 52 and 68 are half covered): columns 53..63 and,
    # through the copy at -4, 0..3
    assert (frames[0, 30, :, 0] > 100).nonzero()[0].tolist() == list(range(0, 4)) + list(range(53, 64))
    # frame 8: centre 76 (out of the frame), its copy at 12 covers 4 < x < 20
    assert (frames[8, 30, :, 0] > 100).nonzero()[0].tolist() == list(range(5, 20))

    queries = np.array([[1.0, 30.0], [62.0, 30.0], [30.0, 30.0], [10.0, 30.0]])  # copy, object, background x 2
    tracks, visible = exact_tracks(motion, queries)
    np.testing.assert_allclose(tracks[:, 0, 0], 1.0 + 2 * np.arange(9))  # the entering copy carries its point
    assert visible[:, 0].all()
    np.testing.assert_allclose(tracks[:, 1, 0], 62.0 + 2 * np.arange(9))  # leaves at the right: no jump back
    assert visible[:, 1].tolist() == [True] * 1 + [False] * 8  # 64 > 63.5 from frame 1 on
    assert visible[:, 2].all()  # background never covered
    # background at x = 10 is covered once the copy (centre -4 + 2t) comes within 8 px: from t = 4 on
    assert visible[:, 3].tolist() == [True] * 4 + [False] * 5


TINY = dict(size=32, num_frames=4, seed=11)


def test_task_is_part_of_the_set_and_legacy_keeps_its_classes(tmp_path):
    motion = ensure_synthetic_dataset(tmp_path, num_videos=8, **TINY)
    legacy = ensure_synthetic_dataset(tmp_path, num_videos=8, task="legacy", **TINY)
    assert motion.root != legacy.root and motion.root.parent == legacy.root.parent == tmp_path
    assert synthetic_set_dir(tmp_path, num_videos=8, task="legacy", **TINY) == legacy.root
    assert (motion.task, motion.class_names) == ("motion", MOTION_CLASS_NAMES)
    assert (legacy.task, legacy.class_names) == ("legacy", CLASS_NAMES)
    assert json.loads((legacy.root / "manifest.json").read_text())["params"]["task"] == "legacy"
    assert (legacy.root / "classes.txt").read_text().split() == CLASS_NAMES
    for path, label in zip(legacy.videos, legacy.labels):
        found = load_motion(path)
        direction, sense = CLASS_NAMES[label].split("_")
        cosine = found.object_velocity @ np.array(DIRECTIONS[direction]) / np.linalg.norm(found.object_velocity,
                                                                                          axis=1)
        assert np.all(cosine > np.cos(np.radians(25)))
        assert np.all(np.sign(found.object_angular_velocity) == ROTATION_SENSES[sense])
        assert found.object_wrap_period == 0.0
    with pytest.raises(ValueError, match="task"):
        ensure_synthetic_dataset(tmp_path, num_videos=8, task="colour", **TINY)
    assert set(TASKS) == {"motion", "legacy"}


def test_every_class_with_two_clips_is_held_out_and_held_out_clips_do_not_depend_on_the_set_size(tmp_path):
    small = ensure_synthetic_dataset(tmp_path, num_videos=16, val_fraction=0.25, **TINY)  # 2 per class
    large = ensure_synthetic_dataset(tmp_path, num_videos=24, val_fraction=0.25, **TINY)  # 3 per class
    for dataset in (small, large):
        val = read_video_list(dataset.val_list_file, dataset.root)
        assert sorted(r.label for r in val) == list(range(8))  # int(0.25 * 2) = 0 would have left it empty
    # the motion task keys clips by (split, class, number): the held-out clips of both sets are the same scenes
    small_val = read_video_list(small.val_list_file, small.root)
    large_val = read_video_list(large.val_list_file, large.root)
    for a, b in zip(sorted(small_val, key=lambda r: r.label), sorted(large_val, key=lambda r: r.label)):
        np.testing.assert_array_equal(load_motion(a.path).object_centre, load_motion(b.path).object_centre)
    tiny = ensure_synthetic_dataset(tmp_path, num_videos=3, **TINY)  # 1 clip per class: nothing to hold out
    assert tiny.val_list_file.read_text() == "" and len(read_video_list(tiny.list_file, tiny.root)) == 3
