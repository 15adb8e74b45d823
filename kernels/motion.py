"""Track -> motion target: per-token trajectory targets and the per-token motion statistic used for binning.

Definitions (the official TrackMAE code, README_vectors.md section 1, plus two options that are OFF by default):

- tracks (B, T, G*G, 2): absolute (x, y) pixels, row-major points (y outer, x inner).
- upsample u >= 1: bilinear interpolation of the absolute positions, align_corners=True, G -> G*u per side
  (u = 1: the grid is used as is). s = G*u / tokens_side points per token side.
- displacement "frame": d[k] = x[k+1] - x[k] for k < T-1 and d[T-1] = d[T-2] (official);
  "first": d[k] = x[k+1] - x[0] for k < T-1 and d[T-1] = d[T-2] (cumulative motion, same slot convention).
- token n = t*h*w + i*w + j owns the s*s points (i*s + r, j*s + q); its value index is 2*p + c with p = r*s + q and
  c = 0 for x, 1 for y.
- norm "patch": per token and coordinate over its s*s points, (v - mean) / (std_unbiased + eps) (official);
  "none": raw displacements; "patch_safe": (v - mean) / sqrt(var_unbiased + safe_eps**2). Where a token's points move
  rigidly its std is pure interpolation rounding (~1e-5 px), and dividing by std + 1e-6 blows that noise up to
  O(1) targets; the safe form keeps such tokens at ~0 while leaving tokens with real deformation (std >> safe_eps)
  practically unchanged.
- token_stat (B, h*h): on the RAW tracks, per point the mean over the T-1 real steps of the step length
  |x[k+1] - x[k]|_2, averaged over the (G/h)**2 raw points of each token.

`motion_targets_torch` is the definition; `motion_targets_triton` computes the same in one kernel launch.

Option `drop_invisible` (OFF by default; torch on top of the values above, so the kernels stay the official ones):
with the tracker's visibility (B, T, G*G) and a threshold v,

- a raw point is visible at a frame when visibility >= v (NaN counts as invisible);
- an upsampled point is visible at a frame when every raw point that enters its bilinear interpolation with a
  nonzero weight is visible there (the min rule; computed by upsampling the invisibility indicator with the very
  interpolation the tracks go through and testing > 0). So nothing of an invisible raw point's (finite) track, not
  even a rounding-sized weight, reaches a valid value;
- a point is valid for time slot t when it is visible at both ends of that slot's displacement (frames k and k+1,
  or 0 and k+1 for "first", with k = min(t, T-2); the last slot repeats slot T-2 like the displacement);
- norm "patch" / "patch_safe": a token's mean and unbiased std per coordinate are taken over its valid points only
  (n of them); with n < 2 there is no std and the whole token is dropped (no valid value). norm "none": each valid
  point keeps its raw displacement;
- invalid values are set to 0 and carry validity False (the loss masks them out); tokens whose points are all valid
  take the official values bit for bit (the same numbers: their means run over the same points);
- token_stat: the mean step length over the token's valid (raw point, step) pairs, a step k -> k+1 being valid when
  the raw point is visible at k and at k+1; 0 (the lowest rank) for a token with none. A token whose pairs are all
  valid takes the official value bit for bit (the same mean: every point has the same T-1 steps).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import HAS_TRITON, next_power_of_2, require_triton, tl, triton

DISPLACEMENTS = ("frame", "first")
NORMS = ("patch", "none", "patch_safe")
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class MotionGeometry:
    """Sizes of one motion-target call, validated."""

    batch: int
    frames: int
    grid: int  # G, raw points per side
    upsample: int  # u
    tokens_side: int  # h = w
    points_side: int  # s = G*u / h, upsampled points per token side
    pool_side: int  # G / h, raw points per token side (binning statistic)

    @property
    def values_per_token(self) -> int:
        return 2 * self.points_side * self.points_side


def check_motion_args(tracks: Tensor, tokens_side: int, upsample: int, displacement: str, norm: str, eps: float,
                      safe_eps: float, out_dtype: torch.dtype, what: str = "motion_targets") -> MotionGeometry:
    """Validate a `motion_targets` call and return its sizes; raises ValueError/TypeError naming the problem."""
    if not isinstance(tracks, Tensor):
        raise TypeError(f"{what}: tracks must be a tensor, got {type(tracks).__name__}")
    if tracks.ndim != 4 or tracks.shape[-1] != 2:
        raise ValueError(f"{what}: tracks must have shape (B, T, G*G, 2), got {tuple(tracks.shape)}")
    if not tracks.is_floating_point():
        raise TypeError(f"{what}: tracks must be floating point (absolute pixels), got {tracks.dtype}")
    batch, frames, points, _ = tracks.shape
    if frames < 2:
        raise ValueError(f"{what}: tracks need T >= 2 frames for a displacement, got T={frames}")
    grid = int(round(points ** 0.5))
    if grid * grid != points or grid < 1:
        raise ValueError(f"{what}: tracks must hold a square grid of G*G points, got N={points}")
    if not isinstance(upsample, int) or upsample < 1:
        raise ValueError(f"{what}: upsample must be an int >= 1, got {upsample!r}")
    if not isinstance(tokens_side, int) or tokens_side < 1:
        raise ValueError(f"{what}: tokens_side must be an int >= 1, got {tokens_side!r}")
    if (grid * upsample) % tokens_side:
        raise ValueError(f"{what}: the upsampled grid side G*u = {grid}*{upsample} is not a multiple of "
                         f"tokens_side = {tokens_side}")
    if grid % tokens_side:
        raise ValueError(f"{what}: the raw grid side G = {grid} must be a multiple of tokens_side = "
                         f"{tokens_side} for the per-token motion statistic")
    if displacement not in DISPLACEMENTS:
        raise ValueError(f"{what}: displacement must be one of {DISPLACEMENTS}, got {displacement!r}")
    if norm not in NORMS:
        raise ValueError(f"{what}: norm must be one of {NORMS}, got {norm!r}")
    points_side = grid * upsample // tokens_side
    if norm != "none" and points_side < 2:
        raise ValueError(f"{what}: norm={norm!r} needs >= 2x2 points per token for an unbiased std, got "
                         f"{points_side}x{points_side} (G={grid}, upsample={upsample}, tokens_side={tokens_side})")
    if not eps >= 0:
        raise ValueError(f"{what}: eps must be >= 0, got {eps}")
    if not safe_eps > 0:
        raise ValueError(f"{what}: safe_eps must be > 0, got {safe_eps}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{what}: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    return MotionGeometry(batch, frames, grid, upsample, tokens_side, points_side, grid // tokens_side)


def upsample_tracks(tracks: Tensor, upsample: int) -> Tensor:
    """(B, T, G*G, 2) -> (B, T, G*u, G*u, 2): bilinear on absolute positions, align_corners=True (official).

    Written as the official call, a trilinear resize of (T, G, G) to (T, G*u, G*u): along T every weight is exactly
    0 or 1, so it is bilinear in space and bit-identical to the official upsampled tracks.
    """
    batch, frames, points, _ = tracks.shape
    grid = int(round(points ** 0.5))
    grid_xy = tracks.float().reshape(batch, frames, grid, grid, 2)
    if upsample == 1:
        return grid_xy
    volume = grid_xy.permute(0, 4, 1, 2, 3)  # (B, 2, T, G, G)
    side = grid * upsample
    volume = F.interpolate(volume, size=(frames, side, side), mode="trilinear", align_corners=True)
    return volume.permute(0, 2, 3, 4, 1)


def step_displacements(positions: Tensor, displacement: str) -> Tensor:
    """Displacement per time slot along dim 1 (T slots from T positions; the last step duplicated)."""
    base = positions[:, :1] if displacement == "first" else positions[:, :-1]
    steps = positions[:, 1:] - base
    return torch.cat([steps, steps[:, -1:]], dim=1)


def motion_token_stat_torch(tracks: Tensor, tokens_side: int) -> Tensor:
    """(B, h*h) float32: per raw point the mean step length over the T-1 real steps, pooled per token.

    The trainer gets it from the fused kernel together with the targets; alone (motion-aware masking without the
    motion target) it is these few torch ops on any device, bit-identical to the official statistic."""
    batch, frames, points, _ = tracks.shape
    grid = int(round(points ** 0.5))
    pool = grid // tokens_side
    step_length = torch.linalg.vector_norm(tracks[:, 1:].float() - tracks[:, :-1].float(), dim=-1)
    per_point = step_length.mean(dim=1).reshape(batch, tokens_side, pool, tokens_side, pool)
    return per_point.mean(dim=(2, 4)).reshape(batch, tokens_side * tokens_side)


def motion_targets_torch(tracks: Tensor, *, tokens_side: int, upsample: int = 2, displacement: str = "frame",
                         norm: str = "patch", eps: float = 1e-6, safe_eps: float = 1e-2,
                         out_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Reference twin: (targets (B, T*h*h, 2*s*s) in out_dtype, token_stat (B, h*h) float32). See module doc."""
    geo = check_motion_args(tracks, tokens_side, upsample, displacement, norm, eps, safe_eps, out_dtype)
    h, s = geo.tokens_side, geo.points_side
    disp = step_displacements(upsample_tracks(tracks, upsample), displacement)  # (B, T, G*u, G*u, 2)
    tokens = (disp.reshape(geo.batch, geo.frames, h, s, h, s, 2).permute(0, 1, 2, 4, 3, 5, 6)
              .reshape(geo.batch, geo.frames * h * h, s * s, 2))
    if norm != "none":
        centred = tokens - tokens.mean(dim=2, keepdim=True)
        var = tokens.var(dim=2, unbiased=True, keepdim=True)
        if norm == "patch":
            tokens = centred / (var.sqrt() + eps)
        else:
            tokens = centred / (var + safe_eps * safe_eps).sqrt()
    targets = tokens.reshape(geo.batch, geo.frames * h * h, geo.values_per_token).to(out_dtype)
    return targets, motion_token_stat_torch(tracks, tokens_side)


