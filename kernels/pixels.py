"""Pixel tokens: raw visible patches for the encoder and VideoMAE per-patch-normalised pixel targets.

Token index n = t*(H/p)*(W/p) + h*(W/p) + w for tubelets of kt frames and p x p pixels (H != W allowed).

Input layouts:
- "BCTHW": float (B, 3, T, H, W), ImageNet-normalised with `mean`/`std` (the reference vectors' layout). Raw values
  are recovered as float32 `video * std + mean`: the torch twin is bit-exact with the official `unnorm_videos`; compiled
  Triton contracts it into one FMA, which may differ by 1 ulp.
- "BTHWC": uint8 (B, T, H, W, 3) raw frames (the trainer's fast path): raw = u8 / 255 and the normalised value is
  (raw - mean) / std, the dataset pipeline's order of operations.

- `gather_patches`: the NORMALISED values of the tokens in `idx`, flattened in Conv3d weight order (c, kt, kh, kw),
  so that `F.linear(patches, conv.weight.flatten(1), conv.bias)` equals the Conv3d patch embedding at those tokens:
  the embedding then runs on the visible tokens only. It is an input, so it needs no backward.
- `pixel_targets`: raw [0, 1] values in (kt, kh, kw, c) order (VideoMAE's `(p0 p1 p2) c`), standardised per patch
  and channel as (v - mean) / (std_unbiased + eps) when `normalize` (VideoMAE's rule). The centring is corrected
  once (the mean of the centred values is subtracted again; 0 in exact arithmetic): a flat patch's float mean is
  off by rounding that depends on the summation order, and / (0 + eps) would amplify that into targets up to ~0.7
  (the official code's noise on flat patches, README_vectors §3); corrected, they are ~1e-8 in any order, so the
  torch twin and the Triton kernel agree there too.

The torch twins are the definitions; one Triton kernel serves both functions, one program per (clip, token), each
input byte read once and the patch statistics accumulated in fp32 registers.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ._triton import HAS_TRITON, next_power_of_2, require_triton, tl, triton
from .gather import check_token_idx

LAYOUTS = ("BCTHW", "BTHWC")
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class PixelGeometry:
    """Sizes of one pixel call, validated."""

    batch: int
    frames: int
    height: int
    width: int
    tubelet: int
    patch: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.frames // self.tubelet, self.height // self.patch, self.width // self.patch

    @property
    def num_tokens(self) -> int:
        gt, gh, gw = self.grid
        return gt * gh * gw

    @property
    def points(self) -> int:
        """Pixels per token and channel."""
        return self.tubelet * self.patch * self.patch


def check_pixel_args(what: str, video: Tensor, idx: Tensor | None, layout: str, tubelet: int, patch: int,
                     mean: tuple[float, ...], std: tuple[float, ...], out_dtype: torch.dtype) -> PixelGeometry:
    """Validate a pixel call and return its sizes; raises ValueError/TypeError naming the problem."""
    if layout not in LAYOUTS:
        raise ValueError(f"{what}: layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(video, Tensor) or video.ndim != 5:
        raise ValueError(f"{what}: video must be a 5-d tensor ({layout}), got "
                         f"{tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__}")
    if layout == "BCTHW":
        batch, channels, frames, height, width = video.shape
        if not video.is_floating_point():
            raise TypeError(f"{what}: layout BCTHW expects a normalised float video, got {video.dtype}")
    else:
        batch, frames, height, width, channels = video.shape
        if video.dtype != torch.uint8:
            raise TypeError(f"{what}: layout BTHWC expects uint8 frames, got {video.dtype}")
    if channels != 3:
        raise ValueError(f"{what}: video must have 3 channels ({layout}), got shape {tuple(video.shape)}")
    if not isinstance(tubelet, int) or not isinstance(patch, int) or tubelet < 1 or patch < 1:
        raise ValueError(f"{what}: tubelet and patch must be ints >= 1, got {tubelet!r}, {patch!r}")
    if frames % tubelet or height % patch or width % patch:
        raise ValueError(f"{what}: video (T, H, W) = ({frames}, {height}, {width}) is not divisible by "
                         f"(tubelet, patch, patch) = ({tubelet}, {patch}, {patch})")
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise ValueError(f"{what}: mean and std need 3 values each and std > 0, got {mean}, {std}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{what}: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    geo = PixelGeometry(batch, frames, height, width, tubelet, patch)
    if idx is not None:
        check_token_idx(what, idx, batch, video.device, "video")
    return geo


@functools.lru_cache(maxsize=32)
def _channel_constants(values: tuple[float, ...], device: torch.device) -> Tensor:
    """(3,) float32 on `device`, cached: building it anew every step would cost a host-to-device copy."""
    return torch.tensor(values, dtype=torch.float32).to(device)


def _channel_view(values: tuple[float, ...], device: torch.device, ndim: int, channel_dim: int) -> Tensor:
    shape = [1] * ndim
    shape[channel_dim] = 3
    return _channel_constants(tuple(float(v) for v in values), device).view(shape)


def _token_values(video: Tensor, idx: Tensor, layout: str, geo: PixelGeometry, channel_last: bool) -> Tensor:
    """The values of tokens `idx` (B, M) in the input's dtype, as one flat gather (no whole-grid copy):
    (B, M, P, 3) in (kt, kh, kw) x c order when `channel_last`, else (B, M, 3, P); P = kt*p*p."""
    video = video.contiguous()
    if layout == "BCTHW":
        stride_b, stride_c, stride_t, stride_h, stride_w = video.stride()
    else:
        stride_b, stride_t, stride_h, stride_w, stride_c = video.stride()
    _, gh, gw = geo.grid
    kt, p = geo.tubelet, geo.patch
    device = video.device
    idx = idx.to(torch.int64)
    t, h, w = idx // (gh * gw), (idx // gw) % gh, idx % gw
    clip = torch.arange(geo.batch, device=device)[:, None]
    token_start = clip * stride_b + t * (kt * stride_t) + h * (p * stride_h) + w * (p * stride_w)  # (B, M)
    point = torch.arange(geo.points, device=device)
    point_offset = (point // (p * p)) * stride_t + (point // p % p) * stride_h + (point % p) * stride_w  # (P,)
    channel_offset = torch.arange(3, device=device) * stride_c
    if channel_last:
        within = point_offset[:, None] + channel_offset[None, :]  # (P, 3)
    else:
        within = channel_offset[:, None] + point_offset[None, :]  # (3, P)
    offsets = token_start[:, :, None, None] + within
    # index_select: on CPU, advanced indexing of this size is ~100x slower here (its threading overhead)
    return video.reshape(-1).index_select(0, offsets.reshape(-1)).view(offsets.shape)


def _all_tokens(geo: PixelGeometry, device: torch.device) -> Tensor:
    return torch.arange(geo.num_tokens, device=device).expand(geo.batch, geo.num_tokens)


def gather_patches_torch(video: Tensor, idx: Tensor, *, tubelet: int = 2, patch: int = 16, layout: str,
                         mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                         out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference twin: (B, M, 3*kt*p*p) normalised values of tokens `idx`, in (c, kt, kh, kw) order."""
    geo = check_pixel_args("gather_patches", video, idx, layout, tubelet, patch, mean, std, out_dtype)
    values = _token_values(video, idx, layout, geo, channel_last=False)  # (B, M, 3, P)
    if layout == "BCTHW":
        normalised = values.float()
    else:
        raw = values.float() / 255.0
        normalised = (raw - _channel_view(mean, video.device, 4, 2)) / _channel_view(std, video.device, 4, 2)
    return normalised.reshape(geo.batch, idx.shape[1], 3 * geo.points).to(out_dtype)


