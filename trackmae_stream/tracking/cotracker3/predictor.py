"""`CoTracker3Predictor`: the official `CoTrackerPredictor` pipeline around our model, batched, plus options.

Official behaviour (facebookresearch/co-tracker `predictor.py`, SPEC.md §2):
  - resize the video to the model resolution 384x512 (bilinear, align_corners=True) and scale the queries by
    ((512-1)/(W-1), (384-1)/(H-1));
  - `grid_size=G`: a G x G grid at `grid_query_frame` (margin W/64 of the model resolution, y outer, x inner), no
    support grid; explicit `queries`: a 6 x 6 support grid at t=0 is appended and dropped afterwards;
  - `model(..., iters=6)`; `backward_tracking`: the time-flipped video gives the tracks of the frames before the
    query frame;
  - visibility = vis > 0.9 (offline; the online model uses vis * conf > 0.6); the query frame of each track is
    overwritten with the query point and marked visible; coordinates are scaled back to the input frames.
Beyond it: tracking at the clip's native resolution (or any (h, w)), the trainer's grid rules (`base.GRID_RULES`, e.g.
a patch-centred grid), any number of iterations, bf16 autocast, torch.compile and CUDA-graph capture, B > 1, and
backward tracking that reuses the encoder features (flipped) instead of encoding the video twice.
Not ported: the dense mode (grid_size=0 without queries) and `segm_mask`, whose point count depends on the data.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import GRID_RULES, query_grid
from .checkpoint import build_cotracker3
from .cuda_graph import CudaGraphRunner
from .model import CoTrackerThreeBase, CoTrackerThreeOnline

OFFICIAL_RESOLUTION = (384, 512)
#: the official predictors' visibility rules: offline vis > 0.9; online vis * conf > 0.6
DEFAULT_THRESHOLDS = {"offline": 0.9, "online": 0.6}


class Prediction(NamedTuple):
    """Predictor output, in pixels of the input video."""

    tracks: Tensor  # (B, T, N, 2) float32, (x, y)
    visibility: Tensor  # (B, T, N) bool: the official rule (visibility_prob > threshold), True at the query frame
    visibility_prob: Tensor  # (B, T, N) float: vis (offline) or vis * conf (online); 1 at the query frame
    confidence: Tensor  # (B, T, N) float: the model's confidence


def resolve_resolution(resolution: str | tuple[int, int], height: int, width: int,
                       stride: int = 4) -> tuple[int, int]:
    """The (h, w) the model runs at: "official" = 384x512; "native" = the input size rounded to a multiple of
    `stride` (at least 8 * stride, so that all 4 pyramid levels are non-empty); or an explicit (h, w)."""
    if resolution == "official":
        return OFFICIAL_RESOLUTION
    if resolution == "native":
        return tuple(max(stride * round(side / stride), 8 * stride) for side in (height, width))
    if isinstance(resolution, (tuple, list)) and len(resolution) == 2:
        h, w = int(resolution[0]), int(resolution[1])
        if h % stride or w % stride:
            raise ValueError(f"resolution {h}x{w} must be divisible by the stride {stride}")
        return h, w
    raise ValueError(f"resolution must be 'official', 'native' or (h, w); got {resolution!r}")


def _scale_xy(xy: Tensor, sx: float, sy: float) -> Tensor:
    """xy (..., 2) with x scaled by sx and y by sy (Python scalars: no host-to-device copy)."""
    return torch.stack([xy[..., 0] * sx, xy[..., 1] * sy], dim=-1)


class CoTracker3Predictor(nn.Module):
    """Point tracking with CoTracker3 on videos of any size (see the module docstring).

    Args:
        model: a CoTrackerThreeOffline/Online (weights loaded); see `from_checkpoint`.
        iters: update iterations (official 6).
        resolution: "official" (384x512), "native" or (h, w).
        amp_dtype: e.g. torch.bfloat16 to run the network under autocast (coordinates stay float32).
        support_grid_size: side of the support grid appended to explicit queries (official 6; 0 disables).
        visibility_threshold: threshold of the boolean visibility; None = the official value of the variant.
        compile: torch.compile the network part (static shapes).
        cuda_graph: capture the network part in a CUDA graph per input shape (CUDA inputs only).
        check_inputs: validate query frames against T (one host sync per call; off for the trainer's hot path).
    """

    def __init__(self, model: CoTrackerThreeBase, *, iters: int = 6, resolution: str | tuple[int, int] = "official",
                 amp_dtype: torch.dtype | None = None, support_grid_size: int = 6,
                 visibility_threshold: float | None = None, compile: bool = False, cuda_graph: bool = False,
                 check_inputs: bool = True):
        super().__init__()
        if iters < 1:
            raise ValueError(f"iters must be >= 1; got {iters}")
        resolve_resolution(resolution, 64, 64)  # validates the argument early
        self.model = model.eval()
        self.variant = "online" if isinstance(model, CoTrackerThreeOnline) else "offline"
        self.iters = iters
        self.resolution = resolution
        self.amp_dtype = amp_dtype
        self.support_grid_size = support_grid_size
        self.visibility_threshold = (DEFAULT_THRESHOLDS[self.variant] if visibility_threshold is None
                                     else visibility_threshold)
        self.check_inputs = check_inputs
        core = self._track_model_space
        if compile:
            core = torch.compile(core, dynamic=False)
        self._core = CudaGraphRunner(core) if cuda_graph else core

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike | None, variant: str = "offline", *,
                        sha256: str | None = None, **kwargs) -> CoTracker3Predictor:
        """Build the model of `variant`, load `checkpoint` (path, URL, "official"; None = random) and wrap it."""
        return cls(build_cotracker3(variant, checkpoint, sha256=sha256), **kwargs)

    # ------------------------------------------------------------------ network part (model space)
    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype, cache_enabled=False)

    def _track_model_space(self, video: Tensor, queries: Tensor, backward_tracking: bool
                           ) -> tuple[Tensor, Tensor, Tensor]:
        """tracks (B,T,N,2), vis, conf (B,T,N) in model pixels; queries (B,N,3) in model pixels."""
        with self._autocast(video.device):
            fmaps = self.model.encode(video)
            tracks, vis, conf, _ = self.model.track_features(fmaps, queries, iters=self.iters)
            if backward_tracking:
                # The encoder works frame by frame, so the flipped video's features are the flipped features.
                n_frames = video.shape[1]
                flipped = torch.cat([n_frames - 1 - queries[..., :1], queries[..., 1:]], dim=-1)
                tracks_b, vis_b, conf_b, _ = self.model.track_features(fmaps.flip(1), flipped, iters=self.iters)
                before = (torch.arange(n_frames, device=video.device, dtype=queries.dtype)[None, :, None]
                          < queries[:, None, :, 0])  # (B, T, N): frames before each query's frame
                tracks = torch.where(before[..., None], tracks_b.flip(1), tracks)
                vis = torch.where(before, vis_b.flip(1), vis)
                conf = torch.where(before, conf_b.flip(1), conf)
        return tracks.float(), vis.float(), conf.float()

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def forward(self, video: Tensor, queries: Tensor | None = None, grid_size: int = 0, grid_query_frame: int = 0,
                backward_tracking: bool = False, grid_rule: str = "cotracker",
                add_support_grid: bool | None = None) -> Prediction:
        """Track points through `video` (B, T, 3, H, W) float in [0, 255].

        queries: (B, N, 3) as (t, x, y) in input pixels; or `grid_size` G > 0 for a G x G grid at `grid_query_frame`
        placed by `grid_rule` (base.GRID_RULES; "cotracker" is the official grid). `add_support_grid`: None = the
        official choice (only for explicit queries).
        """
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be (B, T, 3, H, W); got shape {tuple(video.shape)}")
        video = video.float()  # the network's input normalisation runs in float32 (autocast covers the layers)
        batch, n_frames, _, height, width = video.shape
        model_h, model_w = resolve_resolution(self.resolution, height, width, self.model.stride)
        to_model = ((model_w - 1) / (width - 1), (model_h - 1) / (height - 1))
        device = video.device

        if queries is not None:
            if queries.dim() != 3 or queries.shape[0] != batch or queries.shape[2] != 3:
                raise ValueError(f"queries must be (B={batch}, N, 3) as (t, x, y); got shape {tuple(queries.shape)}")
            queries = queries.to(device=device, dtype=torch.float32)
            if self.check_inputs:
                bad = (queries[..., 0] < 0) | (queries[..., 0] >= n_frames) | ~torch.isfinite(queries).all(-1)
                if bool(bad.any()):
                    raise ValueError(f"queries: frame indices must lie in [0, {n_frames}) and values be finite")
            queries = torch.cat([queries[..., :1], _scale_xy(queries[..., 1:], *to_model)], dim=-1)
        elif grid_size > 0:
            if not 0 <= grid_query_frame < n_frames:
                raise ValueError(f"grid_query_frame {grid_query_frame} is outside [0, {n_frames})")
            xy = self._grid_model_space(grid_size, grid_rule, (height, width), (model_h, model_w), device)
            t = torch.full_like(xy[:, :1], float(grid_query_frame))
            queries = torch.cat([t, xy], dim=1).unsqueeze(0).expand(batch, -1, -1)
        else:
            raise ValueError("give either queries or grid_size > 0 (the dense mode is not implemented)")
        n_points = queries.shape[1]

        if add_support_grid is None:
            add_support_grid = grid_size == 0
        if add_support_grid and self.support_grid_size > 0:
            support = query_grid(self.support_grid_size, model_h, model_w, "naive", device=device)
            support = torch.cat([torch.zeros_like(support[:, :1]), support], dim=1)
            model_queries = torch.cat([queries, support.unsqueeze(0).expand(batch, -1, -1)], dim=1)
        else:
            model_queries = queries

        model_video = video
        if (model_h, model_w) != (height, width):
            model_video = F.interpolate(video.reshape(batch * n_frames, 3, height, width), (model_h, model_w),
                                        mode="bilinear", align_corners=True).reshape(batch, n_frames, 3, model_h,
                                                                                     model_w)
        tracks, vis, conf = self._core(model_video.contiguous(), model_queries.contiguous(), backward_tracking)
        tracks, vis, conf = tracks[:, :, :n_points], vis[:, :, :n_points], conf[:, :, :n_points]

        prob = vis * conf if self.variant == "online" else vis
        visible = prob > self.visibility_threshold
        # The query frame of each track: the query point itself, visible (official: co-tracker issue #28).
        at_query = (torch.arange(n_frames, device=device)[None, :, None] == queries[:, None, :, 0].long())
        tracks = torch.where(at_query[..., None], queries[:, None, :, 1:], tracks)
        visible = visible | at_query
        prob = torch.where(at_query, torch.ones_like(prob), prob)
        tracks = _scale_xy(tracks, (width - 1) / (model_w - 1), (height - 1) / (model_h - 1))
        return Prediction(tracks, visible, prob, conf)

    @staticmethod
    def _grid_model_space(grid_size: int, rule: str, frame_hw: tuple[int, int], model_hw: tuple[int, int],
                          device: torch.device) -> Tensor:
        """(G*G, 2) grid points in model pixels for a grid rule defined on the input frames (base.query_grid)."""
        if rule not in GRID_RULES:
            raise ValueError(f"unknown grid rule {rule!r}; expected one of {GRID_RULES}")
        if rule == "cotracker" and model_hw == OFFICIAL_RESOLUTION:
            # Exactly the official points: the margin rule applied at the model resolution itself.
            return query_grid(grid_size, *OFFICIAL_RESOLUTION, "naive", device=device)
        (height, width), (model_h, model_w) = frame_hw, model_hw
        xy = query_grid(grid_size, height, width, rule, device=device)
        return _scale_xy(xy, (model_w - 1) / (width - 1), (model_h - 1) / (height - 1))
