"""MME's exact targets and loss (trackmae_stream.methods.mme) against the official code's vectors and brute force.

The vectors (../shared/reference/seed_methods/mme_vectors.npz, read in place; README.md there gives the inputs in
closed form and the tolerances) come from running XinyuSun/MME @ 17689a9. Every stage they give is checked; the
float64 loops below are independent re-derivations of the SPEC at odd sizes.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import reference_path

from trackmae_stream.methods import mme

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vec():
    with np.load(reference_path("seed_methods/mme_vectors.npz")) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def flow_stages(vec):
    """Our pipeline on the vectors' decoded flow: dump, loader, crop, target."""
    disp, valid = mme.mme_track_flow(torch.from_numpy(vec["flow_px"]))
    loader = mme.mme_loader_slice(disp, valid, torch.from_numpy(vec["frame_inds"]))
    cropped = mme.mme_crop_resize(loader, vec["crops"], 64 // 8)
    target, token_valid = mme.mme_trajectory_target(cropped)
    return dict(disp=disp, valid=valid, loader=loader, cropped=cropped, target=target, token_valid=token_valid)


def closed_form_predictions(masked: int):
    """The README's closed-form predictions (recomputed, then also compared with the stored copies)."""
    i = torch.arange(masked, dtype=torch.float32).view(1, masked, 1)
    b = torch.arange(2, dtype=torch.float32).view(2, 1, 1)
    pred_hog = torch.sigmoid(torch.sin(0.1 * i + 0.05 * torch.arange(108, dtype=torch.float32).view(1, 1, -1) + b))
    pred_traj = torch.tanh(torch.cos(0.07 * i - 0.11 * torch.arange(32, dtype=torch.float32).view(1, 1, -1) + b))
    return pred_hog, pred_traj


# ----------------------------------------------------------------------------------------------------------------------
# Trajectory stages against the official code


def test_extraction_dump_is_exact(vec, flow_stages):
    assert flow_stages["disp"].dtype == torch.int8 and flow_stages["valid"].dtype == torch.uint8
    np.testing.assert_array_equal(flow_stages["disp"].numpy(), vec["traj_feat_dump"])
    np.testing.assert_array_equal(flow_stages["valid"].numpy(), vec["traj_type_dump"])


def test_loader_crop_tokens_and_target(vec, flow_stages):
    np.testing.assert_array_equal(flow_stages["loader"].numpy(), vec["loader_trajs"])
    assert flow_stages["loader"].dtype == torch.int16
    np.testing.assert_allclose(flow_stages["cropped"].numpy(), vec["trajs_cropped"], rtol=0, atol=1e-4)
    disp, _ = mme.mme_trajectory_tokens(flow_stages["cropped"])
    assert disp.shape == (2, 128, 2, 4, 4)
    np.testing.assert_allclose(disp.reshape(2, 128, 32).numpy(), vec["traj_disp_tokens"], rtol=0, atol=1e-4)
    keep = ~vec["traj_degenerate"]
    assert keep.mean() > 0.5  # the comparison is not vacuous
    np.testing.assert_allclose(flow_stages["target"].numpy()[keep], vec["traj_label_all"][keep], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(flow_stages["token_valid"].numpy(), vec["traj_mask_all"].astype(bool))
    assert flow_stages["token_valid"].sum() == 253  # README: 253 of 256 tokens valid


def test_as_released_undecoded_flow_reproduces_rawu8(vec):
    """Bug B1 (fixed by default): feeding the stored bytes gives the `_rawu8` dumps, an all-zero target, no valid
    token."""
    raw = mme.encode_flow_u8(vec["flow_px"])
    np.testing.assert_array_equal(mme.encode_flow_u8(torch.from_numpy(vec["flow_px"])).numpy(), raw)
    disp, valid = mme.mme_track_flow(torch.from_numpy(raw).float())
    np.testing.assert_array_equal(disp.numpy(), vec["traj_feat_dump_rawu8"])
    np.testing.assert_array_equal(valid.numpy(), vec["traj_type_dump_rawu8"])
    loader = mme.mme_loader_slice(disp, valid, torch.from_numpy(vec["frame_inds"]))
    target, token_valid = mme.mme_trajectory_target(mme.mme_crop_resize(loader, vec["crops"], 8))
    np.testing.assert_allclose(target.numpy(), vec["traj_label_all_rawu8"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(token_valid.numpy(), vec["traj_mask_all_rawu8"].astype(bool))
    assert not token_valid.any()


def test_flow_byte_codec():
    """encode/decode: the README formula (rint, half to even), and a round trip within half a quantum."""
    v = np.array([-25.0, -20.0, -0.0784313725490196, 0.0, 0.07843137254901, 19.99, 20.0, 31.0])
    np.testing.assert_array_equal(mme.encode_flow_u8(v), np.clip(np.rint(255 * (v + 20) / 40), 0, 255))
    rng = np.random.default_rng(3)
    flow = rng.uniform(-19.9, 19.9, size=(3, 7, 5, 2)).astype(np.float32)
    back = mme.decode_flow_u8(mme.encode_flow_u8(flow))
    assert back.dtype == np.float32 and np.abs(back - flow).max() <= 20 / 255 + 1e-5
    np.testing.assert_allclose(mme.decode_flow_u8(torch.from_numpy(mme.encode_flow_u8(flow))).numpy(), back,
                               rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# HOG and loss against the official code


def test_hog_stages(vec):
    videos = torch.from_numpy(vec["videos_norm"])
    hog = mme.mme_hog(videos)
    assert hog.shape == (2, 27, 8, 8, 8) and hog.dtype == torch.float32
    np.testing.assert_allclose(hog.numpy(), vec["video_hog"], rtol=0, atol=1e-5)
    label = mme.mme_hog_target(hog)
    assert label.shape == (2, 128, 108)
    np.testing.assert_allclose(label.numpy(), vec["hog_label_all"], rtol=0, atol=1e-5)
    # the trainer's layout: uint8 frames normalised here give the same video and the same HOG
    frames = torch.from_numpy(vec["frames_u8"])
    np.testing.assert_allclose(mme.normalise_frames(frames).numpy(), vec["videos_norm"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(mme.mme_hog(frames, layout="BTHWC").numpy(), vec["video_hog"], rtol=0, atol=1e-5)


def test_hog_random_sobel_bias_reproduces_official_draw(vec):
    """Bug B2 (fixed: bias 0 by default); the flag reproduces the official random bias of the `_bias_seed0` arrays."""
    bias = tuple(float(b) for b in vec["sobel_bias_seed0"])
    hog = mme.mme_hog(torch.from_numpy(vec["videos_norm"]), sobel_bias=bias)
    np.testing.assert_allclose(hog.numpy(), vec["video_hog_bias_seed0"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(mme.mme_hog_target(hog).numpy(), vec["hog_label_all_bias_seed0"], rtol=0, atol=1e-5)
    assert np.abs(vec["video_hog_bias_seed0"] - vec["video_hog"]).mean() > 0.01  # the flag matters


def test_masked_labels_and_loss(vec, flow_stages):
    masked = torch.from_numpy(vec["bool_masked_pos"])
    count = int(masked[0].sum())
    assert count == 88 and bool((masked.sum(1) == count).all())
    hog_label = mme.mme_hog_target(mme.mme_hog(torch.from_numpy(vec["videos_norm"])))[masked].view(2, count, 108)
    traj_label = flow_stages["target"][masked].view(2, count, 32)
    traj_valid = flow_stages["token_valid"][masked].view(2, count)
    np.testing.assert_allclose(hog_label.numpy(), vec["hog_label"], rtol=0, atol=1e-5)
    keep = ~vec["traj_degenerate"][vec["bool_masked_pos"]].reshape(2, count, 32)
    np.testing.assert_allclose(traj_label.numpy()[keep], vec["traj_label"][keep], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(traj_valid.numpy(), vec["traj_mask"].astype(bool))
    pred_hog, pred_traj = closed_form_predictions(count)
    np.testing.assert_allclose(pred_hog.numpy(), vec["pred_hog"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(pred_traj.numpy(), vec["pred_traj"], rtol=0, atol=1e-6)
    out = mme.mme_loss(pred_traj, traj_label, traj_valid, pred_hog, hog_label)
    np.testing.assert_allclose(out.traj.item(), float(vec["loss_1"]), rtol=1e-4)
    np.testing.assert_allclose(out.hog.item(), float(vec["loss_2"]), rtol=1e-4)
    np.testing.assert_allclose(out.loss.item(), float(vec["loss"]), rtol=1e-4)
    assert out.per_token.shape == (2, count)
    np.testing.assert_allclose(out.per_token.mean().item(), out.loss.item(), rtol=1e-6)
    # the per-token form: brute force over (clip, token) in float64
    traj_err, hog_err = mme.mme_token_losses(pred_traj, traj_label, traj_valid, pred_hog, hog_label)
    for b in range(2):
        for n in range(0, count, 7):
            t = float(traj_valid[b, n]) * sum((float(pred_traj[b, n, j]) - float(traj_label[b, n, j])) ** 2
                                              for j in range(32))
            h = sum((float(pred_hog[b, n, j]) - float(hog_label[b, n, j])) ** 2 for j in range(108))
            assert traj_err[b, n].item() == pytest.approx(t, rel=1e-5, abs=1e-6)
            assert hog_err[b, n].item() == pytest.approx(h, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# The tracker recipe (SPEC §2.6) against the vectors' ideal sub-pixel tracker


def ideal_tracks(flow: np.ndarray, traj_len: int) -> np.ndarray:
    """The README's ideal tracker: Euler steps with bilinear flow sampling, no truncation, MME's grid, going on from
    the clamped point. float64 -> (B, S, L+1, gh*gw, 2)."""
    batch, n_flow, height, width, _ = flow.shape
    starts = n_flow - traj_len
    gy, gx = np.meshgrid(np.arange(height // 8) * 8 + 4.0, np.arange(width // 8) * 8 + 4.0, indexing="ij")
    out = np.zeros((batch, starts, traj_len + 1, gx.size, 2))

    def sample(field, x, y):
        x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
        fx, fy = (x - x0)[:, None], (y - y0)[:, None]
        x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
        return (field[y0, x0] * (1 - fx) * (1 - fy) + field[y0, x1] * fx * (1 - fy) + field[y1, x0] * (1 - fx) * fy
                + field[y1, x1] * fx * fy)

    for b in range(batch):
        for s in range(starts):
            x, y = gx.ravel().copy(), gy.ravel().copy()
            out[b, s, 0] = np.stack([x, y], -1)
            for k in range(traj_len):
                x, y = np.clip(x, 0, width - 1), np.clip(y, 0, height - 1)
                step = sample(flow[b, s + k], x, y)
                x, y = x + step[:, 0], y + step[:, 1]
                out[b, s, k + 1] = np.stack([x, y], -1)
    return out


def test_tracker_recipe_reproduces_ideal_vectors(vec):
    flow = vec["flow_px"].astype(np.float64)
    tracks = torch.from_numpy(ideal_tracks(flow, 4)).float()
    disp, valid = mme.mme_dump_from_tracks(tracks, frame_size=(80, 80))
    assert disp.shape == (2, 8, 67, 10, 10) and valid.shape == (2, 67, 10, 10)
    # the ideal tracker is the README authors' own: its dump agrees on >98% of the points (borderline points
    # differ), and the labels and token masks, the stages that matter, match within the README's tolerance
    assert (valid.numpy() == vec["traj_type_dump_ideal"]).mean() > 0.98
    loader = mme.mme_loader_slice(disp, valid, torch.from_numpy(vec["frame_inds"]))
    assert loader.dtype == torch.float32
    target, token_valid = mme.mme_trajectory_target(mme.mme_crop_resize(loader, vec["crops"], 8))
    np.testing.assert_allclose(target.numpy(), vec["traj_label_all_ideal"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(token_valid.numpy(), vec["traj_mask_all_ideal"].astype(bool))
    gap = np.abs(vec["traj_label_all_ideal"] - vec["traj_label_all"])
    assert gap.mean() == pytest.approx(0.30, abs=0.01)  # README: mean 0.30, max 2.36


# ----------------------------------------------------------------------------------------------------------------------
# Independent float64 brute force at odd sizes


def brute_track(flow: np.ndarray, traj_len: int):
    """SPEC T2, one point at a time."""
    batch, n_flow, height, width, _ = flow.shape
    starts, gh, gw = n_flow - traj_len, height // 8, width // 8
    disp = np.zeros((batch, 2 * traj_len, starts, gh, gw), np.int64)
    valid = np.ones((batch, starts, gh, gw), np.int64)
    for b in range(batch):
        for s in range(starts):
            for i in range(gh):
                for j in range(gw):
                    x, y = 8 * j + 4, 8 * i + 4
                    for k in range(traj_len):
                        if k >= 1 and not (0 <= x <= width - 1 and 0 <= y <= height - 1):
                            valid[b, s, i, j] = 0
                        x, y = min(max(x, 0), width - 1), min(max(y, 0), height - 1)
                        dx, dy = (math.trunc(float(v)) for v in flow[b, s + k, y, x])
                        disp[b, k, s, i, j] = max(-20, min(20, dx))
                        disp[b, traj_len + k, s, i, j] = max(-20, min(20, dy))
                        x, y = x + dx, y + dy
    return disp, valid


def test_track_flow_brute_force_odd_sizes():
    rng = np.random.default_rng(11)
    flow = rng.normal(0.0, 6.0, size=(2, 9, 27, 35, 2)).astype(np.float32)  # H, W not multiples of 8
    flow[1, 2] += np.float32(23.5)  # large steps: points leave the frame, steps get clamped
    disp, valid = mme.mme_track_flow(torch.from_numpy(flow), traj_len=3)
    ref_disp, ref_valid = brute_track(flow, 3)
    assert disp.shape == (2, 6, 6, 3, 4)
    np.testing.assert_array_equal(disp.numpy(), ref_disp)
    np.testing.assert_array_equal(valid.numpy(), ref_valid)
    assert 0 < valid.float().mean() < 1 and (np.abs(ref_disp) == 20).any()


def test_loader_slice_brute_force():
    rng = np.random.default_rng(5)
    disp = torch.from_numpy(rng.integers(-20, 21, size=(2, 10, 13, 3, 5)).astype(np.int8))  # Lmax = 5
    valid = torch.from_numpy(rng.integers(0, 2, size=(2, 13, 3, 5)).astype(np.uint8))
    frame_inds = torch.tensor([[0, 3, 6, 9, 12, 15], [4, 7, 10, 13, 16, 19]])  # starts past S - 1 get clamped
    out = mme.mme_loader_slice(disp, valid, frame_inds, tubelet=2, traj_len=3)
    assert out.shape == (2, 2, 3 * 3 + 3, 3, 5)
    for b in range(2):
        for t in range(3):
            s0 = min(int(frame_inds[b, 2 * t]), 12)
            for c in range(2):
                for k in range(3):
                    np.testing.assert_array_equal(out[b, c, t * 3 + k].numpy(), disp[b, c * 5 + k, s0].numpy())
                np.testing.assert_array_equal(out[b, c, 9 + t].numpy(), valid[b, s0].numpy())


def brute_patch_std_target(trajs: np.ndarray, traj_len: int):
    batch, _, rows, gh, gw = trajs.shape
    slots, h, w = rows // (traj_len + 1), gh // 2, gw // 2
    target = np.zeros((batch, slots * h * w, 8 * traj_len))
    valid = np.zeros((batch, slots * h * w), bool)
    for b in range(batch):
        for t in range(slots):
            for hp in range(h):
                for wp in range(w):
                    n = (t * h + hp) * w + wp
                    cells = [(2 * hp + a, 2 * wp + bb) for a in range(2) for bb in range(2)]
                    valid[b, n] = any(math.trunc(trajs[b, 0, slots * traj_len + t, r, c]) >= 1 for r, c in cells)
                    for c in range(2):
                        for k in range(traj_len):
                            v = [trajs[b, c, t * traj_len + k, r, col] / 20.0 for r, col in cells]
                            mean = sum(v) / 4
                            std = math.sqrt(sum((x - mean) ** 2 for x in v) / 3)
                            for q in range(4):
                                target[b, n, (c * traj_len + k) * 4 + q] = (v[q] - mean) / (std + 1e-6)
    return target, valid


def test_trajectory_target_brute_force_odd_sizes():
    rng = np.random.default_rng(7)
    L, slots, h, w = 3, 5, 3, 5
    trajs = rng.normal(0.0, 4.0, size=(3, 2, slots * (L + 1), 2 * h, 2 * w))
    trajs[:, :, slots * L:] = rng.uniform(0.0, 1.0, size=(3, 1, slots, 2 * h, 2 * w)) ** 0.3  # resampled validity
    trajs[:, :, slots * L:][trajs[:, :, slots * L:] > 0.93] = 1.0
    target, valid = mme.mme_trajectory_target(torch.from_numpy(trajs).float(), traj_len=L)
    ref_target, ref_valid = brute_patch_std_target(trajs.astype(np.float32).astype(np.float64), L)
    assert target.shape == (3, slots * h * w, 8 * L) and valid.dtype == torch.bool
    np.testing.assert_allclose(target.numpy(), ref_target, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(valid.numpy(), ref_valid)
    assert 0 < ref_valid.mean() < 1


def brute_hog(images: np.ndarray) -> np.ndarray:
    """SPEC H2-H3 for (n, H, W) float64 images -> (n, 9, H/8, W/8), plus a mask of cells holding an ambiguous pixel
    (phi within 1e-4 of an integer, where float32 and float64 may disagree)."""
    n, height, width = images.shape
    hog = np.zeros((n, 9, height // 8, width // 8))
    ambiguous = np.zeros((n, height // 8, width // 8), bool)
    for m in range(n):
        img = np.pad(images[m], 1, mode="edge")
        for y in range(height):
            for x in range(width):
                p = img[y:y + 3, x:x + 3]
                gx = (p[0, 0] + 2 * p[1, 0] + p[2, 0]) - (p[0, 2] + 2 * p[1, 2] + p[2, 2])
                gy = (p[0, 0] + 2 * p[0, 1] + p[0, 2]) - (p[2, 0] + 2 * p[2, 1] + p[2, 2])
                mag = math.hypot(gx, gy)
                phi = math.atan2(gy, gx) / math.pi * 9
                if phi < 0:
                    phi += 9
                lo, hi = math.floor(phi), math.ceil(phi)
                if abs(phi - round(phi)) < 1e-4:
                    ambiguous[m, y // 8, x // 8] = True
                if lo == hi:
                    continue  # P3: an exactly integer phi votes nothing
                hog[m, hi % 9, y // 8, x // 8] += mag * (phi - lo) / 64
                hog[m, lo % 9, y // 8, x // 8] += mag * (hi - phi) / 64
    return hog, ambiguous


def test_hog_brute_force_odd_sizes():
    rng = np.random.default_rng(13)
    batch, frames, height, width = 2, 6, 24, 40  # 3 slots, 3 x 5 cells
    video = rng.normal(0.0, 1.0, size=(batch, 3, frames, height, width)).astype(np.float32)
    hog = mme.mme_hog(torch.from_numpy(video)).numpy()
    assert hog.shape == (batch, 27, 3, 3, 5)
    picked = video[:, :, 1::2].transpose(0, 2, 1, 3, 4).reshape(-1, height, width).astype(np.float64)
    ref, ambiguous = brute_hog(picked)
    ref = ref.reshape(batch, 3, 3, 9, 3, 5).transpose(0, 2, 3, 1, 4, 5).reshape(batch, 27, 3, 3, 5)
    ambiguous = np.broadcast_to(ambiguous.reshape(batch, 3, 3, 1, 3, 5).transpose(0, 2, 3, 1, 4, 5),
                                (batch, 3, 9, 3, 3, 5)).reshape(batch, 27, 3, 3, 5)
    assert ambiguous.mean() < 0.2
    np.testing.assert_allclose(hog[~ambiguous], ref[~ambiguous], rtol=0, atol=1e-5)
    chunked = mme.mme_hog(torch.from_numpy(video), chunk_pixels=3 * height * width + 1)  # 18 images in chunks of 3
    assert torch.equal(chunked, torch.from_numpy(hog))
    # the token layout at p = 16 with odd token counts: cells (2hp + a, 2wp + b), channel-major
    video16 = rng.normal(0.0, 1.0, size=(1, 3, 2, 48, 80)).astype(np.float32)
    hog16 = mme.mme_hog(torch.from_numpy(video16))
    label = mme.mme_hog_target(hog16).numpy()
    assert label.shape == (1, 3 * 5, 108)
    for hp in range(3):
        for wp in range(5):
            for ch in range(27):
                for a in range(2):
                    for b in range(2):
                        assert label[0, hp * 5 + wp, (ch * 2 + a) * 2 + b] == hog16[0, ch, 0, 2 * hp + a, 2 * wp + b]


def test_hog_horizontal_ramp_is_empty():
    """P3 reproduced: I = x has gy = 0 everywhere, phi an exact integer at every pixel, so nothing is voted."""
    ramp = torch.arange(32, dtype=torch.float32).view(1, 1, 1, 1, 32).expand(1, 3, 2, 16, 32) * 0.25  # exact sums
    assert mme.mme_hog(ramp).abs().max() == 0
    turned = ramp.transpose(-1, -2).contiguous()  # I = y: phi = 4.5 exactly, half the magnitude to bins 4 and 5
    hog = mme.mme_hog(turned)
    assert hog[0, 4, 0, 1:-1, :].min() > 0 and hog[0, 5].sum() == pytest.approx(hog[0, 4].sum().item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# The project's tracks (B, T', G², 2) -> the 32-value target


def brute_from_tracks(tracks, visibility, tokens_side, frame_size, L, use_visibility):
    batch, slots, points, _ = tracks.shape
    side, height, width = 2 * tokens_side, *frame_size
    target = np.zeros((batch, slots * tokens_side ** 2, 8 * L))
    valid = np.zeros((batch, slots * tokens_side ** 2), bool)
    for b in range(batch):
        for t in range(slots):
            ta, tb = (t, t + 1) if t < slots - 1 else (t - 1, t)
            for hp in range(tokens_side):
                for wp in range(tokens_side):
                    n = (t * tokens_side + hp) * tokens_side + wp
                    ids = [(2 * hp + a) * side + 2 * wp + bb for a in range(2) for bb in range(2)]
                    steps = [(tracks[b, tb, i] - tracks[b, ta, i]) / L for i in ids]
                    for c in range(2):
                        v = [float(np.clip(s[c], -20, 20)) / 20 for s in steps]
                        mean = sum(v) / 4
                        std = math.sqrt(sum((x - mean) ** 2 for x in v) / 3)
                        for k in range(L):
                            for q in range(4):
                                target[b, n, (c * L + k) * 4 + q] = (v[q] - mean) / (std + 1e-6)
                    for q, i in enumerate(ids):
                        ok = True
                        for k in range(1, L):
                            x, y = tracks[b, t, i] + k * steps[q] * 1.0
                            ok &= 0 <= x < width and 0 <= y < height
                        if use_visibility:
                            nxt = t + 1 if t < slots - 1 else t
                            ok &= visibility[b, t, i] >= 0.5 and visibility[b, nxt, i] >= 0.5
                        valid[b, n] |= ok
    return target, valid


@pytest.mark.parametrize("use_visibility", [False, True])
def test_from_tracks_brute_force_odd_sizes(use_visibility):
    rng = np.random.default_rng(17 + use_visibility)
    batch, slots, tokens_side, L, height, width = 2, 5, 3, 4, 43, 43
    side = 2 * tokens_side
    gy, gx = np.meshgrid(np.linspace(3, 39, side), np.linspace(3, 39, side), indexing="ij")
    start = np.stack([gx.ravel(), gy.ravel()], -1)
    tracks = start + np.cumsum(rng.normal(0, 5.0, size=(batch, slots, side * side, 2)), axis=1)
    tracks[1] += np.arange(slots).reshape(slots, 1, 1) * np.array([14.0, -3.0])  # clip 1 drifts out of the frame
    visibility = rng.uniform(0, 1, size=(batch, slots, side * side))
    target, valid = mme.mme_trajectory_from_tracks(
        torch.from_numpy(tracks).float(), torch.from_numpy(visibility).float(), tokens_side=tokens_side,
        frame_size=(height, width), traj_len=L, use_visibility=use_visibility)
    ref_target, ref_valid = brute_from_tracks(tracks.astype(np.float32).astype(np.float64), visibility,
                                              tokens_side, (height, width), L, use_visibility)
    assert target.shape == (batch, slots * tokens_side ** 2, 32) and valid.shape == target.shape[:2]
    np.testing.assert_allclose(target.numpy(), ref_target, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(valid.numpy(), ref_valid)
    assert 0 < ref_valid.mean() < 1


def brute_from_windows(windows, visibility, tokens_side, frame_size, L, use_visibility):
    """Per-slot windows (B, T', K+1, P, 2), K = 1 (equal steps) or L, one value at a time in float64."""
    batch, slots, frames, _, _ = windows.shape
    side, height, width = 2 * tokens_side, *frame_size
    target = np.zeros((batch, slots * tokens_side ** 2, 8 * L))
    valid = np.zeros((batch, slots * tokens_side ** 2), bool)
    for b in range(batch):
        for t in range(slots):
            for hp in range(tokens_side):
                for wp in range(tokens_side):
                    n = (t * tokens_side + hp) * tokens_side + wp
                    ids = [(2 * hp + a) * side + 2 * wp + bb for a in range(2) for bb in range(2)]
                    for i in ids:
                        w = windows[b, t, :, i]
                        path = w if frames == L + 1 else [w[0] + (w[1] - w[0]) * k / L for k in range(L + 1)]
                        ok = all(0 <= path[k][0] < width and 0 <= path[k][1] < height for k in range(1, L))
                        if use_visibility:
                            ok &= bool((visibility[b, t, :, i] >= 0.5).all())
                        valid[b, n] |= ok
                    for c in range(2):
                        for k in range(L):
                            if frames == L + 1:
                                v = [float(np.clip(windows[b, t, k + 1, i, c] - windows[b, t, k, i, c], -20, 20)) / 20
                                     for i in ids]
                            else:
                                v = [float(np.clip((windows[b, t, 1, i, c] - windows[b, t, 0, i, c]) / L, -20, 20))
                                     / 20 for i in ids]
                            mean = sum(v) / 4
                            std = math.sqrt(sum((x - mean) ** 2 for x in v) / 3)
                            for q in range(4):
                                target[b, n, (c * L + k) * 4 + q] = (v[q] - mean) / (std + 1e-6)
    return target, valid


@pytest.mark.parametrize("frames", [2, 4])
def test_from_requeried_windows_brute_force(frames):
    """The per-slot window layout (B, T', K+1, G², 2): K = L real steps, K = 1 equal steps; odd sizes, L = 3."""
    rng = np.random.default_rng(29 + frames)
    batch, slots, tokens_side, L, height, width = 2, 3, 5, 3, 37, 45
    side = 2 * tokens_side
    gy, gx = np.meshgrid(np.linspace(2, 34, side), np.linspace(2, 42, side), indexing="ij")
    start = np.broadcast_to(np.stack([gx.ravel(), gy.ravel()], -1), (batch, slots, 1, side * side, 2))
    windows = start + np.cumsum(rng.normal(0, 3.0, size=(batch, slots, frames, side * side, 2)), axis=2)
    windows[:, :, 0] = start[:, :, 0]
    windows[1, 1] += np.arange(frames).reshape(frames, 1, 1) * np.array([0.0, 9.0])  # leaves through the bottom
    visibility = rng.uniform(0.2, 1, size=(batch, slots, frames, side * side))
    target, valid = mme.mme_trajectory_from_tracks(
        torch.from_numpy(windows).float(), torch.from_numpy(visibility).float(), tokens_side=tokens_side,
        frame_size=(height, width), traj_len=L, use_visibility=True)
    ref_target, ref_valid = brute_from_windows(windows.astype(np.float32).astype(np.float64), visibility,
                                               tokens_side, (height, width), L, True)
    assert target.shape == (batch, slots * tokens_side ** 2, 8 * L)
    np.testing.assert_allclose(target.numpy(), ref_target, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(valid.numpy(), ref_valid)
    assert 0 < ref_valid.mean() < 1
    if frames == 2:  # equal steps: the 4 step blocks of each coordinate are identical
        blocks = target.view(batch, -1, 2, L, 4)
        assert torch.equal(blocks, blocks[:, :, :, :1].expand_as(blocks))


def test_from_tracks_rigid_motion_and_upsampling():
    """A rigid translation gives z = 0 (SPEC: PatchStd removes a token's mean motion); an affine motion tracked on a
    G = tokens_side grid and upsampled x2 equals tracking the 2x finer grid directly (bilinear is exact there)."""
    batch, slots, h = 2, 4, 5
    g = torch.linspace(4.0, 60.0, 2 * h)
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    grid = torch.stack([xx, yy], -1).reshape(-1, 2)
    shift = torch.tensor([1.5, -0.75]) * torch.arange(slots).view(slots, 1, 1)
    rigid = (grid + shift).expand(batch, -1, -1, -1)
    target, valid = mme.mme_trajectory_from_tracks(rigid, tokens_side=h, frame_size=(64, 64))
    assert target.abs().max() == 0 and bool(valid.all())

    def affine(points, t):
        a = torch.tensor([[1.0 + 0.03 * t, 0.02 * t], [-0.015 * t, 1.0 - 0.01 * t]])
        return points @ a.T + torch.tensor([0.7 * t, 0.2 * t * t])

    coarse_axis = torch.linspace(4.0, 60.0, h)
    cy, cx = torch.meshgrid(coarse_axis, coarse_axis, indexing="ij")
    coarse = torch.stack([cx, cy], -1).reshape(-1, 2)
    fine_axis = torch.linspace(4.0, 60.0, 2 * h)  # align_corners=True positions of the x2 grid
    fy, fx = torch.meshgrid(fine_axis, fine_axis, indexing="ij")
    fine = torch.stack([fx, fy], -1).reshape(-1, 2)
    coarse_tracks = torch.stack([affine(coarse, t) for t in range(slots)]).unsqueeze(0)
    fine_tracks = torch.stack([affine(fine, t) for t in range(slots)]).unsqueeze(0)
    up, up_valid = mme.mme_trajectory_from_tracks(coarse_tracks, tokens_side=h, frame_size=(64, 64), upsample=2)
    direct, direct_valid = mme.mme_trajectory_from_tracks(fine_tracks, tokens_side=h, frame_size=(64, 64))
    # affine steps make each 4-point group an exact parallelogram: compare where the spread is not float noise
    spread = direct.reshape(1, -1, 8, 4).abs().amax(-1)
    keep = (spread > 0.1).unsqueeze(-1).expand(-1, -1, -1, 4).reshape(direct.shape)
    assert keep.float().mean() > 0.5
    torch.testing.assert_close(up[keep], direct[keep], rtol=0, atol=2e-3)
    assert torch.equal(up_valid, direct_valid)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\(B, n_flow, H, W, 2\)"):
        mme.mme_track_flow(torch.zeros(2, 9, 16, 16))
    with pytest.raises(ValueError, match="n_flow > traj_len"):
        mme.mme_track_flow(torch.zeros(1, 4, 16, 16, 2), traj_len=4)
    with pytest.raises(ValueError, match="T'\\*\\(L\\+1\\)"):
        mme.mme_trajectory_target(torch.zeros(1, 2, 39, 8, 8))
    with pytest.raises(ValueError, match="does not fit"):
        mme.mme_crop_resize(torch.zeros(1, 2, 40, 10, 10), [(96, 80, 0, 0)], 8)
    with pytest.raises(ValueError, match="BCTHW"):
        mme.mme_hog(torch.zeros(1, 3, 4, 16, 16), layout="NCHW")
    with pytest.raises(ValueError, match="2\\*tokens_side"):
        mme.mme_trajectory_from_tracks(torch.zeros(1, 4, 49, 2), tokens_side=7, frame_size=(112, 112))
    with pytest.raises(ValueError, match="K\\+1 = 2 or L\\+1"):
        mme.mme_trajectory_from_tracks(torch.zeros(1, 4, 3, 196, 2), tokens_side=7, frame_size=(112, 112))
    with pytest.raises(ValueError, match="use_visibility needs"):
        mme.mme_trajectory_from_tracks(torch.zeros(1, 4, 196, 2), tokens_side=7, frame_size=(112, 112),
                                       use_visibility=True)
    with pytest.raises(ValueError, match="shapes differ"):
        mme.mme_token_losses(torch.zeros(1, 3, 32), torch.zeros(1, 3, 31), torch.ones(1, 3), torch.zeros(1, 3, 108),
                             torch.zeros(1, 3, 108))


def test_farneback_flow_recovers_a_translation():
    """The offline flow: a smooth texture moved by (+2, -1) px is found within 0.1 px away from the borders."""
    pytest.importorskip("cv2")
    yy, xx = np.mgrid[0:64, 0:72].astype(np.float64)

    def texture(dx, dy):
        x, y = xx - dx, yy - dy
        v = 128 + 60 * np.sin(2 * np.pi * x / 17) * np.cos(2 * np.pi * y / 13) + 40 * np.sin(2 * np.pi * (x + y) / 23)
        return np.clip(np.rint(v), 0, 255).astype(np.uint8)

    grey = np.stack([texture(0, 0), texture(2, -1), texture(4, -2)])
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    flow = mme.farneback_flow(rgb)
    assert flow.shape == (2, 64, 72, 2) and flow.dtype == np.float32
    inner = flow[:, 12:-12, 12:-12]
    assert np.abs(inner[..., 0] - 2).mean() < 0.1 and np.abs(inner[..., 1] + 1).mean() < 0.1
    with pytest.raises(ValueError, match="uint8"):
        mme.farneback_flow(rgb.astype(np.float32))


@pytest.mark.gpu
def test_cuda_per_step_functions_match_cpu_without_host_syncs(vec):
    """The per-step path (HOG, trajectory target, tracker substitute, loss) on CUDA: same numbers as on CPU, and
    no host sync once the cached constants exist (torch's sync debug mode raises on one)."""
    cpu = dict(video=torch.from_numpy(vec["videos_norm"]), frames=torch.from_numpy(vec["frames_u8"]),
               trajs=torch.from_numpy(vec["trajs_cropped"]),
               tracks=torch.rand(2, 8, 64, 2, generator=torch.Generator().manual_seed(0)) * 60)

    def step(x):
        hog = mme.mme_hog_target(mme.mme_hog(x["video"]))
        hog_u8 = mme.mme_hog_target(mme.mme_hog(x["frames"], layout="BTHWC"))
        target, valid = mme.mme_trajectory_target(x["trajs"])
        tracked, tracked_valid = mme.mme_trajectory_from_tracks(x["tracks"], tokens_side=4, frame_size=(64, 64))
        loss = mme.mme_loss(target.tanh(), target, valid, hog.sigmoid(), hog)
        return hog, hog_u8, target, valid, tracked, tracked_valid, loss.loss, loss.per_token

    expected = step(cpu)
    gpu = {k: v.cuda() for k, v in cpu.items()}
    step(gpu)  # warm-up: builds the cached device constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step(gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # HOG: CUDA's atan2 may put a pixel exactly on (or off) an integer phi where the CPU did not (P3: it then
    # votes nothing), so the README's ambiguous entries are left out, and the loss gets a looser bound
    clear = torch.from_numpy(~vec["hog_ambiguous"])
    for a, b in zip(got[:2], expected[:2]):
        torch.testing.assert_close(a.cpu()[clear], b[clear], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[2:6], expected[2:6]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[6].cpu(), expected[6], rtol=1e-3, atol=0)


def test_extract_video_end_to_end():
    """Farneback -> byte storage -> decode -> integer tracking on a texture moving (+2.5, -1.5) px per frame: the
    stored steps are trunc(decoded) = (2, -1) away from the borders, 2.5 px decoding to 2.431 and -1.5 to -1.490."""
    pytest.importorskip("cv2")
    yy, xx = np.mgrid[0:48, 0:64].astype(np.float64)

    def texture(i):
        x, y = xx - 2.5 * i, yy + 1.5 * i
        v = 128 + 60 * np.sin(2 * np.pi * x / 17) * np.cos(2 * np.pi * y / 13) + 40 * np.sin(2 * np.pi * (x + y) / 23)
        return np.clip(np.rint(v), 0, 255).astype(np.uint8)

    frames = np.repeat(np.stack([texture(i) for i in range(7)])[..., None], 3, axis=-1)
    disp, valid = mme.mme_extract_video(frames, traj_len=3)
    assert disp.shape == (6, 3, 6, 8) and disp.dtype == torch.int8 and valid.shape == (3, 6, 8)
    inner = disp[:, :, 1:-1, 1:-2]  # away from the borders (and from where the points leave on the right)
    assert (inner[:3] == 2).float().mean() > 0.95 and (inner[3:] == -1).float().mean() > 0.95
    np.testing.assert_allclose(mme.decode_flow_u8(mme.encode_flow_u8(np.array([2.5, -1.5]))), [2.4313726, -1.4901961],
                               atol=1e-6)
    assert bool(valid[:, 1:-1, :-2].all())
