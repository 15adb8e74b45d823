"""tracker.placement=store end to end: a cold store is filled on the fly and counted as misses, a second run reads
every window back (no tracker work), `precompute` fills the store ahead and is resumable, and what the trainer trains
on from the store is the remap of what the tracker returned on the whole frame."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import SYN, tiny

from trackmae_stream.config import load_config
from trackmae_stream.data import ensure_synthetic_dataset
from trackmae_stream.data_setup import build_data
from trackmae_stream.distributed import DistInfo
from trackmae_stream.engine import train
from trackmae_stream.pipeline import build_batch_preparer
from trackmae_stream.tracks.source import open_store

REPO = Path(__file__).resolve().parents[1]
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "set", **SYN)


def store_args(synthetic, tmp_path, **extra) -> list[str]:
    return tiny(synthetic, tmp_path, **{"tracker.placement": "store", "tracker.store_path": str(tmp_path / "store"),
                                        "tracker.windows_per_video": 2, "tracker.store_grid": 8,
                                        "tracker.store_size": 64, "log_every": 1, "ckpt_every": 100,
                                        # the official normalised target at rate 2: the loss bounds below were
                                        # measured there (pixel-unit LK steps that leave the frame dwarf them)
                                        "data.sampling_rate": 2, "target.motion_norm": "patch", **extra})


def records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_cold_store_fills_then_a_second_run_reads_it_back(synthetic, tmp_path):
    cold = train(load_config("default", store_args(synthetic, tmp_path, **{"optim.max_steps": 8, "run_name": "a"})))
    logged = records(cold.run_dir)
    misses = sum(r["store_misses"] for r in logged)
    hits = sum(r["store_hits"] for r in logged)
    assert misses > 0 and hits + misses == 8 * 4  # every sample looked up once
    assert misses <= SYN["num_videos"] * 2  # a window is tracked at most once
    assert all(np.isfinite(r["loss"]) for r in logged)
    # The same run again: the data order repeats, so every window it needs is stored: no tracking at all.
    warm = train(load_config("default", store_args(synthetic, tmp_path, **{"optim.max_steps": 8, "run_name": "b"})))
    logged_warm = records(warm.run_dir)
    assert sum(r["store_misses"] for r in logged_warm) == 0 and sum(r["store_hits"] for r in logged_warm) == 32
    # Same clips and masks; targets equal up to the stored coordinates' rounding (which the per-token normalisation
    # amplifies): the first step's loss agrees closely, and the runs stay close after it.
    first = [r["loss"] for r in logged]
    again = [r["loss"] for r in logged_warm]
    assert abs(first[0] - again[0]) < 1e-2 * first[0], (first, again)  # measured 2e-4 and 2.4e-3 on two sets
    assert np.allclose(first, again, rtol=2e-2), (first, again)


def test_store_tracks_are_the_remap_of_whole_frame_tracking(synthetic, tmp_path):
    """The batch's tracks from a warm store equal, at the clip's query points, the tracker's own tracks of the whole
    stored frames interpolated and mapped into the clip: checked against an independent recomputation here."""
    from trackmae_stream.config import tracker_grid_size
    from trackmae_stream.tracking import query_grid
    from trackmae_stream.tracks.remap import remap_to_clip
    from trackmae_stream.tracks.source import track_store_frames

    cfg = load_config("default", store_args(synthetic, tmp_path, **{"data.num_workers": 0}))
    data = build_data(cfg, CPU, torch.device("cpu"))
    preparer = build_batch_preparer(cfg, torch.device("cpu"))
    batch = next(iter(data.loader))
    assert not bool(batch["stored_hit"].any()) and batch["store_frames"].shape[0] == cfg.batch_size
    got = preparer.track_source(batch, batch["frames"])
    tracks, vis = track_store_frames(preparer.tracker, batch["store_frames"], cfg.tracker.store_grid)
    side = cfg.data.input_size
    queries = query_grid(tracker_grid_size(cfg), side, side, preparer.tracker.grid_rule)
    want, want_vis = remap_to_clip(tracks, vis, cfg.tracker.store_grid, queries, batch["crop_box"], batch["flipped"],
                                   batch["source_size"], side)
    torch.testing.assert_close(got.tracks, want, atol=1e-4, rtol=0)
    # read back from the store (written by the call above): equal up to the stored rounding
    data.close()
    data = build_data(cfg, CPU, torch.device("cpu"))
    batch = next(iter(data.loader))
    assert bool(batch["stored_hit"].all())
    again = preparer.track_source(batch, batch["frames"])
    # the store keeps normalised positions within a frame of the frame ([-1, 2], tracks/store.py) and clamps the
    # rest: Lucas-Kanade sends a few points on the fast synthetic objects many frames away; compare with those clamped
    want, _ = remap_to_clip(tracks.clamp(-1.0, 2.0), vis, cfg.tracker.store_grid, queries, batch["crop_box"],
                            batch["flipped"], batch["source_size"], side)
    assert (again.tracks - want).abs().max() < 0.05  # clip pixels; the store's fixed point step is far finer
    data.close()


def test_precompute_fills_ahead_and_resumes(synthetic, tmp_path):
    args = store_args(synthetic, tmp_path)
    cmd = [sys.executable, "-m", "trackmae_stream.tracks", "precompute", "--no-progress", *args]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    from trackmae_stream.data_setup import video_records

    total = len(video_records(load_config("default", args))[0]) * 2  # the training list's videos x K windows
    assert f"done: {total} windows, {total} tracked now, 0 already stored, 0 unreadable" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert f"done: {total} windows, 0 tracked now, {total} already stored" in again.stdout
    # a run on the filled store tracks nothing
    run = train(load_config("default", store_args(synthetic, tmp_path, **{"optim.max_steps": 4, "run_name": "p"})))
    logged = records(run.run_dir)
    assert sum(r["store_misses"] for r in logged) == 0 and sum(r["store_hits"] for r in logged) == 16
    store = open_store(load_config("default", args), readonly=True)
    assert all(store.contains(str(rec), w, idx) for rec, w, idx in _stored_keys(load_config("default", args)))


def _stored_keys(cfg):
    """Every (video, window, stored frame numbers) of the run's list, computed independently of precompute."""
    from trackmae_stream.data import open_video
    from trackmae_stream.data_setup import video_records
    from trackmae_stream.tracks.windows import stored_frame_positions, window_frame_indices

    positions = stored_frame_positions(cfg.data.num_frames, cfg.model.tubelet_size)
    for record in video_records(cfg)[0]:
        with open_video(record.path, cfg.data.decoder) as reader:
            available = reader.num_frames
        for window in range(cfg.tracker.windows_per_video):
            indices = window_frame_indices(available, cfg.data.num_frames, cfg.data.sampling_rate,
                                           cfg.tracker.windows_per_video, window)[positions].tolist()
            yield record.path, window, indices


