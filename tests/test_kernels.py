"""Dispatch layer, counter-based RNG (torch vs Triton, bit for bit) and token gathering with autograd."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trackmae_stream import kernels
from trackmae_stream.kernels import _triton as triton_support
from trackmae_stream.kernels import rng
from trackmae_stream.kernels.gather import gather_tokens_torch, gather_tokens_triton

needs_triton = pytest.mark.skipif(not triton_support.HAS_TRITON, reason="triton does not import")


# ------------------------------------------------------------------------------------------------------- dispatch


def test_default_backend_follows_device_and_env(monkeypatch):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    assert kernels.default_backend("cpu") == "torch"
    assert kernels.default_backend(None) == "torch"
    assert kernels.default_backend("cuda") == ("triton" if triton_support.HAS_TRITON else "torch")
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    assert kernels.resolve_backend(None, "cpu") == "triton"
    assert kernels.resolve_backend("torch", "cpu") == "torch"  # an explicit backend wins over the environment
    monkeypatch.setenv(kernels.BACKEND_ENV, "cuda-please")
    with pytest.raises(ValueError, match=kernels.BACKEND_ENV):
        kernels.default_backend("cpu")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.gather_tokens(torch.randn(1, 3, 2), torch.zeros(1, 1, dtype=torch.int64), backend="cuda")


@needs_triton
def test_env_override_routes_to_triton(monkeypatch):
    """TRACKMAE_KERNEL_BACKEND=triton sends a CPU call through the kernel; without the interpreter that is an error
    that says what to do."""
    x = torch.randn(2, 5, 3)
    idx = torch.tensor([[4, 0], [2, 2]])
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    monkeypatch.setattr(triton_support, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.gather_tokens(x, idx)
    monkeypatch.setenv(kernels.BACKEND_ENV, "torch")
    torch.testing.assert_close(kernels.gather_tokens(x, idx), x[torch.arange(2)[:, None], idx], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------ rng


def _mix32_numpy(words: np.ndarray) -> np.ndarray:
    """lowbias32 with numpy's wrapping uint32 arithmetic: an independent check of the split-multiply torch path."""
    x = words.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def test_mix32_is_exact_on_int64_tensors():
    gen = np.random.default_rng(7)
    words = np.concatenate([gen.integers(0, 2 ** 32, 4093, dtype=np.uint64),
                            np.array([0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1], dtype=np.uint64)])
    expected = _mix32_numpy(words).astype(np.int64)
    got = rng._mix32(torch.from_numpy(words.astype(np.int64)))
    np.testing.assert_array_equal(got.numpy(), expected)
    assert all(rng._mix32(int(w)) == int(e) for w, e in zip(words[:50], expected[:50]))


def test_rng_key_separates_its_inputs_and_rejects_bad_values():
    keys = {rng.rng_key(seed, step, rank) for seed in range(6) for step in range(6) for rank in range(6)}
    assert len(keys) == 216
    assert rng.rng_key(1, 2, 3) != rng.rng_key(3, 2, 1)
    assert rng.rng_key(2 ** 40, 0, 0) != rng.rng_key(0, 0, 0)  # the high word counts
    assert all(0 <= k < 2 ** 32 for k in keys)
    with pytest.raises(ValueError, match="step"):
        rng.rng_key(0, -1, 0)
    with pytest.raises(TypeError, match="rank"):
        rng.rng_key(0, 0, torch.tensor(1))


def test_counter_uniform_values():
    clip = torch.arange(257)[:, None]
    position = torch.arange(509)[None, :]
    draws = rng.counter_uniform_torch(rng.rng_key(3, 11, 0), clip, 1, position)
    assert draws.dtype == torch.float32 and draws.shape == (257, 509)
    assert float(draws.min()) >= 0.0 and float(draws.max()) < 1.0
    assert torch.equal(draws * 2 ** 24, torch.floor(draws * 2 ** 24))  # 24-bit lattice, exact in float32
    # 130813 draws: mean 1/2 and variance 1/12 within ~5 standard errors
    assert abs(float(draws.double().mean()) - 0.5) < 5 * (1 / 12 / draws.numel()) ** 0.5
    assert abs(float(draws.double().var()) - 1 / 12) < 5e-3
    # neighbouring counters are uncorrelated
    lag = torch.corrcoef(torch.stack([draws[:, :-1].flatten(), draws[:, 1:].flatten()]))[0, 1]
    assert abs(float(lag)) < 0.015


@needs_triton
@pytest.mark.parametrize("seed,step,rank", [(0, 0, 0), (2 ** 63 + 5, 17, 3), (12345, 2 ** 33, 7)])
def test_counter_uniform_triton_is_bit_identical(seed, step, rank):
    gen = torch.Generator().manual_seed(seed % 1000)
    n = 3001
    clip = torch.randint(0, 2 ** 32, (n,), generator=gen)
    clip[:3] = torch.tensor([0, 2 ** 31, 2 ** 32 - 1])
    stream = torch.randint(0, 3, (n,), generator=gen)
    position = torch.randint(0, 2 ** 32, (n,), generator=gen)
    key = rng.rng_key(seed, step, rank)
    expected = rng.counter_uniform_torch(key, clip, stream, position)
    got = rng.counter_uniform_triton(key, clip, stream, position)
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------------------------------- gather_tokens


