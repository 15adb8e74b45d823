"""tracker.backend=synthetic_gt: exact tracks of the clip's own query grid through crop, resize and mirror.

Checked independently of the code under test: (1) re-querying a track at a later frame continues the same track
(the exact motion is consistent in time); (2) photometric consistency on the decoded, augmented clips the loader
produces: the colour under a visible ground-truth point stays the colour it had in the clip's first frame, far more so
than under the tracks of a wrong geometry (the mirror ignored) or of no motion; (3) a few training steps run with it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trackmae_stream.config import ConfigError, load_config
from trackmae_stream.data import VideoClipDataset, read_video_list
from trackmae_stream.data.synthetic import compute_tracks, ensure_synthetic_dataset, lattice_queries, load_motion
from trackmae_stream.tracking import build_tracker
from trackmae_stream.tracking.synthetic_gt import SyntheticTrackSource, clip_tracks

SYN = dict(num_videos=9, size=64, num_frames=24)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "set", **SYN)


def test_requerying_a_visible_point_later_continues_its_track(synthetic):
    motion = load_motion(synthetic.videos[3])
    queries = lattice_queries(SYN["size"], 11)
    tracks, visible = compute_tracks(motion, queries)
    assert np.array_equal(compute_tracks(motion, queries, frames=np.arange(SYN["num_frames"]))[0], tracks)
    start = 7
    frames = np.arange(start, SYN["num_frames"], 3)
    keep = visible[start] & visible[frames].all(axis=0)
    assert keep.sum() >= 20
    later, later_visible = compute_tracks(motion, tracks[start, keep], frames=frames)
    np.testing.assert_allclose(later, tracks[frames][:, keep], atol=1e-3)
    assert later_visible.all()


def _bilinear(frame: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """float64 bilinear colour (P, 3) of a (H, W, 3) frame at pixel-centre coordinates xy (P, 2), inside the frame."""
    h, w = frame.shape[:2]
    x = np.clip(xy[:, 0], 0, w - 1.000001)
    y = np.clip(xy[:, 1], 0, h - 1.000001)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    f = frame.astype(np.float64)
    return ((1 - fx) * (1 - fy) * f[y0, x0] + fx * (1 - fy) * f[y0, x0 + 1] + (1 - fx) * fy * f[y0 + 1, x0]
            + fx * fy * f[y0 + 1, x0 + 1])


def _colour_drift(clips: np.ndarray, tracks: np.ndarray, visible: np.ndarray) -> float:
    """Mean |colour(t) - colour(0)| under visible points inside the clip, over the sampled frames after the first."""
    errors = []
    for clip, trk, vis in zip(clips, tracks, visible):
        ref = _bilinear(clip[0], trk[0])
        size = clip.shape[1]
        for t in range(1, len(trk)):
            ok = vis[t] > 0.5
            ok &= np.all((trk[t] >= 1) & (trk[t] <= size - 2), axis=-1) & np.all((trk[0] >= 1) & (trk[0] <= size - 2),
                                                                              axis=-1)
            errors.append(np.abs(_bilinear(clip[t], trk[t][ok]) - ref[ok]).mean(axis=1))
    return float(np.concatenate(errors).mean())


def test_tracks_follow_the_decoded_augmented_clip(synthetic):
    records = read_video_list(synthetic.list_file, synthetic.root)
    input_size, tubelet = 48, 2
    dataset = VideoClipDataset(records, num_frames=8, sampling_rate=2, input_size=input_size, seed=5, flip=True,
                               scales=(1.0, 0.875, 0.75, 0.66))
    items = [dataset[i] for i in range(len(records))]
    batch = {key: torch.cat([item[key] for item in items]) for key in ("frames", "frame_indices", "crop_box",
                                                                         "flipped")}
    batch["source_index"] = torch.stack([item["source_index"] for item in items])
    assert batch["flipped"].any() and not batch["flipped"].all(), "the draw should mirror some clips and not others"
    assert (batch["crop_box"][:, 2] < SYN["size"]).any(), "the draw should crop some clips"
    source = SyntheticTrackSource([str(r.path) for r in records], grid_size=9, grid_rule="patch_centred",
                                  tubelet=tubelet, input_size=input_size, device=torch.device("cpu"))
    out = source(batch, batch["frames"])
    assert out.tracks.shape == (len(records), 4, 81, 2) and out.visibility.shape == (len(records), 4, 81)
    clips = batch["frames"].numpy()[:, ::tubelet]
    tracks, visible = out.tracks.numpy(), out.visibility.numpy()
    assert 0.3 < visible.mean() < 1.0

    exact = _colour_drift(clips, tracks, visible)
    frozen = _colour_drift(clips, np.repeat(tracks[:, :1], tracks.shape[1], axis=1), visible)
    # the mirror ignored: a wrong geometry that still starts at the right points
    wrong = []
    for i in range(len(records)):
        trk, _ = clip_tracks(load_motion(records[int(batch["source_index"][i])].path), tracks[i, 0],
                             batch["frame_indices"][i, ::tubelet].numpy(), batch["crop_box"][i].numpy(),
                             not bool(batch["flipped"][i]), input_size)
        wrong.append(trk)
    mirrored = _colour_drift(clips[batch["flipped"].numpy()], np.stack(wrong)[batch["flipped"].numpy()],
                             visible[batch["flipped"].numpy()])
    assert exact < 0.35 * frozen and exact < 0.35 * mirrored, (exact, frozen, mirrored)
    # the first sampled frame holds the query grid itself
    grid = tracks[:, 0]
    np.testing.assert_allclose(grid, np.broadcast_to(grid[:1], grid.shape), atol=1e-4)


def test_backend_builds_trains_and_refuses_other_sources(synthetic, tmp_path):
    from trackmae_stream.engine import train

    overrides = [f"data.synthetic_dir={synthetic.root}", f"data.synthetic_videos={SYN['num_videos']}",
                 f"data.synthetic_size={SYN['size']}", f"data.synthetic_frames={SYN['num_frames']}",
                 "data.num_frames=8", "data.input_size=48", "data.num_workers=0", "model.embed_dim=48",
                 "model.num_heads=3", "model.depth=1", "model.decoder_dim=32", "model.decoder_heads=2",
                 "model.decoder_depth=1", "batch_size=3", "progress=false", f"output_dir={tmp_path}",
                 "optim.max_steps=2", "log_every=1", "ckpt_every=100", "tracker.backend=synthetic_gt"]
    cfg = load_config("default", overrides)
    tracker = build_tracker(cfg.tracker, torch.device("cpu"))
    assert tracker.name == "synthetic_gt"
    with pytest.raises(RuntimeError, match="cannot track bare frames"):
        tracker.track_grid(torch.rand(1, 2, 3, 16, 16) * 255, 4)
    summary = train(cfg)
    assert summary.last_checkpoint is not None and summary.last_checkpoint.exists()
    listed = load_config("default", [*overrides, "data.source=list", f"data.list_file={synthetic.list_file}"])
    with pytest.raises(ConfigError, match="data.source=synthetic"):
        tracker.clip_track_source(listed, torch.device("cpu"))