def check_visibility_args(tracks: Tensor, visibility: Tensor, threshold: float, what: str) -> None:
    """Validate the visibility of a `drop_invisible` call against its tracks; raises ValueError/TypeError."""
    if not isinstance(visibility, Tensor):
        raise TypeError(f"{what}: visibility must be a tensor, got {type(visibility).__name__}")
    if tuple(visibility.shape) != tuple(tracks.shape[:3]):
        raise ValueError(f"{what}: visibility must have shape (B, T, G*G) = {tuple(tracks.shape[:3])} like the "
                         f"tracks, got {tuple(visibility.shape)}")
    if visibility.device != tracks.device:
        raise ValueError(f"{what}: visibility is on {visibility.device} but tracks are on {tracks.device}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{what}: visibility_threshold must lie in [0, 1], got {threshold}")


def visible_points(visibility: Tensor, threshold: float) -> Tensor:
    """(B, T, N) bool: visibility >= threshold (a NaN visibility compares False: invisible)."""
    return visibility.float() >= threshold


def upsample_visible(visible: Tensor, upsample: int) -> Tensor:
    """(B, T, G*G) bool -> (B, T, G*u, G*u) bool by the min rule over the bilinear stencil (module doc).

    The invisibility indicator goes through the same trilinear call as the tracks (`upsample_tracks`): its weights
    are >= 0 and a nonzero one is a product of per-axis weights >= 2**-24 (far from float32 underflow), so the
    result is > 0 exactly where some raw point with a nonzero weight is invisible, in the float32 weights the
    positions themselves use (kernel and twin alike). Averaging the visibility instead would pass a point that
    takes half its position from an occluded one (0.5 x a 2,606-px jump)."""
    batch, frames, points = visible.shape
    grid = int(round(points ** 0.5))
    if upsample == 1:
        return visible.reshape(batch, frames, grid, grid)
    hidden = (~visible).float().reshape(batch, 1, frames, grid, grid)
    side = grid * upsample
    hidden = F.interpolate(hidden, size=(frames, side, side), mode="trilinear", align_corners=True)
    return hidden[:, 0] <= 0


