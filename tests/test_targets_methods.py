"""The seed methods' targets through the plug-in path (config -> TargetBuilder -> batch -> compute_losses), against
the reference vectors (MME: the official code; MotionMAE-ref: our reference definition) with their README's
tolerances, and the tracker-made MME trajectory target against a float64 brute-force loop."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import reference_path

from trackmae_stream.config import load_config
from trackmae_stream.engine import compute_losses
from trackmae_stream.pipeline import TrainBatch
from trackmae_stream.targets import TargetBuilder, TargetInputs
from trackmae_stream.tracking import PointTracker, TrackerOutput

SIZE = ["data.input_size=64", "data.num_frames=16", "mask.type=tube"]


def vectors(name: str) -> dict[str, np.ndarray]:
    with np.load(reference_path(f"seed_methods/{name}")) as data:
        return {k: data[k] for k in data.files}


def masked_index(mask: np.ndarray) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.flatnonzero(row)) for row in mask])


def all_tokens(batch: int, n: int) -> torch.Tensor:
    return torch.arange(n).expand(batch, -1)


def closed_form(batch: int, tokens: int, dim: int, fn) -> torch.Tensor:
    i = torch.arange(tokens, dtype=torch.float32)[None, :, None]
    j = torch.arange(dim, dtype=torch.float32)[None, None, :]
    b = torch.arange(batch, dtype=torch.float32)[:, None, None]
    return fn(i, j, b)


def test_mme_hog_target_equals_the_official_labels():
    v = vectors("mme_vectors.npz")
    builder = TargetBuilder(load_config("mme", SIZE))
    inputs = TargetInputs(frames_u8=torch.from_numpy(v["frames_u8"]))
    hog = builder.targets["mme_hog"]
    values, valid = hog.at(inputs, hog.prepare(inputs), all_tokens(2, 128))
    assert valid is None and values.shape == (2, 128, 108)
    np.testing.assert_allclose(values.numpy(), v["hog_label_all"], atol=1e-5, rtol=0)


def test_mme_loss_through_the_trainer_equals_the_official_loss():
    """The trainer's L = 0.5 ℓ_traj + 0.5 ℓ_hog with the targets' own loss forms (sums over channels, invalid
    trajectory tokens skipped, |M| counting all) on the official labels and the README's closed-form predictions."""
    v = vectors("mme_vectors.npz")
    builder = TargetBuilder(load_config("mme", SIZE))
    idx = masked_index(v["bool_masked_pos"])
    batch = TrainBatch(patches=torch.zeros(2, 0, 1), visible_idx=idx[:, :0], masked_idx=idx, skipped=None,
                       source_index=None, targets={"mme_traj": torch.from_numpy(v["traj_label"]),
                                                   "mme_hog": torch.from_numpy(v["hog_label"])},
                       valid={"mme_traj": torch.from_numpy(v["traj_mask"]).bool()})
    pred = {"mme_hog": closed_form(2, 88, 108, lambda i, j, b: torch.sigmoid(torch.sin(0.1 * i + 0.05 * j + b))),
            "mme_traj": closed_form(2, 88, 32, lambda i, j, b: torch.tanh(torch.cos(0.07 * i - 0.11 * j + b)))}
    losses = compute_losses(pred, batch, builder)
    assert float(losses["loss_mme_traj"]) == pytest.approx(float(v["loss_1"]), rel=1e-4)
    assert float(losses["loss_mme_hog"]) == pytest.approx(float(v["loss_2"]), rel=1e-4)
    assert float(losses["loss"]) == pytest.approx(float(v["loss"]), rel=1e-4)
    assert losses["token_error"].shape == (2, 88)


