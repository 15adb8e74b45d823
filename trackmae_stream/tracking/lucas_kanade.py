"""Weight-free fallback tracker: pyramidal iterative Lucas-Kanade (Bouguet) in torch.

Used when no CoTracker3 checkpoint is configured. One code path for CPU and GPU: every operation is batched over clips
and points (windows are read with `grid_sample`), the only Python loops run over frames, pyramid levels and a fixed
number of iterations, and convergence is handled with masks instead of early exits, so nothing waits on the host.

The algorithm follows OpenCV's `calcOpticalFlowPyrLK` (the test's reference):
  - grey image 0.299 R + 0.587 G + 0.114 B, Gaussian pyramid built like `cv2.pyrDown` (5x5 [1 4 6 4 1] kernel,
    reflect-101 border, output ceil(size / 2)); a level is only used while it is larger than the window (OpenCV's rule);
  - Scharr derivatives of the previous frame, reflect-101 border, zero outside the frame;
  - per level, coarse to fine: the 2x2 structure tensor G of the previous frame's window; points whose smallest
    eigenvalue (OpenCV's normalisation, see `min_eig_threshold`) is too small keep their guess; Newton steps
    delta = G^-1 sum((I - J) grad I) until |delta| <= eps, with OpenCV's half-step stop on oscillation;
    the guess doubles from one level to the next.
It works in float32 throughout, so it differs from OpenCV's 8-bit pyramid and fixed-point interpolation by a few
hundredths of a pixel on well-textured points.

Tracking is chained frame to frame from each query's frame: forward to the end of the clip and backward to its start.
One backward sweep (frame t+1 -> t) serves two purposes at once, so the cost is two LK steps per frame pair whatever
the query frames are: for frames before a point's query frame it continues the backward chain, and for later frames it
re-tracks the forward result back one frame, giving the forward-backward error of that step.

Visibility in [0, 1] is a reliability score, cumulative along the chain (a chained LK track that has drifted does not
recover): each step scores clamp(1 - fb_error / fb_threshold, 0, 1) (forward steps only; the backward chain has no
independent check), times 0 when the window is untextured (OpenCV's status) or the point has left the frame.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from trackmae_stream.tracking.base import PointTracker, TrackerOutput

# ITU-R BT.601 luma, as cv2.cvtColor(..., COLOR_RGB2GRAY).
_RGB_TO_GREY = (0.299, 0.587, 0.114)
# OpenCV scales its window sums by 32 (fixed-point image) * 32 (Scharr gain) / 2**20: its minEig is ours / 1024.
_OPENCV_EIG_SCALE = 1.0 / 1024.0
# OpenCV's determinant guard (FLT_EPSILON on its scaled structure tensor).
_OPENCV_DET_EPS = 1.1920929e-07


def _pyr_down(images: Tensor) -> Tensor:
    """cv2.pyrDown on float images (N, C, H, W): 5x5 binomial blur, reflect-101 border, keep even rows and columns.

    Written as separable sums of shifted slices rather than a convolution: exact float32 on every device (cuDNN
    would use TF32 by default), and the same arithmetic on CPU and GPU.
    """
    def taps(x: Tensor, dim: int) -> Tensor:
        size = x.shape[dim] - 4  # output positions 2i read padded 2i .. 2i + 4
        part = [x.narrow(dim, k, size).unfold(dim, 1, 2).squeeze(-1) for k in range(5)]
        return part[0] + part[4] + 4.0 * (part[1] + part[3]) + 6.0 * part[2]

    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")  # torch's "reflect" is OpenCV's reflect-101
    return taps(taps(padded, -2), -1) / 256.0


def _scharr_gradients(images: Tensor) -> Tensor:
    """(N, 1, H, W) -> (N, 2, H, W) d/dx and d/dy in grey levels per pixel (Scharr / 32), reflect-101 border.

    Separable shifted sums, exact float32 on every device (see `_pyr_down`).
    """
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    smooth_rows = 3.0 * (padded[..., :-2, :] + padded[..., 2:, :]) + 10.0 * padded[..., 1:-1, :]  # (N, 1, H, W + 2)
    smooth_cols = 3.0 * (padded[..., :-2] + padded[..., 2:]) + 10.0 * padded[..., 1:-1]  # (N, 1, H + 2, W)
    grad_x = smooth_rows[..., 2:] - smooth_rows[..., :-2]
    grad_y = smooth_cols[..., 2:, :] - smooth_cols[..., :-2, :]
    return torch.cat([grad_x, grad_y], dim=1) / 32.0


@functools.lru_cache(maxsize=64)
def _grid_scale(width: int, height: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(2,) pixel -> grid_sample scale, built once per size and device: a fresh small tensor every call would be a
    host-to-device copy, i.e. a host sync, hundreds of times per batch."""
    return torch.tensor([2.0 / (width - 1), 2.0 / (height - 1)], dtype=dtype, device=device)