def step_validity(visible: Tensor, displacement: str) -> Tensor:
    """Validity per time slot along dim 1, paired like `step_displacements`: visible at both ends of the step."""
    base = visible[:, :1] if displacement == "first" else visible[:, :-1]
    steps = visible[:, 1:] & base
    return torch.cat([steps, steps[:, -1:]], dim=1)


def motion_point_validity_torch(visibility: Tensor, *, tokens_side: int, upsample: int, displacement: str,
                                threshold: float) -> Tensor:
    """(B, T*h*h, s*s) bool: whether each upsampled point of each token is valid for its slot (module doc)."""
    batch, frames, points = visibility.shape
    side = int(round(points ** 0.5)) * upsample
    h, s = tokens_side, side // tokens_side
    valid = step_validity(upsample_visible(visible_points(visibility, threshold), upsample), displacement)
    return (valid.reshape(batch, frames, h, s, h, s).permute(0, 1, 2, 4, 3, 5)
            .reshape(batch, frames * h * h, s * s))


def masked_token_norm_torch(raw: Tensor, valid: Tensor, norm: str, eps: float,
                            safe_eps: float) -> tuple[Tensor, Tensor]:
    """Per-token normalisation over the valid points only.

    raw (B, N, P, 2) float32 displacements, valid (B, N, P) bool -> (values (B, N, P, 2) float32 with 0 at invalid
    points, valid (B, N, P) with tokens of fewer than 2 valid points dropped). Invalid entries never enter the sums
    (`where`, not a product: a NaN or a 1000-px jump there changes nothing)."""
    keep = valid.unsqueeze(-1)
    count = valid.sum(dim=2, keepdim=True).unsqueeze(-1).float()  # (B, N, 1, 1)
    mean = torch.where(keep, raw, 0.0).sum(dim=2, keepdim=True) / count.clamp(min=1.0)
    centred = torch.where(keep, raw - mean, 0.0)
    var = centred.square().sum(dim=2, keepdim=True) / (count - 1.0).clamp(min=1.0)
    scale = var.sqrt() + eps if norm == "patch" else (var + safe_eps * safe_eps).sqrt()
    valid = valid & (count[..., 0] >= 2.0)  # no unbiased std from fewer than 2 points: drop the token
    values = torch.where(valid.unsqueeze(-1), centred / scale, 0.0)
    return values, valid


