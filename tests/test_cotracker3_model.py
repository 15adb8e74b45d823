"""CoTracker3 model components against independent float64 references, and batching by construction.

The batch tests use the hash fill (strong, point-dependent dynamics) on random videos of odd sizes with per-sample
query frames and border queries: the batched forward must equal running each sample alone.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import reference_path
from test_cotracker3_fill import filled_model

from trackmae_stream.tracking.cotracker3.blocks import Attention
from trackmae_stream.tracking.cotracker3.model import CoTrackerThreeOffline, motion_posenc

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def hash_model():
    return filled_model("hash")


def _bilinear_border(image: np.ndarray, x: float, y: float) -> np.ndarray:
    """image (C, H, W) sampled at pixel-centre (x, y), coordinates clamped to the image (border padding)."""
    height, width = image.shape[1:]
    x, y = min(max(x, 0.0), width - 1.0), min(max(y, 0.0), height - 1.0)
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    x1, y1 = min(x0 + 1, width - 1), min(y0 + 1, height - 1)
    wx, wy = x - x0, y - y0
    return ((1 - wy) * ((1 - wx) * image[:, y0, x0] + wx * image[:, y0, x1])
            + wy * ((1 - wx) * image[:, y1, x0] + wx * image[:, y1, x1]))


def _patch(image: np.ndarray, x: float, y: float, radius: int = 3) -> np.ndarray:
    """((2r+1)^2, C) features around (x, y), x offset major: entry a * (2r+1) + b is (x + a - r, y + b - r)."""
    offsets = range(-radius, radius + 1)
    return np.stack([_bilinear_border(image, x + dx, y + dy) for dx in offsets for dy in offsets])


def test_pyramid_support_and_correlation_against_brute_force(hash_model):
    gen = torch.Generator().manual_seed(3)
    batch, n_frames, height, width, n_points = 2, 3, 13, 17, 3
    fmaps = torch.randn(batch, n_frames, 128, height, width, generator=gen)
    fmaps = fmaps / fmaps.norm(dim=2, keepdim=True)
    query_frames = torch.tensor([[0, 2, 1], [2, 0, 2]])
    query_xy = torch.rand(batch, n_points, 2, generator=gen) * torch.tensor([width + 2.0, height + 2.0]) - 1.0
    coords = torch.rand(batch, n_points, n_frames, 2, generator=gen) * torch.tensor([width + 6.0, height + 6.0]) - 3.0

    pyramid = hash_model.feature_pyramid(fmaps)
    support = hash_model.query_support_features(pyramid, query_frames, query_xy)
    captured = []
    hook = hash_model.corr_mlp.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    with torch.no_grad():
        hash_model.correlation_embedding(pyramid, support, coords)
    hook.remove()
    volumes = torch.stack(captured)  # one corr_mlp call per level: (levels, B, N, T, 49 * 49)

    level = fmaps.double().numpy()
    for i in range(4):
        if i > 0:  # 2x2 average pooling, odd sizes floor
            h2, w2 = level.shape[-2] // 2, level.shape[-1] // 2
            level = level[..., : 2 * h2, : 2 * w2].reshape(*level.shape[:3], h2, 2, w2, 2).mean(axis=(4, 6))
        np.testing.assert_allclose(pyramid[i].numpy(), level, rtol=0, atol=1e-6)
        for b in range(batch):
            for n in range(n_points):
                qx, qy = (query_xy[b, n].double().numpy() / 2 ** i)
                query_patch = _patch(level[b, query_frames[b, n]], qx, qy)
                np.testing.assert_allclose(support[i][b, n].numpy(), query_patch, rtol=0, atol=1e-5)
                for t in range(n_frames):
                    cx, cy = coords[b, n, t].double().numpy() / 2 ** i
                    expected = (_patch(level[b, t], cx, cy) @ query_patch.T).reshape(-1)
                    np.testing.assert_allclose(volumes[i, b, n, t].numpy(), expected, rtol=0, atol=2e-5)


def test_time_embedding_resampling_is_linear_half_pixel():
    model = CoTrackerThreeOffline()
    table = model.time_emb[0].double().numpy()
    for n_frames in (8, 13, 60):
        src = np.clip((np.arange(n_frames) + 0.5) * 60 / n_frames - 0.5, 0, None)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, 59)
        expected = table[lo] * (1 - (src - lo))[:, None] + table[hi] * (src - lo)[:, None]
        np.testing.assert_allclose(model.time_embedding(n_frames)[0].numpy(), expected, rtol=0, atol=5e-6)


def test_motion_posenc_against_float64_formula():
    gen = torch.Generator().manual_seed(5)
    motion = (torch.rand(3, 5, 4, generator=gen) - 0.5) * 0.1
    scales = torch.tensor([2.0 ** i for i in range(10)])
    out = motion_posenc(motion, scales).double()
    x = motion.double()
    xb = torch.stack([x[..., d] * 2.0 ** s for s in range(10) for d in range(4)], dim=-1)  # s-major
    expected = torch.cat([x, torch.sin(xb), torch.cos(xb)], dim=-1)
    assert out.shape[-1] == 84
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_against_float64_softmax(backend):
    torch.manual_seed(0)
    attention = Attention(384, num_heads=8, dim_head=48).eval()
    attention.backend = backend
    x, context = torch.randn(3, 7, 384), torch.randn(3, 11, 384)
    with torch.no_grad():
        out = attention(x, context)
        q = (x.double() @ attention.to_q.weight.double().T + attention.to_q.bias.double())
        kv = context.double() @ attention.to_kv.weight.double().T + attention.to_kv.bias.double()
        k, v = kv[..., :384], kv[..., 384:]
        heads = lambda t: t.reshape(3, -1, 8, 48).transpose(1, 2)  # noqa: E731 - local reshape helper
        weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / np.sqrt(48), dim=-1)
        mixed = (weights @ heads(v)).transpose(1, 2).reshape(3, 7, 384)
        expected = mixed @ attention.to_out.weight.double().T + attention.to_out.bias.double()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)


def test_math_attention_backend_also_reproduces_vector_c():
    # The default is SDPA (see blocks.ATTENTION_BACKENDS); the explicit form must meet the same tolerance.
    data = np.load(reference_path("cotracker3/vector_c.npz"))
    model = filled_model("hash")
    model.set_attention_backend("math")
    with torch.no_grad():
        tracks, vis, conf, _ = model(torch.from_numpy(data["video"]), torch.from_numpy(data["queries"]), iters=4)
    assert np.abs(tracks.numpy() - data["tracks"]).max() <= 1e-3
    assert np.abs(vis.numpy() - data["visibility"]).max() <= 1.25e-4
    with pytest.raises(ValueError, match="unknown attention backend"):
        model.set_attention_backend("flash")


def _random_clips(batch: int, n_frames: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random videos and per-sample queries: different query frames (fractional too), border and corner points."""
    gen = torch.Generator().manual_seed(seed)
    video = torch.rand(batch, n_frames, 3, height, width, generator=gen) * 255
    border = torch.tensor([[0.0, 0.0, 0.0], [n_frames - 1.0, width - 1.0, height - 1.0],
                           [n_frames / 2 + 0.7, 0.0, height / 3], [1.0, width - 1.0, 0.5]])
    queries = []
    for b in range(batch):
        t = torch.randint(0, n_frames, (3, 1), generator=gen).float()
        xy = torch.rand(3, 2, generator=gen) * torch.tensor([width - 1.0, height - 1.0])
        queries.append(torch.cat([border.roll(b, 0), torch.cat([t, xy], 1)]))
    return video, torch.stack(queries)


