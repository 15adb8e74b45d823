"""Motion targets: the torch twin against the official vectors and a float64 brute-force loop; the Triton kernel
against the twin (interpreter on CPU, CUDA on a GPU machine)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import reference_path, reference_sets

from trackmae_stream import kernels
from trackmae_stream.kernels import _triton as triton_support
from trackmae_stream.kernels.motion import (
    motion_targets_torch,
    motion_targets_triton,
    step_displacements,
    upsample_tracks,
)

needs_triton = pytest.mark.skipif(not triton_support.HAS_TRITON, reason="triton does not import")


@pytest.fixture(scope="module", params=reference_sets("targets/targets"))
def vector_set(request) -> str:
    """Every vector set present (A ships; a hold-out set with the same keys is tested the same way)."""
    return request.param


@pytest.fixture(scope="module")
def vectors(vector_set):
    with np.load(reference_path(f"targets/targets_{vector_set}.npz")) as data:
        return {key: torch.from_numpy(data[key]) for key in data.files}


@pytest.fixture(scope="module")
def bins(vector_set):
    with np.load(reference_path(f"targets/bins_{vector_set}.npz")) as data:
        return {key: torch.from_numpy(data[key]) for key in data.files if "mean_disp" in key or "tracks" in key}


MODES = {"up": ("tracks14", 2), "noup": ("tracks28", 1)}  # input key, upsample factor; 14x14 tokens either way


# ------------------------------------------------------------------------------------------------ official vectors


def test_upsampled_tracks_match_official(vectors):
    up = upsample_tracks(vectors["tracks14"], 2).reshape(vectors["up_tracks28"].shape)
    torch.testing.assert_close(up, vectors["up_tracks28"], rtol=0, atol=1e-4)
    disp = step_displacements(upsample_tracks(vectors["tracks14"], 2), "frame")
    torch.testing.assert_close(disp.reshape(vectors["up_disp_grid"].shape), vectors["up_disp_grid"], rtol=0,
                               atol=2e-4)


@pytest.mark.parametrize("mode", MODES)
def test_raw_displacement_targets_match_official(vectors, mode):
    key, upsample = MODES[mode]
    targets, _ = motion_targets_torch(vectors[key], tokens_side=14, upsample=upsample, norm="none")
    tokens = targets.reshape(vectors[f"{mode}_disp_tokens"].shape)
    if mode == "noup":  # inputs on a 1/256 lattice: differences are exact
        assert torch.equal(tokens, vectors["noup_disp_tokens"])
        assert torch.equal(targets, vectors["noup_target_none"])
    else:
        torch.testing.assert_close(tokens, vectors["up_disp_tokens"], rtol=0, atol=2e-4)
        torch.testing.assert_close(targets, vectors["up_target_none"], rtol=0, atol=2e-4)


@pytest.mark.parametrize("mode", MODES)
def test_patch_normalised_targets_match_official(vectors, vector_set, mode):
    key, upsample = MODES[mode]
    targets, _ = motion_targets_torch(vectors[key], tokens_side=14, upsample=upsample, norm="patch")
    official = vectors[f"{mode}_target_patch"]
    if mode == "noup":
        torch.testing.assert_close(targets, official, rtol=0, atol=1e-5)
        if vector_set == "a":  # README: rigid and static tokens have equal displacements; 0 / (0 + eps) there
            rigid = vectors["noup_token_std_f64"].amax(dim=-1) == 0
            assert int(rigid.sum()) > 0 and bool((targets[rigid] == 0).all())
        return
    # README: |delta| <= 1e-5 + 1e-4 / sigma per element, ill-conditioned tokens skipped
    well = ~vectors["up_ill_conditioned"]
    sigma = vectors["up_token_std_f64"].float()  # (B, N, 2): per token, x and y
    sigma = sigma[:, :, None, :].expand(-1, -1, 4, -1).reshape(official.shape)  # value index 2*p + c
    delta = (targets - official).abs()
    assert bool((delta[well] <= 1e-5 + 1e-4 / sigma[well]).all()), float(delta[well].max())


@pytest.mark.parametrize("mode", MODES)
def test_token_stat_matches_official_binning_statistic(vectors, bins, mode):
    key, upsample = MODES[mode]
    for prefix, tracks in (("", vectors[key]), ("tiefree_", bins[f"tiefree_{key}"])):
        _, token_stat = motion_targets_torch(tracks, tokens_side=14, upsample=upsample)
        torch.testing.assert_close(token_stat, bins[f"{prefix}{mode}_mean_disp"], rtol=0, atol=1e-5)
        assert torch.equal(kernels.motion_token_stat(tracks, tokens_side=14), token_stat)  # the stat-only path


def test_patch_safe_suppresses_amplified_noise(vectors):
    """Official float32 gives up to |0.78| of pure rounding noise on rigid tokens (float64 gives ~0); the eps-safe
    option stays near the float64 value there and near the official value where tokens really deform."""
    safe, _ = motion_targets_torch(vectors["tracks14"], tokens_side=14, upsample=2, norm="patch_safe", safe_eps=1e-2)
    ill = vectors["up_ill_conditioned"]
    if bool(ill.any()):  # set A: rigid and static tokens, where the official output is noise up to |0.78|
        assert float(vectors["up_target_patch"][ill].abs().max()) > 0.1  # the flaw is really there
    torch.testing.assert_close(safe[ill], vectors["up_target_patch_f64"][ill].float(), rtol=0, atol=1e-2)
    sigma = vectors["up_token_std_f64"].amin(dim=-1)
    deforming = sigma > 0.5  # std >> safe_eps: relative change ~ safe_eps**2 / (2 sigma**2) <= 2e-4
    torch.testing.assert_close(safe[deforming], vectors["up_target_patch_f64"][deforming].float(), rtol=1e-3,
                               atol=1e-3)


# ----------------------------------------------------------------------------------- float64 brute-force definition


def brute_force_targets(tracks: np.ndarray, tokens_side: int, upsample: int, displacement: str, norm: str,
                        eps: float, safe_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The definitions written as plain loops in float64 (independent of the vectorised twins)."""
    batch, frames, points, _ = tracks.shape
    grid = int(round(points ** 0.5))
    side = grid * upsample
    s = side // tokens_side
    pool = grid // tokens_side
    pos = tracks.astype(np.float64).reshape(batch, frames, grid, grid, 2)

    def sample(b, f, row, col):
        if upsample == 1:
            return pos[b, f, row, col]
        sy, sx = row * (grid - 1) / (side - 1), col * (grid - 1) / (side - 1)
        y0, x0 = min(int(sy), grid - 1), min(int(sx), grid - 1)
        y1, x1 = min(y0 + 1, grid - 1), min(x0 + 1, grid - 1)
        wy, wx = sy - y0, sx - x0
        return ((1 - wy) * ((1 - wx) * pos[b, f, y0, x0] + wx * pos[b, f, y0, x1])
                + wy * ((1 - wx) * pos[b, f, y1, x0] + wx * pos[b, f, y1, x1]))

    targets = np.zeros((batch, frames * tokens_side ** 2, 2 * s * s))
    for b, t, i, j in itertools.product(range(batch), range(frames), range(tokens_side), range(tokens_side)):
        k = min(t, frames - 2)
        values = np.zeros((s * s, 2))
        for r, q in itertools.product(range(s), range(s)):
            row, col = i * s + r, j * s + q
            start = 0 if displacement == "first" else k
            values[r * s + q] = sample(b, k + 1, row, col) - sample(b, start, row, col)
        if norm != "none":
            mean = values.mean(axis=0)
            var = ((values - mean) ** 2).sum(axis=0) / (s * s - 1)
            scale = np.sqrt(var) + eps if norm == "patch" else np.sqrt(var + safe_eps ** 2)
            values = (values - mean) / scale
        targets[b, (t * tokens_side + i) * tokens_side + j] = values.reshape(-1)  # index 2*p + c

    stat = np.zeros((batch, tokens_side ** 2))
    for b, i, j in itertools.product(range(batch), range(tokens_side), range(tokens_side)):
        total = 0.0
        for a, c in itertools.product(range(pool), range(pool)):
            xy = pos[b, :, i * pool + a, j * pool + c]
            total += np.linalg.norm(xy[1:] - xy[:-1], axis=-1).mean()
        stat[b, i * tokens_side + j] = total / pool ** 2
    return targets, stat


