"""MME (Masked Motion Encoding, CVPR 2023): the exact arithmetic of its trajectory and HOG targets and its loss.

Definitions: ../shared/reference/seed_methods/SPEC.md §2 (the official code XinyuSun/MME @ 17689a9, read line by
line); the vectors `mme_vectors.npz` were made by running that code. Every stage below is one public function, so
each can be checked against the stage the vectors give and bound by `targets/` on its own.

Pipeline (one clip = the 16 sampled frames f_i = s + 4 i of a video with n raw frames of H x W pixels):

1. `farneback_flow` (offline, CPU/OpenCV/numpy): dense flow between consecutive raw greyscale frames with the
   OpenCV CUDA Farneback defaults the official flow tool uses; `encode_flow_u8` / `decode_flow_u8` are its byte
   storage (bound 20). The official tool runs the CUDA implementation and stores lossy MPEG-4: a CPU run differs.
   `mme_extract_video` chains steps 1 and 2 for one video (the per-video cache MME reads).
2. `mme_track_flow`: integer grid tracking (SPEC T2): for every start frame s0 one grid point per 8x8 cell at
   (8j+4, 8i+4), L steps along the flow truncated toward zero -> `disp` (B, 2L, S, H//8, W//8) int8 (index c*L + k,
   c = 0 for x) and `valid` (B, S, H//8, W//8) uint8, S = n_flow - L start frames (the official dump).
3. `mme_loader_slice` (T3): the clip's slots -> (B, 2, T'L + T', H//8, W//8) int16 (rows t*L + k, then T'
   validity rows; both coordinate planes carry the validity).
4. `mme_crop_resize` (T4): the image crop (offsets // 8) and a bilinear resize to S_in/8 per side.
5. `mme_trajectory_tokens` / `mme_trajectory_target` (T5, T6): 32 values per token (L = 4) in the order
   (c, k, q) -> (c*L + k)*4 + q, q = 2a + b the point (2hp + a, 2wp + b); PatchStd over the 4 points per coordinate
   and step; a token is valid when any of its points has trunc(resampled validity) >= 1.
6. `mme_hog` / `mme_hog_target` (H1-H4): 9 unsigned bins per 8x8 cell per colour channel of the ImageNet-normalised
   second frame of each tubelet; 3*9*(p/8)^2 = 108 values per token at p = 16, order ((colour*9 + bin)*2 + a)*2 + b.
7. `mme_token_losses` / `mme_loss` (SPEC §2.4): per-token squared errors summed over channels (the trajectory term
   times validity and 32/(8L)), then L = (sum traj / |M| + sum hog / |M|) / 2 over all masked tokens |M|.

Token order everywhere: n = (t*h + hp)*w + wp, t the tubelet slot, (hp, wp) the patch row and column (VideoMAE's
Conv3d order, the project's `kernels` order). Everything after step 1 is torch, batch-first, device-agnostic and
free of host syncs; `mme_crop_resize` reads its crop boxes from host integers (the data loader's), never a device.

Official bugs (SPEC §2.7, both marked F) and how each is handled:
- B1, the flow is never decoded (feat.py:288-291 feeds the stored bytes 0..255 to the tracker; every step becomes
  +20 and every point invalid): FIXED by tracking decoded pixels. `mme_track_flow(encode_flow_u8(flow).float())`
  reproduces the as-released path (the vectors' `*_rawu8`).
- B2, the Sobel convolution keeps a random default bias (feat.py:575, redrawn every step): FIXED, the bias is 0;
  `mme_hog(..., sobel_bias=(bx, by))` reproduces a given draw (the vectors' `*_bias_seed0`).
Reproduced on purpose (R): P3 (a pixel whose orientation coordinate is an exact integer votes nothing, e.g. every
exactly horizontal gradient), P4 (targets above the heads' Sigmoid/Tanh ranges), P5 (eps = 1e-6 added to the
std, so a rigid 4-point group gives 0), P6 (HOG of the normalised second frame of each tubelet).

Point trackers instead of flow (SPEC §2.6):
- `mme_dump_from_tracks` is the exact recipe: tracks re-queried on the 8-px grid of the ORIGINAL frame at every
  start frame, followed over L raw frames, turned into the official dump layout (then steps 3-5 unchanged). It uses
  sub-pixel steps (optionally truncated) and ignores visibility unless asked, as SPEC §2.6.4 says.
- `mme_trajectory_from_tracks` gives the same 32-value target ("MME-track") from the project's tracks: the
  pipeline's (B, T', G², 2) (one grid queried at frame 0, a position per tubelet's first frame) or per-slot
  windows (B, T', K+1, G², 2) re-queried at each slot's first frame (K = 1: two frames, L equal steps; K = L).
- Measured on the vectors' closed-form flow with an IDEAL sub-pixel tracker (bench/mme_trajectories.py ->
  bench/results/mme_trajectories.json; mean |dz| to the official target over valid, non-degenerate entries;
  |z| <= 1.5, official mean |z| 0.77; two unrelated tokens differ by 0.94):
  exact recipe 0.27 (0.17 with truncated steps; max 2.4), per-slot re-queried crop grid over MME's interval with
  raw steps 0.41, with the two sampled frames only 0.45, the pipeline's single-query layout 0.94 = chance level
  (its grid drifts 44 px over the clip on this 2.2 px/frame flow). So use per-slot queries; no tracker reproduces
  the official target (SPEC §2.6.7: integer steps along Farneback flow are not the ground truth).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..constants import IMAGENET_MEAN, IMAGENET_STD

CELL = 8  # pixels per trajectory grid cell and per HOG cell
FLOW_BOUND = 20.0  # the flow tool's byte range [-20, 20] px and the stored displacement clamp
TRAJ_SCALE = 20.0  # engine.py divides the displacements by 20 before PatchStd
NBINS = 9
#: cv::cuda::FarnebackOpticalFlow::create() defaults (numLevels 5, pyrScale 0.5, fastPyramids false, winSize 13,
#: numIters 10, polyN 5, polySigma 1.1, flags 0) in cv2.calcOpticalFlowFarneback's argument names
FARNEBACK_CUDA_DEFAULTS = dict(pyr_scale=0.5, levels=5, winsize=13, iterations=10, poly_n=5, poly_sigma=1.1, flags=0)


# ----------------------------------------------------------------------------------------------------------------------
# 1. Flow (offline, CPU)


def farneback_flow(frames: np.ndarray, **params) -> np.ndarray:
    """Dense Farneback flow between consecutive frames, as the official tool computes it (on CPU here).

    frames: (n, H, W, 3) uint8 RGB or (n, H, W) uint8 grey, the raw video at its original resolution.
    Returns (n-1, H, W, 2) float32 pixels; [..., 0] = x displacement, [..., 1] = y, flow k maps frame k to k+1.
    The tool converts BGR to grey with OpenCV and runs cv::cuda::FarnebackOpticalFlow with its defaults
    (FARNEBACK_CUDA_DEFAULTS; `params` override them). The CPU implementation is not bit-identical to the CUDA one.
    """
    import cv2

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[-1] != 3):
        raise ValueError(f"farneback_flow: frames must be uint8 (n, H, W, 3) RGB or (n, H, W) grey, got "
                         f"{frames.dtype} {frames.shape}")
    if frames.shape[0] < 2:
        raise ValueError(f"farneback_flow: need >= 2 frames, got {frames.shape[0]}")
    grey = frames if frames.ndim == 3 else np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])
    kwargs = {**FARNEBACK_CUDA_DEFAULTS, **params}
    flows = [cv2.calcOpticalFlowFarneback(grey[i], grey[i + 1], None, **kwargs) for i in range(len(grey) - 1)]
    return np.stack(flows).astype(np.float32)


def encode_flow_u8(flow: np.ndarray | Tensor, bound: float = FLOW_BOUND):
    """The flow tool's byte storage: clip(round_half_even(255 (v + bound) / (2 bound)), 0, 255) as uint8.

    Works on numpy (computed in float64, like cvRound on the tool's float) or torch (same formula, float64)."""
    if isinstance(flow, Tensor):
        return (255.0 * (flow.double() + bound) / (2 * bound)).round().clamp(0, 255).to(torch.uint8)
    return np.clip(np.rint(255.0 * (np.asarray(flow, np.float64) + bound) / (2 * bound)), 0, 255).astype(np.uint8)


def decode_flow_u8(flow_u8: np.ndarray | Tensor, bound: float = FLOW_BOUND):
    """Stored bytes -> pixels, v = u8 * 2 bound / 255 - bound (float32). The decode the release comments out (B1)."""
    if isinstance(flow_u8, Tensor):
        return flow_u8.float() * (2 * bound / 255.0) - bound
    return (np.asarray(flow_u8).astype(np.float32) * np.float32(2 * bound / 255.0) - np.float32(bound))


# ----------------------------------------------------------------------------------------------------------------------
# 2. Integer grid tracking (extraction)


def _check_int(what: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def mme_track_flow(flow: Tensor, traj_len: int = 4, bound: float = FLOW_BOUND) -> tuple[Tensor, Tensor]:
    """The official extraction (SPEC T2, extract.py:70-101 + SparseTracker), vectorised over start frames.

    flow: (B, n_flow, H, W, 2) pixels, [..., 0] = dx, [..., 1] = dy, flow k maps raw frame k to k+1 (float decoded
    flow; pass `encode_flow_u8(flow).float()` to reproduce the as-released bug B1). Each flow sample is truncated
    toward zero (the official `flow.int()`), read at the integer point; S = n_flow - traj_len start frames.
    Returns disp (B, 2L, S, H//8, W//8) int8, index c*L + k (c = 0: x, 1: y), each step clamped to +-bound, and
    valid (B, S, H//8, W//8) uint8: 0 once a point lay outside [0, W-1] x [0, H-1] before steps 1..L-1 (the check
    runs before the clamp; the final position is never checked); out-of-frame points go on from the clamped point.
    """
    what = "mme_track_flow"
    L = _check_int(what, "traj_len", traj_len, 1)
    if not isinstance(flow, Tensor) or flow.ndim != 5 or flow.shape[-1] != 2:
        raise ValueError(f"{what}: flow must be a (B, n_flow, H, W, 2) tensor, got "
                         f"{tuple(flow.shape) if isinstance(flow, Tensor) else type(flow).__name__}")
    batch, n_flow, height, width, _ = flow.shape
    starts = n_flow - L
    if starts < 1:
        raise ValueError(f"{what}: need n_flow > traj_len, got n_flow={n_flow}, traj_len={L}")
    gh, gw = height // CELL, width // CELL
    if gh < 1 or gw < 1:
        raise ValueError(f"{what}: frames of {height}x{width} hold no {CELL}x{CELL} cell")
    device = flow.device
    flat = flow.reshape(batch, n_flow * height * width, 2)
    ys = torch.arange(gh, device=device) * CELL + CELL // 2
    xs = torch.arange(gw, device=device) * CELL + CELL // 2
    x = xs.view(1, 1, 1, gw).expand(batch, starts, gh, gw).clone()
    y = ys.view(1, 1, gh, 1).expand(batch, starts, gh, gw).clone()
    s0 = torch.arange(starts, device=device).view(1, starts, 1, 1)
    valid = torch.ones(batch, starts, gh, gw, dtype=torch.bool, device=device)
    steps = []
    for k in range(L):
        outside = (x < 0) | (x >= width) | (y < 0) | (y >= height)
        valid &= ~outside
        x = x.clamp(0, width - 1)
        y = y.clamp(0, height - 1)
        index = ((s0 + k) * height + y) * width + x  # (B, S, gh, gw)
        sample = flat.gather(1, index.reshape(batch, -1, 1).expand(-1, -1, 2))
        step = sample.to(torch.int32).to(torch.int64).view(batch, starts, gh, gw, 2)  # trunc toward zero
        x = x + step[..., 0]
        y = y + step[..., 1]
        steps.append(step)
    disp = torch.stack(steps, dim=1)  # (B, L, S, gh, gw, 2)
    disp = disp.permute(0, 5, 1, 2, 3, 4).reshape(batch, 2 * L, starts, gh, gw)
    bound_i = int(bound)
    return disp.clamp(-bound_i, bound_i).to(torch.int8), valid.to(torch.uint8)


def mme_extract_video(frames: np.ndarray, *, traj_len: int = 4, quantize: bool = True,
                      bound: float = FLOW_BOUND, **farneback_params) -> tuple[Tensor, Tensor]:
    """One video's trajectory dump, offline on CPU: what MME caches per video (its `*_{L}.gz`).

    frames (n, H, W, 3) uint8 RGB (or (n, H, W) grey) raw frames at the original resolution and frame rate ->
    `farneback_flow` -> (quantize: the tool's byte storage, `encode_flow_u8` then `decode_flow_u8`, without its lossy
    MPEG-4 step) -> `mme_track_flow` on the DECODED flow (bug B1 fixed). Returns disp (2L, S, H//8, W//8) int8 and
    valid (S, H//8, W//8) uint8 with S = n - 1 - L, the layouts `mme_loader_slice` takes (with a batch axis added).
    Note the quantisation step 40/255 px before the truncation: e.g. a steady 2.0 px/frame motion decodes to
    1.96 px and is stored as 1.
    """
    flow = farneback_flow(frames, **farneback_params)
    if quantize:
        # B1 fixed (SPEC §2.7): the stored bytes are decoded to pixels before tracking; the release feeds 0..255
        flow = decode_flow_u8(encode_flow_u8(flow, bound), bound)
    disp, valid = mme_track_flow(torch.from_numpy(np.ascontiguousarray(flow))[None], traj_len=traj_len, bound=bound)
    return disp[0], valid[0]


# ----------------------------------------------------------------------------------------------------------------------
# 3-4. Loader slicing, crop and resample


def mme_loader_slice(disp: Tensor, valid: Tensor, frame_inds: Tensor, *, tubelet: int = 2,
                     traj_len: int | None = None) -> Tensor:
    """The loader's per-clip selection (SPEC T3; feat.py:331-362, kinetics.py:591).

    disp (B, 2Lmax, S, gh, gw) and valid (B, S, gh, gw) from `mme_track_flow` (or `mme_dump_from_tracks`);
    frame_inds (B, T) int raw indices of the clip's sampled frames. Slot t starts at s0 = min(frame_inds[:, t *
    tubelet], S - 1) (clamped at 0 too). Returns (B, 2, T'L + T', gh, gw): rows t*L + k hold step k of coordinate
    c of slot t (L = traj_len <= Lmax, the first L steps), rows T'L + t the slot's validity in both planes.
    int16 for integer dumps (what the official numpy concatenation gives), float32 for float ones.
    """
    what = "mme_loader_slice"
    if disp.ndim != 5 or disp.shape[1] % 2:
        raise ValueError(f"{what}: disp must be (B, 2L, S, gh, gw), got {tuple(disp.shape)}")
    batch, channels, starts, gh, gw = disp.shape
    if tuple(valid.shape) != (batch, starts, gh, gw):
        raise ValueError(f"{what}: valid must be (B, S, gh, gw) = {(batch, starts, gh, gw)}, got {tuple(valid.shape)}")
    if frame_inds.ndim != 2 or frame_inds.shape[0] != batch or frame_inds.shape[1] % tubelet:
        raise ValueError(f"{what}: frame_inds must be (B, T) with T a multiple of tubelet={tubelet}, got "
                         f"{tuple(frame_inds.shape)}")
    l_max = channels // 2
    L = l_max if traj_len is None else _check_int(what, "traj_len", traj_len, 1)
    if L > l_max:
        raise ValueError(f"{what}: traj_len={L} exceeds the dump's {l_max} steps")
    slots = frame_inds.shape[1] // tubelet
    s0 = frame_inds[:, ::tubelet].to(device=disp.device, dtype=torch.int64).clamp(0, starts - 1)  # (B, T')
    idx = s0.view(batch, 1, slots, 1, 1).expand(batch, channels, slots, gh, gw)
    steps = disp.gather(2, idx).view(batch, 2, l_max, slots, gh, gw)[:, :, :L]
    steps = steps.transpose(2, 3).reshape(batch, 2, slots * L, gh, gw)
    slot_valid = valid.gather(1, s0.view(batch, slots, 1, 1).expand(batch, slots, gh, gw))
    slot_valid = slot_valid.unsqueeze(1).expand(batch, 2, slots, gh, gw)
    dtype = torch.float32 if disp.is_floating_point() else torch.int16
    return torch.cat([steps.to(dtype), slot_valid.to(dtype)], dim=2)


def mme_crop_resize(trajs: Tensor, crops: Sequence[Sequence[int]] | np.ndarray | Tensor, out_side: int) -> Tensor:
    """The crop and resample of the trajectory grid (SPEC T4; transforms/__init__.py:118-124).

    trajs (B, 2, R, gh, gw) from `mme_loader_slice`; crops: per clip (crop_w, crop_h, offset_w, offset_h) in
    original pixels, host integers (a list, numpy array or CPU tensor: the data loader's crop boxes). Each is
    floored to cells (// 8), cut out and resized to out_side x out_side (= input size / 8) with bilinear,
    align_corners=False. Returns (B, 2, R, out_side, out_side) float32; displacements stay in original pixels.
    """
    what = "mme_crop_resize"
    if trajs.ndim != 5 or trajs.shape[1] != 2:
        raise ValueError(f"{what}: trajs must be (B, 2, R, gh, gw), got {tuple(trajs.shape)}")
    if isinstance(crops, Tensor):
        if crops.device.type != "cpu":
            raise ValueError(f"{what}: crops must be host integers (a device tensor would need a sync)")
        crops = crops.tolist()
    crops = [tuple(int(v) for v in box) for box in np.asarray(crops).reshape(-1, 4).tolist()]
    if len(crops) != trajs.shape[0]:
        raise ValueError(f"{what}: {len(crops)} crop boxes for a batch of {trajs.shape[0]}")
    _check_int(what, "out_side", out_side, 1)
    out = []
    for b, box in enumerate(crops):
        cw, ch, ow, oh = (v // CELL for v in box)
        if cw < 1 or ch < 1 or ow < 0 or oh < 0 or oh + ch > trajs.shape[3] or ow + cw > trajs.shape[4]:
            raise ValueError(f"{what}: crop {box} of clip {b} does not fit the {trajs.shape[3]}x{trajs.shape[4]} "
                             f"grid (in cells: w {cw}, h {ch}, offsets {ow}, {oh})")
        region = trajs[b, :, :, oh:oh + ch, ow:ow + cw].float()
        out.append(F.interpolate(region, size=out_side, mode="bilinear", align_corners=False))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Trajectory target


def mme_trajectory_tokens(trajs: Tensor, *, traj_len: int = 4) -> tuple[Tensor, Tensor]:
    """Tokenise the resampled trajectory grid (SPEC T5, T6 before normalisation).

    trajs (B, 2, T'(L+1), h2, w2) float (the engine's `trajs`: T'L step rows, then T' validity rows), h2 = 2h and
    w2 = 2w for an h x w token grid. Returns disp (B, N, 2, L, 4) in original pixels, value [b, n, c, k, q] from
    point q = 2a + b of token n = (t*h + hp)*w + wp at grid cell (2hp + a, 2wp + b), and point_type (B, N, 4) int64
    = trunc(resampled validity) (1 only where every contributing source point was valid).
    """
    what = "mme_trajectory_tokens"
    L = _check_int(what, "traj_len", traj_len, 1)
    if trajs.ndim != 5 or trajs.shape[1] != 2 or trajs.shape[2] % (L + 1) or trajs.shape[3] % 2 or trajs.shape[4] % 2:
        raise ValueError(f"{what}: trajs must be (B, 2, T'*(L+1), 2h, 2w) with L={L}, got {tuple(trajs.shape)}")
    batch, _, rows, gh, gw = trajs.shape
    slots, h, w = rows // (L + 1), gh // 2, gw // 2
    trajs = trajs.float()
    steps = trajs[:, :, : slots * L].reshape(batch, 2, slots, L, h, 2, w, 2)
    disp = steps.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(batch, slots * h * w, 2, L, 4)
    kind = trajs[:, 0, slots * L:].reshape(batch, slots, h, 2, w, 2).permute(0, 1, 2, 4, 3, 5)
    return disp, kind.reshape(batch, slots * h * w, 4).long()


def patch_std(values: Tensor, eps: float = 1e-6) -> Tensor:
    """MME's PatchStd over the last axis: (v - mean) / (std_unbiased + eps), eps outside the sqrt (P5)."""
    return (values - values.mean(dim=-1, keepdim=True)) / (values.var(dim=-1, unbiased=True, keepdim=True).sqrt()
                                                             + eps)


def mme_trajectory_target(trajs: Tensor, *, traj_len: int = 4, eps: float = 1e-6,
                          norm: str = "patch_std") -> tuple[Tensor, Tensor]:
    """The trajectory target for all tokens (SPEC T5, T6; engine.py:106-140).

    trajs as in `mme_trajectory_tokens`. Returns target (B, N, 8L) float32, value (c*L + k)*4 + q (32 at L = 4):
    v = disp / 20 standardised over the token's 4 points per coordinate c and step k (`norm="patch_std"`, the
    script's PatchStd) or v itself (`norm="none"`); and valid (B, N) bool, True when any of the token's 4 points
    has trunc(resampled validity) >= 1. Invalid tokens are to be left out of the loss (`mme_token_losses`).
    Gather the masked tokens afterwards (the target is computed on all tokens, like the official code).
    """
    if norm not in ("patch_std", "none"):
        raise ValueError(f"mme_trajectory_target: norm must be 'patch_std' or 'none', got {norm!r}")
    disp, kind = mme_trajectory_tokens(trajs, traj_len=traj_len)
    batch, tokens = disp.shape[:2]
    v = (disp / TRAJ_SCALE).reshape(batch, tokens, 2 * traj_len, 4)
    if norm == "patch_std":
        v = patch_std(v, eps)
    return v.reshape(batch, tokens, 8 * traj_len), (kind >= 1).any(dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# 6. HOG target


@functools.lru_cache(maxsize=64)
def _cached_constant(values: tuple, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32).to(device)


def device_constant(values, device: torch.device | str) -> Tensor:
    """A float32 constant on `device`, built once per (values, device) and cached: building it anew every step would
    copy host memory to the device (a host sync on CUDA). Do not modify the result in place."""
    return _cached_constant(tuple(values), torch.device(device))


def normalise_frames(frames_u8: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
                     std: tuple[float, ...] = IMAGENET_STD) -> Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float32 as the official data path makes it: u8 / 255, then
    (x - mean_c) / std_c (ToTensor then GroupNormalize)."""
    if frames_u8.dtype != torch.uint8 or frames_u8.ndim != 5 or frames_u8.shape[-1] != 3:
        raise ValueError(f"normalise_frames: expected uint8 (B, T, H, W, 3), got {frames_u8.dtype} "
                         f"{tuple(frames_u8.shape)}")
    x = frames_u8.permute(0, 4, 1, 2, 3).float().div(255.0)
    m = device_constant(tuple(float(v) for v in mean), x.device).view(1, 3, 1, 1, 1)
    s = device_constant(tuple(float(v) for v in std), x.device).view(1, 3, 1, 1, 1)
    return (x - m) / s


_SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))  # gx = left - right
_SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))  # gy = top - bottom (the x kernel turned clockwise)


def mme_hog(video: Tensor, *, layout: str = "BCTHW", tubelet: int = 2,
            sobel_bias: tuple[float, float] | None = None, chunk_pixels: int = 1 << 24) -> Tensor:
    """MME's HOG (SPEC H1-H3, the `base` variant; feat.py:566-609 and 646-657), in float32.

    video: "BCTHW" float (B, 3, T, H, W) ImageNet-normalised (the official input) or "BTHWC" uint8 (B, T, H, W, 3)
    raw frames (normalised here by `normalise_frames`). Frames tubelet//2, tubelet//2 + tubelet, ... (the second
    frame of each tubelet at tubelet 2), each colour channel its own image: replicate pad 1, Sobel cross-correlation,
    magnitude and phi = atan2(gy, gx) / pi * 9 (+9 where negative); bins floor(phi) % 9 and ceil(phi) % 9 get
    mag*(ceil - phi) and mag*(phi - floor) (so an exactly integer phi votes nothing: P3), then the mean over each
    8x8 cell. No block normalisation. sobel_bias: None = 0 (bug B2 FIXED: the official nn.Conv2d keeps a random
    default bias, redrawn every step); (bx, by) reproduces a given draw.
    Returns (B, 3*9, T', H//8, W//8) float32, channel colour*9 + bin. The images are processed in chunks of about
    chunk_pixels pixels (the same numbers; it bounds the temporaries, ~1 GB at the default).
    """
    what = "mme_hog"
    if layout == "BTHWC":
        video = normalise_frames(video)
    elif layout != "BCTHW":
        raise ValueError(f"{what}: layout must be 'BCTHW' or 'BTHWC', got {layout!r}")
    if video.ndim != 5 or video.shape[1] != 3 or not video.is_floating_point():
        raise ValueError(f"{what}: expected a float (B, 3, T, H, W) video, got {video.dtype} {tuple(video.shape)}")
    _check_int(what, "tubelet", tubelet, 1)
    batch, _, frames, height, width = video.shape
    if frames % tubelet or height < CELL or width < CELL:
        raise ValueError(f"{what}: T={frames} must be a multiple of tubelet={tubelet} and H, W >= {CELL}, got "
                         f"{tuple(video.shape)}")
    picked = video[:, :, tubelet // 2:: tubelet].float()  # (B, 3, T', H, W)
    slots = picked.shape[2]
    images = picked.permute(0, 2, 1, 3, 4).reshape(batch * slots * 3, 1, height, width)  # order (b, t, colour)
    weight = device_constant((_SOBEL_X, _SOBEL_Y), video.device).unsqueeze(1)
    # B2 fixed (SPEC §2.7): no bias by default; the release's nn.Conv2d keeps a random one, redrawn every step
    bias = None if sobel_bias is None else device_constant(tuple(float(b) for b in sobel_bias), video.device)
    # in chunks: the temporaries stay bounded at any batch size (B = 64 at 224 px is 1536 images)
    chunk = max(1, _check_int(what, "chunk_pixels", chunk_pixels, 1) // (height * width))
    hog = torch.cat([_hog_cells(images[i:i + chunk], weight, bias) for i in range(0, images.shape[0], chunk)])
    hog = hog.reshape(batch, slots, 3, NBINS, height // CELL, width // CELL)
    return hog.permute(0, 2, 3, 1, 4, 5).reshape(batch, 3 * NBINS, slots, height // CELL, width // CELL)


def _hog_cells(images: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(n, 1, H, W) float32 images -> (n, 9, H/8, W/8): SPEC H2-H3 in the official order of float32 operations."""
    grad = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), weight, bias)  # (n, 2, H, W)
    mag = torch.linalg.vector_norm(grad, dim=1)
    phi = torch.atan2(grad[:, 1], grad[:, 0]) / math.pi * NBINS
    phi = torch.where(phi < 0, phi + NBINS, phi)
    lo, hi = phi.floor(), phi.ceil()
    vote_lo, vote_hi = mag * (hi - phi), mag * (phi - lo)  # both 0 where phi is an integer (P3)
    lo_bin, hi_bin = lo.to(torch.int32) % NBINS, hi.to(torch.int32) % NBINS
    zero = torch.zeros((), dtype=torch.float32, device=images.device)
    cells = []
    for k in range(NBINS):  # one bin map at a time: deterministic, and (n, H, W) memory instead of (n, 9, H, W)
        votes = torch.where(lo_bin == k, vote_lo, zero) + torch.where(hi_bin == k, vote_hi, zero)
        cells.append(F.avg_pool2d(votes.unsqueeze(1), CELL))
    return torch.cat(cells, dim=1)


def mme_hog_target(video_hog: Tensor, *, patch: int = 16) -> Tensor:
    """(B, C, T', H/8, W/8) from `mme_hog` -> (B, N, C*(p/8)^2) per token (108 at C = 27, p = 16), value index
    (channel*(p/8) + a)*(p/8) + b for cell (a, b) of the patch; token n = (t*h + hp)*w + wp (SPEC H4).
    Unbounded (>= 0), neither scaled nor normalised."""
    if video_hog.ndim != 5 or patch % CELL:
        raise ValueError(f"mme_hog_target: need (B, C, T', H/8, W/8) and patch a multiple of {CELL}, got "
                         f"{tuple(video_hog.shape)}, patch={patch}")
    batch, channels, slots, gh, gw = video_hog.shape
    r = patch // CELL
    if gh % r or gw % r:
        raise ValueError(f"mme_hog_target: the {gh}x{gw} cell grid is not a multiple of {r} cells per patch side")
    x = video_hog.reshape(batch, channels, slots, gh // r, r, gw // r, r).permute(0, 2, 3, 5, 1, 4, 6)
    return x.reshape(batch, slots * (gh // r) * (gw // r), channels * r * r)


# ----------------------------------------------------------------------------------------------------------------------
# 7. Loss


class MMELoss(NamedTuple):
    loss: Tensor  # scalar, (traj + hog) / 2
    traj: Tensor  # scalar trajectory term
    hog: Tensor  # scalar HOG term
    per_token: Tensor  # (B, M): (traj_err + hog_err) / 2 per masked token; its mean is `loss`


def mme_token_losses(pred_traj: Tensor, target_traj: Tensor, traj_valid: Tensor, pred_hog: Tensor,
                     target_hog: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token errors at the masked tokens (SPEC §2.4; engine.py:146-155), before any mean.

    pred_traj, target_traj (B, M, 8L); traj_valid (B, M) bool/int; pred_hog, target_hog (B, M, C). Returns
    traj_err (B, M) = valid * sum_j (pred - target)^2 * 32 / (8L) and hog_err (B, M) = sum_j (pred - target)^2,
    both float32 (sums over channels, not means)."""
    if pred_traj.shape != target_traj.shape or pred_hog.shape != target_hog.shape:
        raise ValueError(f"mme_token_losses: prediction/target shapes differ: {tuple(pred_traj.shape)} vs "
                         f"{tuple(target_traj.shape)}, {tuple(pred_hog.shape)} vs {tuple(target_hog.shape)}")
    if pred_traj.ndim != 3 or pred_traj.shape[:2] != pred_hog.shape[:2] or tuple(traj_valid.shape) != \
            tuple(pred_traj.shape[:2]):
        raise ValueError(f"mme_token_losses: need (B, M, .) predictions and a (B, M) validity, got "
                         f"{tuple(pred_traj.shape)}, {tuple(pred_hog.shape)}, {tuple(traj_valid.shape)}")
    channels = pred_traj.shape[-1]
    traj = (pred_traj.float() - target_traj.float()).square().sum(-1) * traj_valid.float() * (32.0 / channels)
    hog = (pred_hog.float() - target_hog.float()).square().sum(-1)
    return traj, hog


def mme_loss(pred_traj: Tensor, target_traj: Tensor, traj_valid: Tensor, pred_hog: Tensor,
             target_hog: Tensor) -> MMELoss:
    """MME's loss over B x M masked tokens: traj = sum traj_err / |M|, hog = sum hog_err / |M| (|M| counts every
    masked token, valid or not), loss = (traj + hog) / 2. Shapes as `mme_token_losses`."""
    traj, hog = mme_token_losses(pred_traj, target_traj, traj_valid, pred_hog, target_hog)
    count = traj.numel()
    loss_traj, loss_hog = traj.sum() / count, hog.sum() / count
    return MMELoss((loss_traj + loss_hog) / 2, loss_traj, loss_hog, (traj + hog) / 2)


# ----------------------------------------------------------------------------------------------------------------------
# Point trackers instead of flow (SPEC §2.6)


def _inside(p: Tensor, height: int, width: int) -> Tensor:
    """MME's in-frame test of positions (..., 2): 0 <= x < W and 0 <= y < H (extract: `x >= w | x < 0` is out)."""
    return (p[..., 0] >= 0) & (p[..., 0] < width) & (p[..., 1] >= 0) & (p[..., 1] < height)


def mme_dump_from_tracks(tracks: Tensor, visibility: Tensor | None = None, *, frame_size: tuple[int, int],
                         truncate: bool = False, clamp_positions: bool = True, use_visibility: bool = False,
                         visibility_threshold: float = 0.5, bound: float = FLOW_BOUND) -> tuple[Tensor, Tensor]:
    """The exact tracker recipe of SPEC §2.6 -> the official dump layout, for `mme_loader_slice` onwards.

    tracks (B, S, L+1, gh*gw, 2): for every start frame s0, the positions (x, y) in original pixels at raw frames
    s0, s0+1, ..., s0+L of the grid queried at s0 at (8j+4, 8i+4), i < gh = H//8, j < gw = W//8, row-major (i
    outer); visibility (B, S, L+1, gh*gw) in [0, 1] (used only with use_visibility). frame_size = (H, W).
    Steps d_k = p_{k+1} - clamp(p_k) with p_k clamped into [0, W-1] x [0, H-1] (clamp_positions, MME's tracker goes
    on from the clamped point; off: p_{k+1} - p_k), truncated toward zero if `truncate` (MME's own steps are
    integer, SPEC T2), clamped to +-bound. Validity (MME's literal rule, extract: `x >= w | x < 0`): invalid once one
    of p_1 .. p_{L-1} has x < 0, x >= W, y < 0 or y >= H; use_visibility also requires visibility >= threshold at
    all L+1 frames (then it is "MME-track", not MME). Returns disp (B, 2L, S, gh, gw) float32 (index c*L + k) and
    valid (B, S, gh, gw) uint8. Only for a tracker that itself goes on from clamped positions (like the ideal one of
    the vectors' `*_ideal`) does clamp_positions reproduce its steps everywhere; for others it changes only points
    that left the frame.
    """
    what = "mme_dump_from_tracks"
    if tracks.ndim != 5 or tracks.shape[-1] != 2 or tracks.shape[2] < 2 or not tracks.is_floating_point():
        raise ValueError(f"{what}: tracks must be float (B, S, L+1, gh*gw, 2), got {tracks.dtype} "
                         f"{tuple(tracks.shape)}")
    height, width = (int(v) for v in frame_size)
    batch, starts, length, points, _ = tracks.shape
    gh, gw = height // CELL, width // CELL
    if points != gh * gw:
        raise ValueError(f"{what}: {points} points per start frame, but a {height}x{width} frame has a {gh}x{gw} grid")
    L = length - 1
    p = tracks.float()
    base = p[:, :, :-1]
    if clamp_positions:
        base = torch.stack([base[..., 0].clamp(0, width - 1), base[..., 1].clamp(0, height - 1)], dim=-1)
    steps = p[:, :, 1:] - base  # (B, S, L, P, 2)
    if truncate:
        steps = steps.trunc()
    steps = steps.clamp(-bound, bound)
    inside = _inside(p[:, :, 1:L], height, width).all(dim=2)  # (B, S, P)
    if use_visibility:
        if visibility is None or tuple(visibility.shape) != tuple(tracks.shape[:4]):
            raise ValueError(f"{what}: use_visibility needs visibility (B, S, L+1, P) = {tuple(tracks.shape[:4])}")
        inside &= (visibility >= visibility_threshold).all(dim=2)
    disp = steps.permute(0, 4, 2, 1, 3).reshape(batch, 2 * L, starts, gh, gw)
    return disp, inside.view(batch, starts, gh, gw).to(torch.uint8)


def mme_trajectory_from_tracks(tracks: Tensor, visibility: Tensor | None = None, *, tokens_side: int,
                               frame_size: tuple[int, int], traj_len: int = 4, upsample: int = 1,
                               use_visibility: bool = False, visibility_threshold: float = 0.5,
                               eps: float = 1e-6, bound: float = FLOW_BOUND) -> tuple[Tensor, Tensor]:
    """MME's 32-value trajectory target from the project's point tracks ("MME-track", SPEC §2.6 substitute).

    tracks, absolute (x, y) pixels of frame_size = (H, W) frames, a G x G grid row-major (y outer), in one of two
    layouts:
    - (B, T', G², 2), the pipeline's tracks: positions at each tubelet's first frame of ONE grid queried at frame 0.
      Slot t's window is (p_t, p_{t+1}); the last slot repeats the previous displacement from p_{T'-1}.
    - (B, T', K+1, G², 2), per-slot windows: slot t's grid queried anew at the slot's first frame (tracker queries
      (t, x, y) allow it), positions at K+1 frames. K = 1: the slot's start and end (e.g. the tubelet's first and
      second sampled frame, MME's interval); K = L: the L+1 raw frames of MME's recipe (true per-step shape).
    visibility: the same shape without the last axis (used only with use_visibility). G*upsample must equal
    2*tokens_side (MME's 2x2 points per token); upsample > 1 interpolates each frame bilinearly (align_corners=True,
    as the project's `kernels.motion.upsample_tracks`), a new point being visible only if every raw point it mixes is.
    Steps: K = 1 cuts the window's displacement D into L equal steps D / L; K = L takes d_k = p_{k+1} - p_k. Each is
    clamped to +-bound, divided by 20 and standardised over the token's 4 points per coordinate and step (PatchStd,
    eps outside the sqrt), as `mme_trajectory_target`. Validity: a point is invalid if one of its intermediate
    positions (k = 1..L-1) has x < 0, x >= W, y < 0 or y >= H (MME's rule); use_visibility also drops points not
    visible (>= threshold) at every frame of the window. A token is valid when any of its 4 points is.
    Returns target (B, N, 8L) float32 (index (c*L + k)*4 + q, q = 2a + b) and valid (B, N) bool, token
    n = (t*h + hp)*h + wp, h = tokens_side. Differences from MME: sub-pixel steps, the grid (cell centres of the
    crop instead of MME's resampled original-resolution grid), for K = 1 equal steps, and for the (B, T', G², 2)
    layout a tubelet-long interval and a grid that drifts with the scene; the measured gaps are in
    bench/results/mme_trajectories.json.
    """
    what = "mme_trajectory_from_tracks"
    L = _check_int(what, "traj_len", traj_len, 1)
    _check_int(what, "tokens_side", tokens_side, 1)
    _check_int(what, "upsample", upsample, 1)
    if not isinstance(tracks, Tensor) or tracks.ndim not in (4, 5) or tracks.shape[-1] != 2 \
            or not tracks.is_floating_point():
        raise ValueError(f"{what}: tracks must be float (B, T', G*G, 2) or (B, T', K+1, G*G, 2), got "
                         f"{tuple(tracks.shape) if isinstance(tracks, Tensor) else type(tracks).__name__}")
    single = tracks.ndim == 4
    batch, slots, points = tracks.shape[0], tracks.shape[1], tracks.shape[-2]
    grid = int(round(points ** 0.5))
    if grid * grid != points:
        raise ValueError(f"{what}: need a square G*G grid, got {points} points")
    if single and slots < 2:
        raise ValueError(f"{what}: the (B, T', G*G, 2) layout needs T' >= 2 slots, got {tuple(tracks.shape)}")
    if not single and tracks.shape[2] not in (2, L + 1):
        raise ValueError(f"{what}: windows must hold K+1 = 2 or L+1 = {L + 1} frames, got {tuple(tracks.shape)}")
    side = grid * upsample
    if side != 2 * tokens_side:
        raise ValueError(f"{what}: G*upsample = {grid}*{upsample} must equal 2*tokens_side = {2 * tokens_side} "
                         f"(MME uses 2x2 points per token)")
    if use_visibility and (visibility is None or tuple(visibility.shape) != tuple(tracks.shape[:-1])):
        raise ValueError(f"{what}: use_visibility needs visibility of shape {tuple(tracks.shape[:-1])}")
    height, width = (int(v) for v in frame_size)
    vis = (visibility >= visibility_threshold) if use_visibility else None
    if single:  # visible at both ends of the slot (the last slot: at its start)
        vis = None if vis is None else torch.stack([vis, torch.cat([vis[:, 1:], vis[:, -1:]], dim=1)], dim=2)
    frames = 2 if single else tracks.shape[2]
    pos = tracks.float().reshape(batch, slots * (1 if single else frames), grid, grid, 2)
    if upsample > 1:
        pos = F.interpolate(pos.permute(0, 4, 1, 2, 3), size=(pos.shape[1], side, side), mode="trilinear",
                            align_corners=True).permute(0, 2, 3, 4, 1)
    if single:
        start = pos  # (B, T', s, s, 2)
        delta = pos[:, 1:] - pos[:, :-1]
        delta = torch.cat([delta, delta[:, -1:]], dim=1)  # the last slot repeats the previous displacement
    else:
        pos = pos.reshape(batch, slots, frames, side, side, 2)
        start, delta = pos[:, :, 0], pos[:, :, -1] - pos[:, :, 0]
    if vis is not None:
        vis = vis.reshape(batch, slots * frames, grid, grid)
        if upsample > 1:
            hidden = F.interpolate((~vis).float().unsqueeze(1), size=(slots * frames, side, side), mode="trilinear",
                                   align_corners=True).squeeze(1)
            vis = hidden <= 0
        vis = vis.reshape(batch, slots, frames, side, side).all(dim=2)
    if frames == 2:  # L equal steps; the displacement is used as is so that a rigid motion stays exactly rigid
        frac = torch.arange(1, L, dtype=torch.float32, device=tracks.device).view(1, 1, L - 1, 1, 1, 1) / L
        inner = start.unsqueeze(2) + frac * delta.unsqueeze(2)  # (B, T', L-1, s, s, 2)
        steps = (delta / L).unsqueeze(2).expand(-1, -1, L, -1, -1, -1)
    else:
        inner = pos[:, :, 1:L]
        steps = pos[:, :, 1:] - pos[:, :, :-1]  # (B, T', L, s, s, 2)
    inside = _inside(inner, height, width).all(dim=2)  # (B, T', s, s)
    if vis is not None:
        inside &= vis
    h = tokens_side
    steps = steps.clamp(-bound, bound) / TRAJ_SCALE
    steps = steps.reshape(batch, slots, L, h, 2, h, 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B,T',hp,wp,c,k,a,b)
    values = patch_std(steps.reshape(batch, slots * h * h, 2 * L, 4), eps)
    valid = inside.reshape(batch, slots, h, 2, h, 2).permute(0, 1, 2, 4, 3, 5).reshape(batch, slots * h * h, 4)
    return values.reshape(batch, slots * h * h, 8 * L), valid.any(dim=-1)
