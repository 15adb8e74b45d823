"""Targets and masking for the trainer: Triton kernels, their torch reference twins, and the dispatch between them.

Installed as `trackmae_stream.kernels`. Every public function takes `backend`:
- None: the environment variable TRACKMAE_KERNEL_BACKEND ("torch" | "triton") when set, else "triton" when the
  inputs live on CUDA and triton imports, else "torch";
- "torch": the reference twin (the definition; runs anywhere);
- "triton": the kernel, also on CPU tensors under TRITON_INTERPRET=1 (set before this package is imported), which is
  how the tests compare the two.

Each idea has one module holding its torch twin and its Triton kernel side by side: `motion` (track -> motion
targets and the binning statistic), `masking` (tube and motion-aware masks), `pixels` (raw visible patches and
pixel targets), `gather` (token gathering with autograd), `rng` (the counter-based draws both backends share).
Nothing here syncs the host: shapes depend only on arguments, and seeds/steps are Python integers.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from . import gather, masking, motion, pixels, rng
from ._triton import HAS_TRITON
from .masking import MaskOutput, motion_bin_counts, visible_per_frame
from .pixels import IMAGENET_MEAN, IMAGENET_STD

BACKENDS = ("torch", "triton")
BACKEND_ENV = "TRACKMAE_KERNEL_BACKEND"


def default_backend(device: torch.device | str | None) -> str:
    """The backend a call with backend=None uses for inputs on `device` (honours TRACKMAE_KERNEL_BACKEND)."""
    forced = os.environ.get(BACKEND_ENV, "").strip()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r} is not one of {BACKENDS}")
        return forced
    device = torch.device(device) if device is not None else torch.device("cpu")
    return "triton" if device.type == "cuda" and HAS_TRITON else "torch"


def resolve_backend(backend: str | None, device: torch.device | str | None) -> str:
    """Validate an explicit backend, or pick the default for `device`."""
    if backend is None:
        return default_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def _pick(backend: str | None, device: torch.device | str | None, torch_fn: Callable, triton_fn: Callable):
    return triton_fn if resolve_backend(backend, device) == "triton" else torch_fn


def _device_of(value, what: str) -> torch.device:
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(value).__name__}")
    return value.device


def motion_targets(tracks: Tensor, *, tokens_side: int, upsample: int = 2, displacement: str = "frame",
                   norm: str = "patch", eps: float = 1e-6, safe_eps: float = 1e-2,
                   out_dtype: torch.dtype = torch.float32, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-token motion targets and the binning statistic from point tracks.

    tracks (B, T, G*G, 2) float absolute (x, y) pixels, row-major points -> (targets (B, T*h*h, 2*s*s) in out_dtype,
    token_stat (B, h*h) float32), h = tokens_side, s = G*upsample/h. displacement "frame" (official) | "first";
    norm "patch" (official) | "none" | "patch_safe". Full definitions: `kernels.motion`.
    """
    fn = _pick(backend, _device_of(tracks, "motion_targets: tracks"), motion.motion_targets_torch,
               motion.motion_targets_triton)
    return fn(tracks, tokens_side=tokens_side, upsample=upsample, displacement=displacement, norm=norm, eps=eps,
              safe_eps=safe_eps, out_dtype=out_dtype)