def random_tracks(batch: int, frames: int, grid: int, seed: int) -> torch.Tensor:
    """Absolute positions on a jittered grid that random-walk a few pixels per frame (no rigid tokens)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.stack(torch.meshgrid(torch.arange(grid) * 9.0 + 4, torch.arange(grid) * 7.0 + 3, indexing="ij")[::-1],
                       dim=-1).reshape(1, 1, grid * grid, 2)
    walk = torch.cumsum(torch.randn(batch, frames, grid * grid, 2, generator=gen) * 2.5, dim=1)
    return (base + walk + torch.rand(batch, 1, grid * grid, 2, generator=gen) * 3).float()


# (batch, frames, G, upsample, tokens_side): odd sizes, T = 2 (one real step), s = G*u/h from 1 to 4, pooled
# statistics (G > h) on three of them
SHAPES = [(2, 3, 5, 3, 5), (3, 4, 6, 2, 3), (2, 5, 6, 1, 3), (2, 3, 3, 1, 3), (1, 2, 4, 2, 2)]
OPTIONS = [("frame", "patch"), ("first", "patch_safe"), ("first", "none"), ("frame", "none")]
CASES = [(shape, option) for shape in SHAPES for option in OPTIONS
         if not (shape[2] * shape[3] // shape[4] == 1 and option[1] != "none")]


@pytest.mark.parametrize("shape,option", CASES)
def test_torch_twin_matches_brute_force(shape, option):
    batch, frames, grid, upsample, tokens_side = shape
    displacement, norm = option
    tracks = random_tracks(batch, frames, grid, seed=sum(shape))
    targets, stat = motion_targets_torch(tracks, tokens_side=tokens_side, upsample=upsample,
                                         displacement=displacement, norm=norm, eps=1e-6, safe_eps=0.3)
    expected_targets, expected_stat = brute_force_targets(tracks.numpy(), tokens_side, upsample, displacement, norm,
                                                          1e-6, 0.3)
    torch.testing.assert_close(targets.double(), torch.from_numpy(expected_targets), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(stat.double(), torch.from_numpy(expected_stat), rtol=1e-6, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("shape,option", CASES)
def test_triton_matches_torch_twin(shape, option):
    batch, frames, grid, upsample, tokens_side = shape
    displacement, norm = option
    tracks = random_tracks(batch, frames, grid, seed=7 * sum(shape))
    kwargs = dict(tokens_side=tokens_side, upsample=upsample, displacement=displacement, norm=norm, safe_eps=0.3)
    targets, stat = motion_targets_triton(tracks, **kwargs)
    expected_targets, expected_stat = motion_targets_torch(tracks, **kwargs)
    assert targets.shape == expected_targets.shape and targets.dtype == torch.float32
    if upsample == 1 and norm == "none":
        assert torch.equal(targets, expected_targets)  # plain differences of the same float32 inputs
    else:
        torch.testing.assert_close(targets, expected_targets, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stat, expected_stat, rtol=1e-6, atol=1e-6)


@needs_triton
def test_triton_reproduces_official_no_upsample_targets(vectors):
    targets, stat = motion_targets_triton(vectors["tracks28"], tokens_side=14, upsample=1, norm="none")
    assert torch.equal(targets, vectors["noup_target_none"])
    targets, _ = motion_targets_triton(vectors["tracks28"], tokens_side=14, upsample=1, norm="patch")
    torch.testing.assert_close(targets, vectors["noup_target_patch"], rtol=0, atol=1e-5)


def test_bf16_output_is_the_rounded_fp32_result():
    tracks = random_tracks(2, 3, 6, seed=1)
    fp32, stat32 = motion_targets_torch(tracks, tokens_side=3, upsample=2)
    bf16, stat16 = motion_targets_torch(tracks, tokens_side=3, upsample=2, out_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and stat16.dtype == torch.float32
    assert torch.equal(bf16, fp32.to(torch.bfloat16)) and torch.equal(stat16, stat32)


@pytest.mark.parametrize("batch,frames,grid,tokens_side", [(3, 5, 15, 5), (2, 2, 12, 4), (1, 7, 9, 9)])
def test_stat_only_path_equals_the_fused_statistic(batch, frames, grid, tokens_side):
    tracks = random_tracks(batch, frames, grid, seed=grid)
    _, fused = kernels.motion_targets(tracks, tokens_side=tokens_side, upsample=1, norm="none")
    alone = kernels.motion_token_stat(tracks, tokens_side=tokens_side)
    assert alone.shape == (batch, tokens_side ** 2) and torch.equal(alone, fused)
    with pytest.raises(ValueError, match="motion_token_stat: .*multiple of tokens_side"):
        kernels.motion_token_stat(tracks, tokens_side=tokens_side + 1)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(tracks=torch.randn(2, 3, 16, 3)), ValueError, r"\(B, T, G\*G, 2\)"),
    (dict(tracks=torch.randn(2, 3, 15, 2)), ValueError, "square grid"),
    (dict(tracks=torch.randn(2, 1, 16, 2)), ValueError, "T >= 2"),
    (dict(tracks=torch.zeros(2, 3, 16, 2, dtype=torch.int32)), TypeError, "floating point"),
    (dict(tokens_side=3), ValueError, "not a multiple of tokens_side"),
    (dict(tokens_side=8, upsample=4), ValueError, "raw grid side G = 4"),
    (dict(tokens_side=4, upsample=1), ValueError, "needs >= 2x2 points"),
    (dict(displacement="cumulative"), ValueError, "displacement must be one of"),
    (dict(norm="std"), ValueError, "norm must be one of"),
    (dict(upsample=0), ValueError, "upsample must be an int"),
    (dict(out_dtype=torch.float64), ValueError, "out_dtype"),
])
def test_bad_arguments_raise(kwargs, error, match):
    call = dict(tracks=torch.randn(2, 3, 16, 2), tokens_side=2, upsample=2)
    call.update(kwargs)
    with pytest.raises(error, match=match):
        kernels.motion_targets(call.pop("tracks"), **call)


@pytest.mark.gpu
@pytest.mark.parametrize("upsample,grid", [(2, 14), (1, 28)])
@pytest.mark.parametrize("norm,displacement", [("patch", "frame"), ("none", "frame"), ("patch_safe", "first")])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_matches_torch(upsample, grid, norm, displacement, out_dtype):
    tracks = (random_tracks(32, 8, grid, seed=grid + upsample) * (200.0 / (9 * grid))).cuda()
    kwargs = dict(tokens_side=14, upsample=upsample, displacement=displacement, norm=norm)
    targets, stat = kernels.motion_targets(tracks, out_dtype=out_dtype, **kwargs)  # backend None on CUDA: Triton
    expected, expected_stat = kernels.motion_targets(tracks.cpu(), backend="torch", **kwargs)
    assert targets.dtype == out_dtype and targets.shape == expected.shape
    # Normalised targets amplify float rounding of the positions (~1.5e-5 px near 224 px; compiled Triton also fuses
    # the bilinear into FMAs) by 1/std, so compare the error in pixels: |delta| * std, on tokens whose points spread.
    raw, _ = kernels.motion_targets(tracks.cpu(), backend="torch", **{**kwargs, "norm": "none"})
    std = raw.reshape(raw.shape[0], raw.shape[1], -1, 2).std(dim=2)  # (B, N, 2): per token and coordinate
    spread = std.amin(dim=-1) > 0.1
    assert float(spread.float().mean()) > 0.95
    delta = (targets.float().cpu() - expected).abs()
    if out_dtype == torch.bfloat16:  # allow one bf16 ulp (2**-7 relative) on top of the fp32 error
        delta = (delta - expected.abs() * 2.0 ** -7).clamp(min=0)
    if norm != "none":
        delta = delta * std[:, :, None, :].expand(-1, -1, raw.shape[-1] // 2, -1).reshape(raw.shape)
    assert float(delta[spread].max()) <= 1e-4, float(delta[spread].max())
    torch.testing.assert_close(stat.cpu(), expected_stat, rtol=1e-5, atol=1e-5)