def test_motionmae_ref_targets_and_loss_equal_the_reference_vectors():
    v = vectors("motionmae_reference_vectors.npz")
    frames = torch.from_numpy(v["frames_u8"])
    inputs = TargetInputs(frames_u8=frames)
    for normalize, key, atol in ((False, "motion_target_raw_all", 1e-6), (True, "motion_target_norm_all", 1e-3)):
        builder = TargetBuilder(load_config("motionmae_ref", SIZE + [f"target.motionmae_ref.normalize={normalize}"]))
        prepared, _ = builder.prepare(inputs)
        values, valid = builder.at(inputs, prepared, all_tokens(2, 128))
        assert valid == {}
        np.testing.assert_allclose(values["motionmae_ref"].numpy(), v[key], atol=atol, rtol=0)
        # the pixel target: the project's (flat (token, channel) groups give ~0, not the official rounding noise)
        raw = v["frames_u8"].astype(np.float64).reshape(2, 8, 2, 4, 16, 4, 16, 3)
        flat = raw.transpose(0, 1, 3, 5, 7, 2, 4, 6).reshape(2, 128, 3, 512).std(-1) < 1e-5
        assert 0 < flat.sum() < 20
        ours = values["pixel"].numpy().reshape(2, 128, 512, 3).transpose(0, 1, 3, 2)
        official = v["app_target_all"].reshape(2, 128, 512, 3).transpose(0, 1, 3, 2)
        np.testing.assert_allclose(ours[~flat], official[~flat], atol=1e-4, rtol=0)
    builder = TargetBuilder(load_config("motionmae_ref", SIZE))
    assert builder.weights == {"pixel": 1.0, "motionmae_ref": 1.0}
    idx = masked_index(v["bool_masked_pos"])
    prepared, _ = builder.prepare(inputs)
    values, _ = builder.at(inputs, prepared, idx)
    official_app = torch.from_numpy(v["app_target_all"]).gather(1, idx[..., None].expand(-1, -1, 1536))
    targets = {"pixel": official_app, "motionmae_ref": values["motionmae_ref"]}  # the official appearance labels
    batch = TrainBatch(patches=torch.zeros(2, 0, 1), visible_idx=idx[:, :0], masked_idx=idx, targets=targets,
                       skipped=None, source_index=None)
    pred = {"pixel": closed_form(2, 88, 1536, lambda i, j, b: torch.sin(0.013 * i + 0.021 * j + b)),
            "motionmae_ref": closed_form(2, 88, 1536, lambda i, j, b: 0.1 * torch.cos(0.017 * i - 0.019 * j + b))}
    losses = compute_losses(pred, batch, builder)
    assert float(losses["loss_pixel"]) == pytest.approx(float(v["loss_app"]), rel=1e-4)
    assert float(losses["loss_motionmae_ref"]) == pytest.approx(float(v["loss_mot"]), rel=1e-4)
    assert float(losses["loss"]) == pytest.approx(float(v["loss"]), rel=1e-4)


class PairWindows:
    """Stands in for the preparer's `track_windows`: scripted per-slot tracks (B, T', 2, G², 2) for the windows the
    trajectory target asks for, and a record of what it asked."""

    def __init__(self, tracks: torch.Tensor):
        self.tracks = tracks
        self.calls = []

    def __call__(self, grid: int, offsets: tuple[int, ...]) -> TrackerOutput:
        self.calls.append((grid, offsets))
        return TrackerOutput(self.tracks, torch.ones(self.tracks.shape[:4]))


def brute_force_trajectory(tracks: np.ndarray, side: int, slots: int, height: int, width: int, L: int = 4):
    """SPEC T5/T6 with a tracker window cut into L equal steps, float64 loops: tracks (B, T', 2, G², 2)."""
    batch = tracks.shape[0]
    grid = 2 * side
    out = np.zeros((batch, slots * side * side, 8 * L))
    valid = np.zeros((batch, slots * side * side), dtype=bool)
    for b, t, hp, wp in itertools.product(range(batch), range(slots), range(side), range(side)):
        n = (t * side + hp) * side + wp
        points = [(2 * hp + a) * grid + (2 * wp + c) for a in range(2) for c in range(2)]
        start = tracks[b, t, 0, points].astype(np.float64)
        delta = tracks[b, t, 1, points].astype(np.float64) - start
        inside = []
        for q in range(4):
            ok = True
            for k in range(1, L):
                x, y = start[q] + k * delta[q] / L
                ok &= 0 <= x < width and 0 <= y < height
            inside.append(ok)
        valid[b, n] = any(inside)
        for c, k in itertools.product(range(2), range(L)):
            vals = [min(max(delta[q, c] / L, -20.0), 20.0) / 20.0 for q in range(4)]
            mean = sum(vals) / 4
            std = math.sqrt(sum((x - mean) ** 2 for x in vals) / 3)
            for q in range(4):
                out[b, n, (c * L + k) * 4 + q] = (vals[q] - mean) / (std + 1e-6)
    return out, valid


def test_mme_trajectory_from_per_slot_tracks_equals_a_brute_force_loop():
    side, slots, size = 3, 4, 48
    cfg = load_config("mme", ["data.input_size=48", "data.num_frames=8", "mask.type=tube"])
    builder = TargetBuilder(cfg)
    traj = builder.targets["mme_traj"]
    assert traj.dim == 32 and traj.validity_per_token and builder.needs_tracker and not builder.needs_tracks
    gen = torch.Generator().manual_seed(7)
    grid = 2 * side
    ys, xs = torch.meshgrid(torch.arange(grid) * 8 + 4.0, torch.arange(grid) * 8 + 4.0, indexing="ij")
    start = torch.stack([xs, ys], -1).reshape(1, grid * grid, 2).expand(2 * slots, -1, -1)
    start = start + torch.randn(2 * slots, grid * grid, 2, generator=gen)
    end = start + 3.0 * torch.randn(2 * slots, grid * grid, 2, generator=gen)
    end[0, [0, 1, 6, 7]] += torch.tensor([-70.0, 0.0])  # token (0, 0) of slot 0 leaves the frame: invalid
    end[3, 7] += torch.tensor([0.0, 90.0])
    tracks = torch.stack([start, end], 1)
    windows = PairWindows(tracks.reshape(2, slots, 2, grid * grid, 2))
    frames = torch.randint(1, 255, (2, 8, size, size, 3), dtype=torch.uint8, generator=gen)
    inputs = TargetInputs(frames_u8=frames, track_windows=windows)
    values, valid = traj.at(inputs, traj.prepare(inputs), all_tokens(2, slots * side * side))
    assert windows.calls == [(grid, (0, 1))]  # every tubelet's first frame to its second
    ref, ref_valid = brute_force_trajectory(windows.tracks.numpy(), side, slots, size, size)
    np.testing.assert_array_equal(valid.numpy(), ref_valid)
    assert not ref_valid.all()
    np.testing.assert_allclose(values.double().numpy(), ref, atol=1e-4, rtol=0)
    # the loss skips invalid tokens but divides by every masked token (MME's ℓ_traj)
    pred = torch.randn(values.shape, generator=gen)
    part = traj.loss(pred, values, valid)
    expected = ((pred.double() - values.double()).square().sum(-1) * valid.double()).sum() / valid.numel()
    assert float(part.loss) == pytest.approx(float(expected), rel=1e-6)