def visible_token_stat_torch(tracks: Tensor, visibility: Tensor, tokens_side: int, threshold: float,
                             official: Tensor | None = None) -> Tensor:
    """(B, h*h) float32: the mean step length over each token's valid (raw point, step) pairs, 0 where none.

    `official` (the statistic without visibility, when the caller has it already) is taken as is where every pair
    is valid, so an all-visible clip ranks exactly as without the option."""
    batch, frames, points, _ = tracks.shape
    grid = int(round(points ** 0.5))
    pool = grid // tokens_side
    visible = visible_points(visibility, threshold)
    step_ok = visible[:, 1:] & visible[:, :-1]  # (B, T-1, G*G)
    step_length = torch.linalg.vector_norm(tracks[:, 1:].float() - tracks[:, :-1].float(), dim=-1)
    length_sum = torch.where(step_ok, step_length, 0.0).sum(dim=1)  # (B, G*G)
    pairs = step_ok.sum(dim=1)
    length_sum = length_sum.reshape(batch, tokens_side, pool, tokens_side, pool).sum(dim=(2, 4))
    pairs = pairs.reshape(batch, tokens_side, pool, tokens_side, pool).sum(dim=(2, 4))
    masked = (length_sum / pairs.clamp(min=1).float()).reshape(batch, tokens_side * tokens_side)
    pairs = pairs.reshape(batch, tokens_side * tokens_side)
    if official is None:
        official = motion_token_stat_torch(tracks, tokens_side)
    return torch.where(pairs == (frames - 1) * pool * pool, official, masked)


_NORM_CODES = {"none": 0, "patch": 1, "patch_safe": 2}