@pytest.fixture(scope="module")
def gather_case():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 11, 7, generator=gen)
    idx = torch.randint(0, 11, (3, 9), generator=gen)
    idx[0, :3] = 5  # repeated indices accumulate in the backward
    grad = torch.randn(3, 9, 7, generator=gen)
    return x, idx, grad


def test_gather_tokens_torch_against_loop(gather_case):
    x, idx, grad = gather_case
    out = gather_tokens_torch(x.double().requires_grad_(), idx)
    expected = torch.stack([torch.stack([x[b, idx[b, m]] for m in range(idx.shape[1])]) for b in range(3)])
    torch.testing.assert_close(out.detach().float(), expected, rtol=0, atol=0)
    x64 = x.double().requires_grad_()
    (grad_x,) = torch.autograd.grad(gather_tokens_torch(x64, idx), x64, grad.double())
    expected_grad = torch.zeros_like(x64)
    for b in range(3):
        for m in range(idx.shape[1]):
            expected_grad[b, idx[b, m]] += grad[b, m].double()
    torch.testing.assert_close(grad_x, expected_grad)


@needs_triton
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_gather_tokens_triton_matches_torch(gather_case, index_dtype):
    x, idx, grad = gather_case
    idx = idx.to(index_dtype)
    x_triton = x.clone().requires_grad_()
    x_torch = x.clone().requires_grad_()
    out_triton = gather_tokens_triton(x_triton, idx)
    out_torch = gather_tokens_torch(x_torch, idx)
    assert out_triton.is_contiguous() and out_triton.shape == (3, 9, 7)
    torch.testing.assert_close(out_triton, out_torch, rtol=0, atol=0)
    (grad_triton,) = torch.autograd.grad(out_triton, x_triton, grad)
    (grad_torch,) = torch.autograd.grad(out_torch, x_torch, grad)
    torch.testing.assert_close(grad_triton, grad_torch, rtol=1e-6, atol=1e-6)


def test_gather_tokens_validates():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"idx must be a \(B, M\) tensor"):
        kernels.gather_tokens(x, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="int64 or int32"):
        kernels.gather_tokens(x, torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"x must be \(B, N, D\)"):
        kernels.gather_tokens(torch.randn(5, 3), torch.zeros(5, 2, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_tokens_cuda(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(32, 1568, 8, generator=gen).to("cuda", dtype)
    idx = torch.sort(torch.rand(32, 1568, generator=gen).argsort(dim=1)[:, :1254], dim=1).values.cuda()
    grad = torch.randn(32, 1254, 8, generator=gen).to("cuda", dtype)
    x_triton, x_torch = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_triton = kernels.gather_tokens(x_triton, idx)  # backend None on CUDA: Triton
    out_torch = kernels.gather_tokens(x_torch, idx, backend="torch")
    assert torch.equal(out_triton, out_torch)
    (grad_triton,) = torch.autograd.grad(out_triton, x_triton, grad)
    (grad_torch,) = torch.autograd.grad(out_torch, x_torch, grad)
    assert torch.equal(grad_triton, grad_torch)  # unique indices: every gradient row is written once


@pytest.mark.gpu
def test_counter_uniform_cuda_matches_cpu():
    key = rng.rng_key(9, 123456, 2)
    clip = torch.arange(64)[:, None]
    position = torch.arange(196)[None, :]
    cpu = rng.counter_uniform_torch(key, clip, 0, position)
    assert torch.equal(rng.counter_uniform_torch(key, clip.cuda(), 0, position.cuda()).cpu(), cpu)
    shape = (64, 196)
    got = rng.counter_uniform_triton(key, clip.expand(shape).cuda(), torch.zeros(shape, dtype=torch.int64).cuda(),
                                     position.expand(shape).cuda())
    assert torch.equal(got.cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_host_sync_on_cuda(backend):
    """One training step's targets and masks, with torch's sync debug mode turning any host sync into an error."""
    gen = torch.Generator().manual_seed(1)
    tracks = (torch.rand(4, 1, 196, 2, generator=gen) * 224 + torch.randn(4, 8, 196, 2, generator=gen)).cuda()
    frames = torch.randint(0, 256, (4, 16, 224, 224, 3), generator=gen, dtype=torch.uint8).cuda()

    def step(step_index: int):
        targets, token_stat = kernels.motion_targets(tracks, tokens_side=14, backend=backend)
        mask = kernels.motion_aware_mask(token_stat, num_frames=8, mask_ratio=0.9, rho=0.5, step=step_index,
                                         backend=backend)
        tube = kernels.tube_mask(4, tokens_per_frame=196, num_frames=8, mask_ratio=0.9, step=step_index,
                                 device="cuda", backend=backend)
        patches = kernels.gather_patches(frames, mask.visible_idx, layout="BTHWC", out_dtype=torch.bfloat16,
                                         backend=backend)
        pixel = kernels.pixel_targets(frames, tube.masked_idx, layout="BTHWC", backend=backend)
        motion = kernels.gather_tokens(targets, mask.masked_idx, backend=backend)
        return patches, pixel, motion

    step(0)  # first call: cached per-device constants, Triton compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