def test_precompute_killed_midway_loses_nothing_and_the_rerun_finishes(synthetic, tmp_path):
    """kill -9 during a precompute: every entry written before the kill stays readable, and the rerun tracks only
    the rest (batch_size 1: one commit per window, so the kill lands between commits)."""
    import os
    import signal
    import time

    from trackmae_stream.data_setup import video_records

    args = store_args(synthetic, tmp_path, batch_size=1)
    cmd = [sys.executable, "-m", "trackmae_stream.tracks", "precompute", "--no-progress", *args]
    total = len(video_records(load_config("default", args))[0]) * 2
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    store_dir = tmp_path / "store"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        written = sum(1 for _ in _stored_present(load_config("default", args)))
        if written >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "precompute finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before = sum(1 for _ in _stored_present(load_config("default", args)))
    assert 2 <= before < total and store_dir.is_dir()
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    done = [line for line in rerun.stdout.splitlines() if line.startswith("done:")][0]
    tracked, present = int(done.split(", ")[1].split()[0]), int(done.split(", ")[2].split()[0])
    assert present >= before and tracked + present == total, done
    assert sum(1 for _ in _stored_present(load_config("default", args))) == total


def _stored_present(cfg):
    store = open_store(cfg, readonly=True)
    try:
        for video, window, indices in _stored_keys(cfg):
            if store.contains(str(video), window, indices):
                yield video
    finally:
        store.close()