def motion_targets_visible(tracks: Tensor, visibility: Tensor, *, tokens_side: int, upsample: int = 2,
                           displacement: str = "frame", norm: str = "patch", eps: float = 1e-6,
                           safe_eps: float = 1e-2, visibility_threshold: float = 0.5,
                           out_dtype: torch.dtype = torch.float32,
                           backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`motion_targets` with the tracker's invisible points dropped (the `target.drop_invisible` option).

    visibility (B, T, G*G) in [0, 1] -> (targets (B, T*h*h, 2*s*s) in out_dtype with 0 at invalid values,
    token_stat (B, h*h) float32 over valid steps only, valid (B, T*h*h, 2*s*s) bool). Definitions: `kernels.motion`.
    The official kernel (`backend`) gives the raw and normalised values; tokens with an invalid point are
    renormalised over their valid points in torch (a few small ops, no host sync), all others keep the kernel's
    values bit for bit."""
    geo = motion.check_motion_args(tracks, tokens_side, upsample, displacement, norm, eps, safe_eps, out_dtype,
                                   what="motion_targets_visible")
    motion.check_visibility_args(tracks, visibility, visibility_threshold, "motion_targets_visible")
    kwargs = dict(tokens_side=tokens_side, upsample=upsample, displacement=displacement, eps=eps, safe_eps=safe_eps,
                  backend=backend)
    targets, official_stat = motion_targets(tracks, norm=norm, out_dtype=out_dtype, **kwargs)
    point_valid = motion.motion_point_validity_torch(visibility, tokens_side=tokens_side, upsample=upsample,
                                                     displacement=displacement, threshold=visibility_threshold)
    if norm != "none":
        # A token's mean and std mix its points: renormalise the raw displacements over the valid ones.
        raw = motion_targets(tracks, norm="none", **kwargs)[0]  # float32
        shape = (geo.batch, raw.shape[1], geo.points_side ** 2, 2)
        values, point_valid_norm = motion.masked_token_norm_torch(raw.reshape(shape), point_valid, norm, eps,
                                                                  safe_eps)
        all_valid = point_valid.all(dim=-1, keepdim=True)  # the kernel's values need no change there
        targets = torch.where(all_valid, targets, values.reshape(targets.shape).to(out_dtype))
        point_valid = point_valid_norm
    valid = point_valid.unsqueeze(-1).expand(-1, -1, -1, 2).reshape(targets.shape)  # value index 2*p + c
    targets = torch.where(valid, targets, 0.0)  # a Python scalar keeps the targets' dtype
    token_stat = motion.visible_token_stat_torch(tracks, visibility, tokens_side, visibility_threshold,
                                                 official=official_stat)
    return targets, token_stat, valid


def motion_token_stat(tracks: Tensor, *, tokens_side: int, visibility: Tensor | None = None,
                      visibility_threshold: float = 0.5) -> Tensor:
    """The binning statistic alone (B, h*h) float32, for motion-aware masking without the motion target: the same
    values as `motion_targets(...)[1]` (with `visibility`: as `motion_targets_visible(...)[1]`) at a fraction of
    the work. A handful of torch ops on any device (no kernel of its own: the fused motion kernel already produces
    it when the targets are needed)."""
    motion.check_motion_args(tracks, tokens_side, 1, "frame", "none", 1e-6, 1e-2, torch.float32,
                             what="motion_token_stat")
    if visibility is None:
        return motion.motion_token_stat_torch(tracks, tokens_side)
    motion.check_visibility_args(tracks, visibility, visibility_threshold, "motion_token_stat")
    return motion.visible_token_stat_torch(tracks, visibility, tokens_side, visibility_threshold)


def motion_aware_mask(token_stat: Tensor, *, num_frames: int, mask_ratio: float, rho: float, seed: int = 0,
                      step: int = 0, rank: int = 0, high_draws: Tensor | None = None,
                      low_draws: Tensor | None = None, backend: str | None = None) -> MaskOutput:
    """Motion-aware tube mask from token statistics (B, S): K = S - int(mask_ratio*S) visible per frame, int(rho*K)
    of them from the high-motion half; exactly K always. Draws: counter-based u(seed, step, rank, clip, bin, position)
    unless `high_draws` (B, ceil(S/2)) / `low_draws` (B, S - ceil(S/2)) are given. Definitions: `kernels.masking`."""
    fn = _pick(backend, _device_of(token_stat, "motion_aware_mask: token_stat"), masking.motion_aware_mask_torch,
               masking.motion_aware_mask_triton)
    return fn(token_stat, num_frames=num_frames, mask_ratio=mask_ratio, rho=rho, seed=seed, step=step, rank=rank,
              high_draws=high_draws, low_draws=low_draws)


def tube_mask(batch: int, *, tokens_per_frame: int, num_frames: int, mask_ratio: float, seed: int = 0,
              step: int = 0, rank: int = 0, device: torch.device | str | None = None,
              backend: str | None = None) -> MaskOutput:
    """Plain tube mask (VideoMAE): K visible tokens per frame drawn uniformly (counter-based), repeated over time."""
    fn = _pick(backend, device, masking.tube_mask_torch, masking.tube_mask_triton)
    return fn(batch, tokens_per_frame=tokens_per_frame, num_frames=num_frames, mask_ratio=mask_ratio, seed=seed,
              step=step, rank=rank, device=device)


def gather_patches(video: Tensor, idx: Tensor, *, tubelet: int = 2, patch: int = 16, layout: str,
                   mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                   out_dtype: torch.dtype = torch.float32, backend: str | None = None) -> Tensor:
    """(B, V, 3*tubelet*patch*patch) ImageNet-normalised raw patches of tokens `idx` (B, V), in Conv3d weight order
    (c, kt, kh, kw). layout "BCTHW" (normalised float) or "BTHWC" (uint8 frames). Definitions: `kernels.pixels`."""
    fn = _pick(backend, _device_of(video, "gather_patches: video"), pixels.gather_patches_torch,
               pixels.gather_patches_triton)
    return fn(video, idx, tubelet=tubelet, patch=patch, layout=layout, mean=mean, std=std, out_dtype=out_dtype)


def pixel_targets(video: Tensor, idx: Tensor | None = None, *, tubelet: int = 2, patch: int = 16, layout: str,
                  mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                  normalize: bool = True, eps: float = 1e-6, out_dtype: torch.dtype = torch.float32,
                  backend: str | None = None) -> Tensor:
    """(B, M, tubelet*patch*patch*3) VideoMAE pixel targets of tokens `idx` (None: all), (p0 p1 p2 c) order,
    per-patch per-channel standardised when `normalize`. Definitions: `kernels.pixels`."""
    fn = _pick(backend, _device_of(video, "pixel_targets: video"), pixels.pixel_targets_torch,
               pixels.pixel_targets_triton)
    return fn(video, idx, tubelet=tubelet, patch=patch, layout=layout, mean=mean, std=std, normalize=normalize,
              eps=eps, out_dtype=out_dtype)


def gather_tokens(x: Tensor, idx: Tensor, *, backend: str | None = None) -> Tensor:
    """x (B, N, D), idx (B, M) -> (B, M, D) contiguous, differentiable in x."""
    fn = _pick(backend, _device_of(x, "gather_tokens: x"), gather.gather_tokens_torch, gather.gather_tokens_triton)
    return fn(x, idx)


__all__ = [
    "BACKENDS", "BACKEND_ENV", "IMAGENET_MEAN", "IMAGENET_STD", "MaskOutput", "default_backend", "gather_patches",
    "gather_tokens", "motion_aware_mask", "motion_bin_counts", "motion_targets", "motion_targets_visible",
    "motion_token_stat", "pixel_targets", "resolve_backend", "tube_mask", "visible_per_frame", "rng",
]