class RecordingTracker(PointTracker):
    """A tracker that returns each clip's first frame's grid shifted by the clip's frame means (so the output depends
    on which frames it got) and records its inputs."""

    name = "recording"

    def __init__(self):
        super().__init__("patch_centred")
        self.seen = []

    def forward(self, frames: torch.Tensor, queries: torch.Tensor) -> TrackerOutput:
        self.seen.append(frames.clone())
        shift = frames.mean(dim=(2, 3, 4))[..., None, None]  # (n, K, 1, 1)
        tracks = queries[:, None, :, 1:].expand(-1, frames.shape[1], -1, -1) + shift
        return TrackerOutput(tracks, torch.ones(tracks.shape[:3]))


def test_the_preparer_tracks_per_slot_windows_on_the_right_frames():
    from trackmae_stream.pipeline import build_batch_preparer

    cfg = load_config("mme", ["data.input_size=48", "data.num_frames=8", "tracker.backend=lucas-kanade"])
    preparer = build_batch_preparer(cfg, torch.device("cpu"))
    preparer.tracker = RecordingTracker()
    frames = torch.randint(0, 256, (2, 8, 48, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    out = preparer.track_windows({}, frames, 6, (0, 1))
    assert out.tracks.shape == (2, 4, 2, 36, 2) and out.visibility.shape == (2, 4, 2, 36)
    (seen,) = preparer.tracker.seen
    for b, t, k in itertools.product(range(2), range(4), range(2)):
        expected = frames[b, 2 * t + k].permute(2, 0, 1).float()
        assert torch.equal(seen[b * 4 + t, k], expected), (b, t, k)
        np.testing.assert_allclose(float(out.tracks[b, t, k, 0, 0] - out.tracks[b, 0, 0, 0, 0]),
                                   float(expected.mean() - frames[b, 0].float().mean()), atol=1e-3)


def test_per_slot_windows_from_synthetic_ground_truth(tmp_path):
    """tracker.backend=synthetic_gt: every window starts on the query grid, and slot 0's window (frames 0 and 1)
    equals the track source's exact clip tracks of the same grid over a clip whose tubelets start at frames 0, 1."""
    from test_train import SYN, tiny

    from trackmae_stream.data import ensure_synthetic_dataset
    from trackmae_stream.data_setup import build_data
    from trackmae_stream.distributed import DistInfo
    from trackmae_stream.pipeline import build_batch_preparer
    from trackmae_stream.tracking import query_grid

    synthetic = ensure_synthetic_dataset(tmp_path / "synthetic", **SYN)
    cfg = load_config("mme", tiny(synthetic, tmp_path, **{"tracker.backend": "synthetic_gt",
                                                          "tracker.grid_size": 8}))
    data = build_data(cfg, DistInfo(0, 1, 0, torch.device("cpu")), torch.device("cpu"))
    try:
        preparer = build_batch_preparer(cfg, torch.device("cpu"))
        batch = next(iter(data.loader))
        windows = preparer.track_windows(batch, batch["frames"], 8, (0, 1))
        grid = query_grid(8, 64, 64, preparer.tracker.grid_rule)
        assert torch.allclose(windows.tracks[:, :, 0], grid.expand_as(windows.tracks[:, :, 0]), atol=1e-4)
        shifted = dict(batch)  # tubelet k of this clip starts at the original clip's frame k
        shifted["frame_indices"] = torch.as_tensor(batch["frame_indices"]).repeat_interleave(2, dim=1)[:, :8]
        clip = preparer.track_source(shifted, batch["frames"])  # (B, T', 64, 2) queried at frame 0
        torch.testing.assert_close(windows.tracks[:, 0], clip.tracks[:, :2], atol=1e-4, rtol=0)
        assert not torch.equal(windows.tracks[:, 0, 1], windows.tracks[:, 0, 0])  # the objects moved
        prepared = preparer(batch, 0)  # the mme_traj target from these windows, end to end
        assert prepared.targets["mme_traj"].shape[-1] == 32 and prepared.valid["mme_traj"].dtype == torch.bool
    finally:
        data.close()
