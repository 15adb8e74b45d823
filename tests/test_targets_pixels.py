"""Pixel tokens: VideoMAE pixel targets against the official vectors and a float64 loop, visible patches against
nn.Conv3d, and the Triton kernel against the torch twin."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import reference_path, reference_sets

from trackmae_stream import kernels
from trackmae_stream.kernels import _triton as triton_support
from trackmae_stream.kernels.pixels import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    gather_patches_torch,
    gather_patches_triton,
    pixel_targets_torch,
    pixel_targets_triton,
)

needs_triton = pytest.mark.skipif(not triton_support.HAS_TRITON, reason="triton does not import")


@pytest.fixture(scope="module", params=reference_sets("targets/pixel"))
def vector_set(request) -> str:
    """Every vector set present (A ships; a hold-out set with the same keys is tested the same way)."""
    return request.param


@pytest.fixture(scope="module")
def vectors(vector_set):
    with np.load(reference_path(f"targets/pixel_{vector_set}.npz")) as data:
        return {key: torch.from_numpy(data[key]) for key in data.files}


def normalise_like_the_dataset(frames_u8: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float32, as VideoMAE's transforms do: /255, -mean, /std."""
    x = frames_u8.permute(0, 4, 1, 2, 3).float().div(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def small_clip():
    """Odd-sized random frames: B=2, T=6, H=12, W=20 with 4x4 patches -> 3 x 3 x 5 = 45 tokens (tubelet 2)."""
    gen = torch.Generator().manual_seed(11)
    frames = torch.randint(0, 256, (2, 6, 12, 20, 3), generator=gen, dtype=torch.uint8)
    frames[0, 2:4, 4:8, 8:12] = 77  # one flat token: zero variance
    idx = torch.sort(torch.randperm(45, generator=gen)[:13]).values.expand(2, 13).clone()
    idx[1] = torch.sort(torch.randperm(45, generator=gen)[:13]).values
    return frames, normalise_like_the_dataset(frames), idx


# ------------------------------------------------------------------------------------------------ official vectors


def test_unnormalised_video_is_bit_exact(vectors):
    raw = pixel_targets_torch(vectors["videos_normalised"], layout="BCTHW", normalize=False)
    assert torch.equal(raw, vectors["target_unnorm"])  # float32 video*std + mean, bit for bit


@pytest.mark.parametrize("layout", ["BCTHW", "BTHWC"])
def test_pixel_targets_match_official(vectors, vector_set, layout):
    video = vectors["videos_normalised"] if layout == "BCTHW" else vectors["frames_uint8_BTHWC"]
    unnorm = pixel_targets_torch(video, layout=layout, normalize=False)
    torch.testing.assert_close(unnorm, vectors["target_unnorm"], rtol=0, atol=1e-6)
    target = pixel_targets_torch(video, layout=layout)
    well = ~vectors["ill_conditioned"]
    torch.testing.assert_close(target[well], vectors["target_norm"][well], rtol=0, atol=1e-4)
    assert float((target - vectors["target_norm"]).abs().max()) <= 1.0  # flat patches: README allows |delta| <= 1
    if vector_set == "a":
        assert int(vectors["ill_conditioned"].sum()) == 32  # README: the flat block, 4 spatial tokens x 8 slots


def test_uint8_path_gathers_the_dataset_normalisation(vectors):
    """Visible patches from uint8 frames equal those from the dataset's normalised float video."""
    idx = torch.tensor([[0, 1, 15, 34, 200, 777, 1567]]).expand(vectors["frames_uint8_BTHWC"].shape[0], -1)
    from_u8 = gather_patches_torch(vectors["frames_uint8_BTHWC"], idx, layout="BTHWC")
    from_float = gather_patches_torch(vectors["videos_normalised"], idx, layout="BCTHW")
    torch.testing.assert_close(from_u8, from_float, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------- independent float64 definitions


def brute_force_pixel_targets(frames_u8: torch.Tensor, idx: torch.Tensor, tubelet: int, patch: int,
                              normalize: bool, eps: float) -> torch.Tensor:
    """Loop over tokens in float64: slice the tubelet, order (kt, kh, kw, c), standardise per channel."""
    batch, frames, height, width, _ = frames_u8.shape
    gh, gw = height // patch, width // patch
    out = torch.zeros(batch, idx.shape[1], tubelet * patch * patch * 3, dtype=torch.float64)
    for b, m in itertools.product(range(batch), range(idx.shape[1])):
        n = int(idx[b, m])
        t, h, w = n // (gh * gw), (n // gw) % gh, n % gw
        block = frames_u8[b, t * tubelet:(t + 1) * tubelet, h * patch:(h + 1) * patch, w * patch:(w + 1) * patch]
        values = block.double().reshape(-1, 3) / 255.0
        if normalize:
            values = (values - values.mean(dim=0)) / (values.std(dim=0, unbiased=True) + eps)
        out[b, m] = values.reshape(-1)
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_pixel_targets_match_brute_force(small_clip, normalize):
    frames_u8, video, idx = small_clip
    expected = brute_force_pixel_targets(frames_u8, idx, 2, 4, normalize, 1e-6)
    for layout, source in (("BTHWC", frames_u8), ("BCTHW", video)):
        got = pixel_targets_torch(source, idx, tubelet=2, patch=4, layout=layout, normalize=normalize)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("layout", ["BCTHW", "BTHWC"])
def test_gathered_patches_embed_like_conv3d(small_clip, layout):
    """F.linear(patches, conv.weight.flatten(1), conv.bias) == Conv3d patch embedding at the gathered tokens."""
    frames_u8, video, idx = small_clip
    conv = torch.nn.Conv3d(3, 7, kernel_size=(2, 4, 4), stride=(2, 4, 4)).double()
    patches = kernels.gather_patches(frames_u8 if layout == "BTHWC" else video, idx, tubelet=2, patch=4,
                                     layout=layout)
    assert patches.shape == (2, 13, 3 * 2 * 4 * 4)
    embedded = torch.nn.functional.linear(patches.double(), conv.weight.flatten(1), conv.bias)
    with torch.no_grad():
        tokens = conv(video.double()).flatten(2).transpose(1, 2)  # (B, 45, 7), token t*15 + h*5 + w
    expected = tokens.gather(1, idx[..., None].expand(-1, -1, 7))
    torch.testing.assert_close(embedded.detach(), expected, rtol=1e-6, atol=1e-5)


def test_idx_none_means_every_token_and_out_dtype(small_clip):
    frames_u8, _, _ = small_clip
    every = torch.arange(45).expand(2, 45)
    full = pixel_targets_torch(frames_u8, tubelet=2, patch=4, layout="BTHWC")
    assert torch.equal(full, pixel_targets_torch(frames_u8, every, tubelet=2, patch=4, layout="BTHWC"))
    half = pixel_targets_torch(frames_u8, tubelet=2, patch=4, layout="BTHWC", out_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, full.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------- triton vs torch


@needs_triton
@pytest.mark.parametrize("layout", ["BCTHW", "BTHWC"])
def test_triton_gather_patches_matches_torch(small_clip, layout):
    frames_u8, video, idx = small_clip
    source = frames_u8 if layout == "BTHWC" else video
    got = gather_patches_triton(source, idx, tubelet=2, patch=4, layout=layout)
    expected = gather_patches_torch(source, idx, tubelet=2, patch=4, layout=layout)
    if layout == "BCTHW":
        assert torch.equal(got, expected)  # a pure copy
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("layout", ["BCTHW", "BTHWC"])
@pytest.mark.parametrize("normalize,use_idx", [(True, True), (False, True), (True, False)])
def test_triton_pixel_targets_match_torch(small_clip, layout, normalize, use_idx):
    frames_u8, video, idx = small_clip
    source = frames_u8 if layout == "BTHWC" else video
    kwargs = dict(tubelet=2, patch=4, layout=layout, normalize=normalize)
    got = pixel_targets_triton(source, idx if use_idx else None, **kwargs)
    expected = pixel_targets_torch(source, idx if use_idx else None, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_flat_patches_give_zero_targets(backend):
    """Tokens of one random colour: std 0, so any rounding left in the centred values would be amplified by 1/eps
    (the official float32 code gives up to ~0.7 there); the corrected centring gives ~0 in either backend."""
    gen = torch.Generator().manual_seed(21)
    frames = torch.randint(0, 256, (2, 6, 12, 20, 3), generator=gen, dtype=torch.uint8)
    colours = torch.randint(1, 256, (6, 3), generator=gen, dtype=torch.uint8)
    flat = [(0, 0, 0, 0), (0, 1, 2, 3), (1, 2, 1, 4), (1, 0, 2, 1), (0, 2, 0, 2), (1, 1, 1, 0)]  # (b, t, h, w)
    for (b, t, h, w), colour in zip(flat, colours):
        frames[b, 2 * t:2 * t + 2, 4 * h:4 * h + 4, 4 * w:4 * w + 4] = colour
    video = normalise_like_the_dataset(frames)
    for layout, source in (("BTHWC", frames), ("BCTHW", video)):
        targets = kernels.pixel_targets(source, tubelet=2, patch=4, layout=layout, backend=backend)
        for b, t, h, w in flat:
            assert float(targets[b, t * 15 + h * 5 + w].abs().max()) <= 1e-5, (layout, b, t, h, w)
        others = targets[1, 3 * 15 - 1]  # a textured token is still standardised
        assert abs(float(others.reshape(-1, 3).std(dim=0).mean()) - 1.0) < 0.05


@needs_triton
def test_triton_handles_odd_tubelet_and_strided_input():
    """Tubelet 3, non-square 3x3 patches, a non-contiguous BCTHW view and int32 indices."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2, 3, 9, 9, 15, generator=gen)
    video = base.transpose(3, 4).contiguous().transpose(3, 4)  # same values, non-contiguous strides
    idx = torch.tensor([[0, 4, 13, 26], [1, 2, 3, 25]], dtype=torch.int32)
    for fn_triton, fn_torch in ((gather_patches_triton, gather_patches_torch),
                                (pixel_targets_triton, pixel_targets_torch)):
        got = fn_triton(video, idx, tubelet=3, patch=3, layout="BCTHW")
        expected = fn_torch(base, idx, tubelet=3, patch=3, layout="BCTHW")
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(layout="NCHW"), ValueError, "layout must be one of"),
    (dict(layout="BCTHW"), TypeError, "normalised float video"),
    (dict(video=torch.zeros(2, 6, 12, 20, 3)), TypeError, "uint8"),
    (dict(video=torch.zeros(2, 6, 12, 20, 4, dtype=torch.uint8)), ValueError, "3 channels"),
    (dict(patch=5), ValueError, "not divisible"),
    (dict(tubelet=4), ValueError, "not divisible"),
    (dict(idx=torch.zeros(3, 5, dtype=torch.int64)), ValueError, "idx must be a"),
    (dict(idx=torch.zeros(2, 5)), TypeError, "int64 or int32"),
    (dict(std=(0.2, 0.0, 0.2)), ValueError, "std > 0"),
    (dict(out_dtype=torch.int8), ValueError, "out_dtype"),
])
def test_bad_arguments_raise(kwargs, error, match):
    call = dict(video=torch.zeros(2, 6, 12, 20, 3, dtype=torch.uint8), idx=torch.zeros(2, 5, dtype=torch.int64),
                tubelet=2, patch=4, layout="BTHWC")
    call.update(kwargs)
    with pytest.raises(error, match=match):
        kernels.gather_patches(call.pop("video"), call.pop("idx"), **call)


# ------------------------------------------------------------------------------------------------------------ gpu


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_matches_torch(vectors, out_dtype):
    """Training shapes (16 x 224^2, 2x16x16 tubelets) on the vectors' clip twice over, 90% of tokens as targets."""
    frames = vectors["frames_uint8_BTHWC"].repeat(2, 1, 1, 1, 1).cuda()
    video = vectors["videos_normalised"].repeat(2, 1, 1, 1, 1).cuda()
    gen = torch.Generator().manual_seed(0)
    order = torch.rand(2, 1568, generator=gen).argsort(dim=1)
    visible = torch.sort(order[:, :157], dim=1).values.cuda()
    masked = torch.sort(order[:, 157:], dim=1).values.cuda()
    tolerance = dict(rtol=1e-5, atol=1e-5) if out_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    well = ~vectors["ill_conditioned"].repeat(2, 1).cuda().gather(1, masked)  # flat patches: amplified noise
    for layout, source in (("BTHWC", frames), ("BCTHW", video)):
        patches = kernels.gather_patches(source, visible, layout=layout, out_dtype=out_dtype)
        expected = kernels.gather_patches(source, visible, layout=layout, backend="torch")
        assert patches.dtype == out_dtype
        torch.testing.assert_close(patches.float(), expected, **tolerance)
        for normalize in (True, False):
            target = kernels.pixel_targets(source, masked, layout=layout, normalize=normalize, out_dtype=out_dtype)
            expected = kernels.pixel_targets(source, masked, layout=layout, normalize=normalize, backend="torch")
            torch.testing.assert_close(target.float()[well], expected[well], **tolerance)