if HAS_TRITON:

    @triton.jit
    def _sample_frame(frame_ptr, y0, x0, y1, x1, wy, wx, c, GRID: tl.constexpr, UPSAMPLE: tl.constexpr, mask):
        """Coordinate c of the (possibly upsampled) grid points of one frame."""
        if UPSAMPLE > 1:
            # the operation order of torch's upsample_bilinear2d (align_corners=True)
            v00 = tl.load(frame_ptr + (y0 * GRID + x0) * 2 + c, mask=mask, other=0.0)
            v01 = tl.load(frame_ptr + (y0 * GRID + x1) * 2 + c, mask=mask, other=0.0)
            v10 = tl.load(frame_ptr + (y1 * GRID + x0) * 2 + c, mask=mask, other=0.0)
            v11 = tl.load(frame_ptr + (y1 * GRID + x1) * 2 + c, mask=mask, other=0.0)
            return (1.0 - wy) * ((1.0 - wx) * v00 + wx * v01) + wy * ((1.0 - wx) * v10 + wx * v11)
        else:
            return tl.load(frame_ptr + (y0 * GRID + x0) * 2 + c, mask=mask, other=0.0)

    @triton.jit
    def _motion_targets_kernel(
        tracks_ptr, targets_ptr, stat_ptr, src_scale, eps, safe_eps_sq,
        FRAMES: tl.constexpr, GRID: tl.constexpr, UPSAMPLE: tl.constexpr, TOKENS_SIDE: tl.constexpr,
        POINTS_SIDE: tl.constexpr,
        POOL_SIDE: tl.constexpr, FROM_FIRST: tl.constexpr, NORM: tl.constexpr,
        BLOCK_TOK: tl.constexpr, BLOCK_VAL: tl.constexpr, BLOCK_POOL: tl.constexpr,
    ):
        """One program per (clip, tile of spatial tokens, time slot); the t = 0 program also writes token_stat."""
        clip = tl.program_id(0)
        t = tl.program_id(2)
        num_tokens: tl.constexpr = TOKENS_SIDE * TOKENS_SIDE
        num_values: tl.constexpr = 2 * POINTS_SIDE * POINTS_SIDE
        frame_stride: tl.constexpr = GRID * GRID * 2
        clip_tracks = tracks_ptr + clip.to(tl.int64) * FRAMES * frame_stride

        token = tl.program_id(1) * BLOCK_TOK + tl.arange(0, BLOCK_TOK)
        token_ok = token < num_tokens
        ti = token // TOKENS_SIDE
        tj = token % TOKENS_SIDE

        value = tl.arange(0, BLOCK_VAL)
        point = value // 2
        coord = value % 2
        row = ti[:, None] * POINTS_SIDE + (point // POINTS_SIDE)[None, :]  # upsampled grid row of each value
        col = tj[:, None] * POINTS_SIDE + (point % POINTS_SIDE)[None, :]
        ok = token_ok[:, None] & (value < num_values)[None, :]
        c = coord[None, :]
        if UPSAMPLE > 1:
            src_y = row.to(tl.float32) * src_scale
            src_x = col.to(tl.float32) * src_scale
            y0 = tl.minimum(src_y.to(tl.int32), GRID - 1)
            x0 = tl.minimum(src_x.to(tl.int32), GRID - 1)
            y1 = tl.minimum(y0 + 1, GRID - 1)
            x1 = tl.minimum(x0 + 1, GRID - 1)
            wy = src_y - y0.to(tl.float32)
            wx = src_x - x0.to(tl.float32)
        else:
            y0 = row
            x0 = col
            y1 = row
            x1 = col
            wy = 0.0
            wx = 0.0

        step = tl.minimum(t, FRAMES - 2)
        later = _sample_frame(clip_tracks + (step + 1) * frame_stride, y0, x0, y1, x1, wy, wx, c, GRID, UPSAMPLE,
                              ok)
        if FROM_FIRST:
            earlier = _sample_frame(clip_tracks, y0, x0, y1, x1, wy, wx, c, GRID, UPSAMPLE, ok)
        else:
            earlier = _sample_frame(clip_tracks + step * frame_stride, y0, x0, y1, x1, wy, wx, c, GRID, UPSAMPLE,
                                    ok)
        disp = later - earlier

        if NORM == 0:
            out = disp
        else:
            n_points: tl.constexpr = POINTS_SIDE * POINTS_SIDE
            is_x = ok & (c == 0)
            is_y = ok & (c == 1)
            # IEEE divisions (div_rn): Triton's plain '/' is the 2-ulp approximate division on NVIDIA GPUs
            mean_x = tl.div_rn(tl.sum(tl.where(is_x, disp, 0.0), axis=1), n_points * 1.0)
            mean_y = tl.div_rn(tl.sum(tl.where(is_y, disp, 0.0), axis=1), n_points * 1.0)
            centred = disp - tl.where(c == 0, mean_x[:, None], mean_y[:, None])
            sq = centred * centred
            var_x = tl.div_rn(tl.sum(tl.where(is_x, sq, 0.0), axis=1), n_points - 1.0)
            var_y = tl.div_rn(tl.sum(tl.where(is_y, sq, 0.0), axis=1), n_points - 1.0)
            var = tl.where(c == 0, var_x[:, None], var_y[:, None])
            if NORM == 1:
                out = tl.div_rn(centred, tl.sqrt_rn(var) + eps)
            else:
                out = tl.div_rn(centred, tl.sqrt_rn(var + safe_eps_sq))

        out_row = (clip.to(tl.int64) * FRAMES + t) * num_tokens + token
        tl.store(targets_ptr + out_row[:, None] * num_values + value[None, :],
                 out.to(targets_ptr.dtype.element_ty), mask=ok)

        if t == 0:
            pool = tl.arange(0, BLOCK_POOL)
            pool_ok = token_ok[:, None] & (pool < POOL_SIDE * POOL_SIDE)[None, :]
            raw_point = ((ti[:, None] * POOL_SIDE + (pool // POOL_SIDE)[None, :]) * GRID
                         + tj[:, None] * POOL_SIDE + (pool % POOL_SIDE)[None, :])
            prev_x = tl.load(clip_tracks + raw_point * 2, mask=pool_ok, other=0.0)
            prev_y = tl.load(clip_tracks + raw_point * 2 + 1, mask=pool_ok, other=0.0)
            length_sum = tl.zeros((BLOCK_TOK, BLOCK_POOL), tl.float32)
            # unrolled (FRAMES is a constexpr) so that the T loads are in flight together, not one latency each
            for k in tl.static_range(1, FRAMES):
                cur_x = tl.load(clip_tracks + k * frame_stride + raw_point * 2, mask=pool_ok, other=0.0)
                cur_y = tl.load(clip_tracks + k * frame_stride + raw_point * 2 + 1, mask=pool_ok, other=0.0)
                dx = cur_x - prev_x
                dy = cur_y - prev_y
                length_sum += tl.sqrt_rn(dx * dx + dy * dy)
                prev_x = cur_x
                prev_y = cur_y
            per_point = tl.div_rn(length_sum, (FRAMES - 1) * 1.0)
            stat = tl.div_rn(tl.sum(tl.where(pool_ok, per_point, 0.0), axis=1), POOL_SIDE * POOL_SIDE * 1.0)
            tl.store(stat_ptr + clip.to(tl.int64) * num_tokens + token, stat, mask=token_ok)


def motion_targets_triton(tracks: Tensor, *, tokens_side: int, upsample: int = 2, displacement: str = "frame",
                          norm: str = "patch", eps: float = 1e-6, safe_eps: float = 1e-2,
                          out_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Triton twin of `motion_targets_torch`: one launch, each track value read once per tile, fp32 math."""
    geo = check_motion_args(tracks, tokens_side, upsample, displacement, norm, eps, safe_eps, out_dtype)
    require_triton(tracks.device, "motion_targets")
    tracks = tracks.float().contiguous()
    num_tokens = geo.tokens_side ** 2
    targets = torch.empty(geo.batch, geo.frames * num_tokens, geo.values_per_token, dtype=out_dtype,
                          device=tracks.device)
    token_stat = torch.empty(geo.batch, num_tokens, dtype=torch.float32, device=tracks.device)
    if geo.batch == 0:
        return targets, token_stat
    side = geo.grid * geo.upsample
    # torch computes the align_corners scale as a float32 division; do the same so source positions agree
    src_scale = float(np.float32(geo.grid - 1) / np.float32(side - 1)) if geo.upsample > 1 else 0.0
    block_val = next_power_of_2(geo.values_per_token)
    block_tok = max(1, min(next_power_of_2(num_tokens), 512 // block_val))
    grid = (geo.batch, triton.cdiv(num_tokens, block_tok), geo.frames)
    _motion_targets_kernel[grid](
        tracks, targets, token_stat, src_scale, float(eps), float(safe_eps) ** 2,
        FRAMES=geo.frames, GRID=geo.grid, UPSAMPLE=geo.upsample, TOKENS_SIDE=geo.tokens_side,
        POINTS_SIDE=geo.points_side, POOL_SIDE=geo.pool_side, FROM_FIRST=displacement == "first",
        NORM=_NORM_CODES[norm],
        BLOCK_TOK=block_tok, BLOCK_VAL=block_val, BLOCK_POOL=next_power_of_2(geo.pool_side ** 2),
    )
    return targets, token_stat