def _sample_windows(images: Tensor, centres: Tensor, offsets: Tensor, padding_mode: str) -> Tensor:
    """Bilinear samples of images (B, C, H, W) on windows around centres (B, N, 2) -> (B, C, N, K).

    offsets (K, 2) are pixel offsets of the window; positions are pixel-centre coordinates (x = 0 is the centre of the
    first column), which is `align_corners=True`.
    """
    height, width = images.shape[-2:]
    scale = _grid_scale(width, height, centres.dtype, centres.device)
    # Normalise the (B, N) centres and the (K,) offsets separately: one full-size add builds the (B, N, K, 2) grid.
    grid = (centres * scale - 1.0).unsqueeze(2) + offsets * scale
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


class LucasKanadeTracker(PointTracker):
    """Pyramidal Lucas-Kanade point tracker (no weights); `name = "lucas-kanade"`.

    Args:
        window: side of the square integration window in pixels (odd; OpenCV's winSize). 15 rather than OpenCV's 21:
            on the synthetic set (128 px) it halves the cost and lowers the mean end-point error (0.96 vs 1.19 px).
        levels: number of coarser pyramid levels above full resolution (OpenCV's maxLevel). Fewer are used when a
            level would not be larger than the window, as OpenCV does.
        iters: Newton iterations per level (a fixed count; converged points are frozen by masks).
        eps: a point stops iterating at a level once its update is at most this many pixels (OpenCV's epsilon).
        min_eig_threshold: untextured-window threshold in OpenCV's units: smallest eigenvalue of the window's
            structure tensor / window area / 1024, gradients in grey levels per pixel. Below it a point keeps its
            guess at that level and, at full resolution, its step is scored invisible.
        fb_threshold: forward-backward error (pixels) at which a step's reliability reaches 0.
        grid_rule: query-grid rule for `track_grid` (see `base.query_grid`).
    """

    name = "lucas-kanade"

    def __init__(self, window: int = 15, levels: int = 3, iters: int = 10, eps: float = 0.01,
                 min_eig_threshold: float = 1e-4, fb_threshold: float = 1.0, grid_rule: str = "cotracker"):
        super().__init__(grid_rule=grid_rule)
        if window < 3 or window % 2 == 0:
            raise ValueError(f"LucasKanadeTracker: window must be an odd integer >= 3, got {window}")
        if levels < 0:
            raise ValueError(f"LucasKanadeTracker: levels must be >= 0, got {levels}")
        if iters < 1:
            raise ValueError(f"LucasKanadeTracker: iters must be >= 1, got {iters}")
        if eps < 0 or min_eig_threshold < 0:
            raise ValueError(f"LucasKanadeTracker: eps and min_eig_threshold must be >= 0, got {eps}, "
                             f"{min_eig_threshold}")
        if fb_threshold <= 0:
            raise ValueError(f"LucasKanadeTracker: fb_threshold must be > 0, got {fb_threshold}")
        self.window = window
        self.levels = levels
        self.iters = iters
        self.eps = eps
        self.min_eig_threshold = min_eig_threshold
        self.fb_threshold = fb_threshold
        half = (window - 1) / 2.0
        steps = torch.arange(window, dtype=torch.float32) - half
        dy, dx = torch.meshgrid(steps, steps, indexing="ij")
        self.register_buffer("_window_offsets", torch.stack([dx, dy], dim=-1).reshape(-1, 2), persistent=False)
        self.register_buffer("_rgb_to_grey", torch.tensor(_RGB_TO_GREY, dtype=torch.float32).view(1, 1, 3, 1, 1),
                             persistent=False)

    def extra_repr(self) -> str:
        return (f"window={self.window}, levels={self.levels}, iters={self.iters}, eps={self.eps}, "
                f"min_eig_threshold={self.min_eig_threshold}, fb_threshold={self.fb_threshold}")

    def num_levels(self, height: int, width: int) -> int:
        """Pyramid levels used for frames of this size (full resolution included): OpenCV's stopping rule."""
        count = 1
        h, w = height, width
        for _ in range(self.levels):
            h, w = (h + 1) // 2, (w + 1) // 2
            if h <= self.window or w <= self.window:
                break
            count += 1
        return count

    def build_pyramid(self, grey: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Grey frames (N, 1, H, W) -> per level, images (N, 1, H_l, W_l) and Scharr gradients (N, 2, H_l, W_l)."""
        images = [grey]
        for _ in range(self.num_levels(*grey.shape[-2:]) - 1):
            images.append(_pyr_down(images[-1]))
        return images, [_scharr_gradients(level) for level in images]

    def track_step(self, prev_images: list[Tensor], prev_grads: list[Tensor], next_images: list[Tensor],
                   points: Tensor) -> tuple[Tensor, Tensor]:
        """One pyramidal LK step: points (B, N, 2) in the previous frame -> their positions in the next frame.

        prev_images/next_images: per level (B, 1, H_l, W_l); prev_grads: per level (B, 2, H_l, W_l) (see
        `build_pyramid`). Returns (positions (B, N, 2), textured (B, N) bool: the full-resolution window passed the
        eigenvalue test).
        """
        offsets = self._window_offsets.to(points.dtype)
        area = offsets.shape[0]
        eps_sq = self.eps * self.eps
        guess = points
        top = len(prev_images) - 1
        for level in range(top, -1, -1):
            scale = 0.5 ** level
            centre = points * scale
            guess = centre if level == top else guess * 2.0
            patch = _sample_windows(prev_images[level], centre, offsets, "reflection")[:, 0]  # (B, N, K)
            # (B, N, 2, K) window gradients; OpenCV pads images with reflect-101 and derivatives with zeros.
            grads = _sample_windows(prev_grads[level], centre, offsets, "zeros").transpose(1, 2).contiguous()
            tensor = torch.einsum("bnck,bndk->bncd", grads, grads) * _OPENCV_EIG_SCALE  # (B, N, 2, 2)
            a11, a12, a22 = tensor[..., 0, 0], tensor[..., 0, 1], tensor[..., 1, 1]
            det = a11 * a22 - a12 * a12
            min_eig = (a11 + a22 - torch.sqrt((a11 - a22) ** 2 + 4.0 * a12 * a12)) / (2.0 * area)
            solvable = (min_eig >= self.min_eig_threshold) & (det >= _OPENCV_DET_EPS)
            inv_det = torch.where(solvable, 1.0 / torch.where(solvable, det, torch.ones_like(det)),
                                  torch.zeros_like(det))
            active = solvable
            prev_delta = torch.zeros_like(guess)
            for it in range(self.iters):
                warped = _sample_windows(next_images[level], guess, offsets, "reflection")[:, 0]
                # Residual first: sum(J grad I) - sum(I grad I) would cancel catastrophically under TF32 matmuls.
                moment = torch.einsum("bnk,bnck->bnc", warped - patch, grads) * _OPENCV_EIG_SCALE
                b1, b2 = moment[..., 0], moment[..., 1]
                delta = torch.stack([(a12 * b2 - a22 * b1) * inv_det, (a12 * b1 - a11 * b2) * inv_det], dim=-1)
                delta = delta * active.unsqueeze(-1)
                guess = guess + delta
                converged = (delta * delta).sum(-1) <= eps_sq
                if it > 0:
                    # Bouncing between two positions: settle halfway and stop, as OpenCV does.
                    oscillating = ((delta + prev_delta).abs() < 0.01).all(-1) & active & ~converged
                    guess = guess - 0.5 * delta * oscillating.unsqueeze(-1)
                    converged = converged | oscillating
                active = active & ~converged
                prev_delta = delta
        return guess, solvable  # the loop ends at full resolution: OpenCV's status

    def forward(self, frames: Tensor, queries: Tensor) -> TrackerOutput:
        """frames (B, T, 3, H, W) float in [0, 255]; queries (B, N, 3) as (t, x, y) pixels.

        Query frames are rounded to the nearest frame and clamped into [0, T-1] (no host-side check). Returns tracks
        (B, T, N, 2) float32 and visibility (B, T, N) in [0, 1]; the query's own frame gets the query position.
        """
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"LucasKanadeTracker: frames must be (B, T, 3, H, W), got {tuple(frames.shape)}")
        if queries.dim() != 3 or queries.shape[-1] != 3 or queries.shape[0] != frames.shape[0]:
            raise ValueError(f"LucasKanadeTracker: queries must be (B, N, 3) with B = {frames.shape[0]}, "
                             f"got {tuple(queries.shape)}")
        if not frames.is_floating_point():
            raise TypeError(f"LucasKanadeTracker: frames must be float in [0, 255], got {frames.dtype}")
        batch, num_frames, _, height, width = frames.shape
        device = frames.device
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            grey = (frames.float() * self._rgb_to_grey).sum(2, keepdim=True)  # (B, T, 1, H, W)
            flat_images, flat_grads = self.build_pyramid(grey.reshape(batch * num_frames, 1, height, width))
            images = [level.reshape(batch, num_frames, *level.shape[1:]) for level in flat_images]
            grads = [level.reshape(batch, num_frames, *level.shape[1:]) for level in flat_grads]

            def frame_pyramid(t: int) -> tuple[list[Tensor], list[Tensor]]:
                return [level[:, t] for level in images], [level[:, t] for level in grads]

            query_xy = queries[..., 1:].float()
            query_t = queries[..., 0].round().long().clamp(0, num_frames - 1)  # (B, N)

            # Forward chain; for frames before a point's query frame these positions are discarded.
            forward_tracks = [query_xy]
            forward_textured = [torch.ones_like(query_t, dtype=torch.bool)]
            position = query_xy
            for t in range(num_frames - 1):
                prev_images, prev_grads = frame_pyramid(t)
                next_images, _ = frame_pyramid(t + 1)
                position, textured = self.track_step(prev_images, prev_grads, next_images, position)
                position = torch.where((query_t == t + 1).unsqueeze(-1), query_xy, position)
                forward_tracks.append(position)
                forward_textured.append(textured)
            forward_xy = torch.stack(forward_tracks, dim=1)  # (B, T, N, 2)

            # Backward sweep: continue the backward chain before the query frame, re-track the forward result after it.
            backward_tracks = [forward_xy[:, -1]] * num_frames
            backward_textured = [torch.ones_like(query_t, dtype=torch.bool)] * num_frames
            position = forward_xy[:, -1]
            for t in range(num_frames - 2, -1, -1):
                start = torch.where((query_t <= t + 1).unsqueeze(-1), forward_xy[:, t + 1], position)
                prev_images, prev_grads = frame_pyramid(t + 1)
                next_images, _ = frame_pyramid(t)
                position, textured = self.track_step(prev_images, prev_grads, next_images, start)
                backward_tracks[t] = position
                backward_textured[t] = textured
            backward_xy = torch.stack(backward_tracks, dim=1)

            frame_index = torch.arange(num_frames, device=device).view(1, num_frames, 1)
            after_query = frame_index >= query_t.unsqueeze(1)  # (B, T, N)
            tracks = torch.where(after_query.unsqueeze(-1), forward_xy, backward_xy)

            # Step reliability into frame t: forward steps (t > query) are checked by re-tracking back to t - 1.
            fb_error = torch.linalg.vector_norm(backward_xy[:, :-1] - forward_xy[:, :-1], dim=-1)  # frames 0..T-2
            fb_score = (1.0 - fb_error / self.fb_threshold).clamp(0.0, 1.0)
            ones = torch.ones_like(fb_score[:, :1])
            forward_score = torch.cat([ones, fb_score], dim=1)  # indexed by destination frame
            forward_score = forward_score * torch.stack(forward_textured, dim=1)
            backward_score = torch.stack(backward_textured, dim=1).float()
            in_frame = ((tracks[..., 0] >= -0.5) & (tracks[..., 0] <= width - 0.5)
                        & (tracks[..., 1] >= -0.5) & (tracks[..., 1] <= height - 0.5))
            step_score = torch.where(after_query, forward_score, backward_score) * in_frame
            # The query frame itself scores 1 (if inside the frame); reliability only decays away from it.
            step_score = torch.where(frame_index == query_t.unsqueeze(1), in_frame.float(), step_score)
            forward_vis = torch.where(after_query, step_score, torch.ones_like(step_score)).cummin(dim=1).values
            backward_vis = torch.where(after_query, torch.ones_like(step_score), step_score)
            backward_vis = backward_vis.flip(1).cummin(dim=1).values.flip(1)
            visibility = torch.where(after_query, forward_vis, backward_vis)
        return TrackerOutput(tracks=tracks.float(), visibility=visibility.float())