def pixel_targets_torch(video: Tensor, idx: Tensor | None = None, *, tubelet: int = 2, patch: int = 16,
                        layout: str, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                        normalize: bool = True, eps: float = 1e-6, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference twin: (B, M, kt*p*p*3) VideoMAE pixel targets of tokens `idx` (None: all), (p0 p1 p2 c) order."""
    geo = check_pixel_args("pixel_targets", video, idx, layout, tubelet, patch, mean, std, out_dtype)
    if idx is None:
        idx = _all_tokens(geo, video.device)
    values = _token_values(video, idx, layout, geo, channel_last=True)  # (B, M, P, 3)
    if layout == "BCTHW":
        raw = values.float() * _channel_view(std, video.device, 4, 3) + _channel_view(mean, video.device, 4, 3)
    else:
        raw = values.float() / 255.0
    if normalize:
        centred = raw - raw.mean(dim=2, keepdim=True)
        centred = centred - centred.mean(dim=2, keepdim=True)  # corrected centring (module doc): flat patches give ~0
        var = centred.square().sum(dim=2, keepdim=True) / (geo.points - 1)
        raw = centred / (var.sqrt() + eps)
    return raw.reshape(geo.batch, idx.shape[1], geo.points * 3).to(out_dtype)


if HAS_TRITON:

    @triton.jit
    def _per_channel(channel, value0, value1, value2):
        return tl.where(channel == 0, value0, tl.where(channel == 1, value1, value2))

    @triton.jit
    def _patch_kernel(
        video_ptr, idx_ptr, out_ptr, num_idx, num_tokens, grid_h, grid_w,
        stride_b, stride_c, stride_t, stride_h, stride_w,
        mean0, mean1, mean2, std0, std1, std2, eps,
        TUBELET: tl.constexpr, PATCH: tl.constexpr, U8_INPUT: tl.constexpr, RAW_OUTPUT: tl.constexpr,
        CHANNEL_LAST_OUT: tl.constexpr, PATCH_NORM: tl.constexpr, HAS_IDX: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """One program per (clip, output token): gather one tubelet, convert, optionally standardise, store.

        The tile is (points, 4 channel slots, the 4th idle): channel-last frames are then read as contiguous bytes,
        and each per-channel statistic is ONE reduction over the points axis instead of one per channel (fewer
        block-wide barriers). A 1-d grid (clip-major) because the second grid axis is limited to 65535 programs."""
        program = tl.program_id(0).to(tl.int64)
        clip = program // num_idx
        row = program % num_idx
        points: tl.constexpr = TUBELET * PATCH * PATCH
        point = tl.arange(0, BLOCK_P)[:, None]  # (BLOCK_P, 1)
        channel = tl.arange(0, 4)[None, :]  # (1, 4)
        valid = (point < points) & (channel < 3)
        # the token index broadcast over the tile (a scalar-derived mask trips the Triton interpreter)
        token = tl.zeros([BLOCK_P, 4], tl.int64) + row
        if HAS_IDX:
            token = tl.zeros([BLOCK_P, 4], tl.int64) + tl.load(idx_ptr + clip * num_idx + row).to(tl.int64)
        token_ok = (token >= 0) & (token < num_tokens)  # out-of-range indices read zeros instead of faulting
        per_frame = grid_h * grid_w
        t = token // per_frame
        h = (token % per_frame) // grid_w
        w = token % grid_w
        dt = point // (PATCH * PATCH)
        dy = (point // PATCH) % PATCH
        dx = point % PATCH
        offset = (clip * stride_b + channel * stride_c + (t * TUBELET + dt) * stride_t
                  + (h * PATCH + dy) * stride_h + (w * PATCH + dx) * stride_w)
        x = tl.load(video_ptr + offset, mask=valid & token_ok, other=0).to(tl.float32)

        mean = _per_channel(channel, mean0, mean1, mean2)
        std = _per_channel(channel, std0, std1, std2)
        if U8_INPUT:
            raw = tl.div_rn(x, 255.0)
            if RAW_OUTPUT:
                value = raw
            else:
                value = tl.div_rn(raw - mean, std)
        else:
            if RAW_OUTPUT:
                value = x * std + mean
            else:
                value = x

        if PATCH_NORM:
            # IEEE divisions (div_rn): Triton's plain '/' is the 2-ulp approximate division on NVIDIA GPUs
            centre = tl.div_rn(tl.sum(tl.where(valid, value, 0.0), axis=0), points * 1.0)  # (4,)
            centred = value - centre[None, :]
            # the corrected centring of the module doc
            centred -= tl.div_rn(tl.sum(tl.where(valid, centred, 0.0), axis=0), points * 1.0)[None, :]
            var = tl.div_rn(tl.sum(tl.where(valid, centred * centred, 0.0), axis=0), points - 1.0)
            value = tl.div_rn(centred, tl.sqrt_rn(var)[None, :] + eps)

        if CHANNEL_LAST_OUT:
            element = point * 3 + channel
        else:
            element = channel * points + point
        tl.store(out_ptr + (clip * num_idx + row) * (3 * points) + element,
                 value.to(out_ptr.dtype.element_ty), mask=valid)


def _launch_patch_kernel(what: str, video: Tensor, idx: Tensor | None, geo: PixelGeometry, layout: str,
                         mean: tuple[float, ...], std: tuple[float, ...], out_dtype: torch.dtype, *,
                         raw_output: bool, channel_last_out: bool, patch_norm: bool, eps: float) -> Tensor:
    require_triton(video.device, what)
    num_idx = geo.num_tokens if idx is None else idx.shape[1]
    out = torch.empty(geo.batch, num_idx, 3 * geo.points, dtype=out_dtype, device=video.device)
    if out.numel() == 0:
        return out
    if layout == "BCTHW":
        stride_b, stride_c, stride_t, stride_h, stride_w = video.stride()
    else:
        stride_b, stride_t, stride_h, stride_w, stride_c = video.stride()
    _, grid_h, grid_w = geo.grid
    block_p = next_power_of_2(geo.points)
    _patch_kernel[(geo.batch * num_idx,)](
        video, idx.contiguous() if idx is not None else out, out, num_idx, geo.num_tokens, grid_h, grid_w,
        stride_b, stride_c, stride_t, stride_h, stride_w,
        *(float(m) for m in mean), *(float(s) for s in std), float(eps),
        TUBELET=geo.tubelet, PATCH=geo.patch, U8_INPUT=layout == "BTHWC", RAW_OUTPUT=raw_output,
        CHANNEL_LAST_OUT=channel_last_out, PATCH_NORM=patch_norm, HAS_IDX=idx is not None, BLOCK_P=block_p,
        num_warps=4 if block_p <= 256 else 8,
    )
    return out


def gather_patches_triton(video: Tensor, idx: Tensor, *, tubelet: int = 2, patch: int = 16, layout: str,
                          mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                          out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Triton twin of `gather_patches_torch`."""
    geo = check_pixel_args("gather_patches", video, idx, layout, tubelet, patch, mean, std, out_dtype)
    return _launch_patch_kernel("gather_patches", video, idx, geo, layout, mean, std, out_dtype, raw_output=False,
                                channel_last_out=False, patch_norm=False, eps=0.0)


def pixel_targets_triton(video: Tensor, idx: Tensor | None = None, *, tubelet: int = 2, patch: int = 16,
                         layout: str, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                         normalize: bool = True, eps: float = 1e-6,
                         out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Triton twin of `pixel_targets_torch`."""
    geo = check_pixel_args("pixel_targets", video, idx, layout, tubelet, patch, mean, std, out_dtype)
    return _launch_patch_kernel("pixel_targets", video, idx, geo, layout, mean, std, out_dtype, raw_output=True,
                                channel_last_out=True, patch_norm=normalize, eps=eps)