def test_offline_batched_equals_per_sample(hash_model):
    video, queries = _random_clips(3, 7, 44, 60, seed=11)
    with torch.no_grad():
        batched = hash_model(video, queries, iters=3)[:3]
        single = [hash_model(video[b:b + 1], queries[b:b + 1], iters=3)[:3] for b in range(3)]
    for out, ref in zip(batched, zip(*single)):
        torch.testing.assert_close(out, torch.cat(ref), rtol=0, atol=1e-3)
    assert batched[0].shape == (3, 7, 7, 2)
    assert torch.isfinite(batched[0]).all()
    # The samples differ, so equality is not trivially met by a broadcast.
    assert (batched[0][0] - batched[0][1]).abs().max() > 1.0


def test_encoder_chunking_and_input_checks(hash_model):
    video = torch.rand(2, 5, 3, 36, 44, generator=torch.Generator().manual_seed(7)) * 255
    with torch.no_grad():
        whole = hash_model.encode(video)
        chunked = hash_model.encode(video, chunk_frames=2)  # chunks cross the batch boundary
        per_frame = hash_model.fnet(2 * (video[1, 3:4] / 255.0) - 1)
    assert whole.shape == (2, 5, 128, 9, 11)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole.norm(dim=2), torch.ones(2, 5, 9, 11), rtol=0, atol=1e-5)
    torch.testing.assert_close(whole[1, 3], (per_frame / per_frame.norm(dim=1, keepdim=True))[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        hash_model.encode(video[..., :42])
    with pytest.raises(ValueError, match="too small"):
        hash_model.encode(video[..., :28, :])
    with pytest.raises(ValueError, match=r"queries must be \(B, N, 3\)"):
        hash_model(video, torch.zeros(2, 3, 2))
