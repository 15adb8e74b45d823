"""`CoTracker3Tracker`: the trainer's `PointTracker` backed by `CoTracker3Predictor`."""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ..base import PointTracker, TrackerOutput
from .checkpoint import build_cotracker3
from .predictor import CoTracker3Predictor


class CoTracker3Tracker(PointTracker):
    """CoTracker3 behind the trainer's tracker interface.

    Args:
        checkpoint: local path, URL, "official" (the released scaled checkpoint of the variant), or None for random
            weights (benchmarks/tests; a warning is logged).
        variant: "offline" (window 60, time embedding resampled to T) or "online" (sliding windows of 16).
        iters: update iterations (official 6).
        resolution: "official" = resize to 384x512 like the official predictor; "native" = track the frames as given.
        amp_dtype: e.g. torch.bfloat16: autocast for the network (coordinates stay float32).
        grid_rule: placement of `track_grid`'s points (base.GRID_RULES).
        compile: torch.compile the network part. cuda_graph: capture it in a CUDA graph per input shape.
        sha256: expected SHA-256 of the checkpoint file.
        binary_visibility: return the official boolean rule (vis > 0.9 offline, vis*conf > 0.6 online) as 0/1
            instead of the probability.

    `forward(frames, queries)` follows the official predictor for explicit queries (with its 6x6 support grid);
    `track_grid` uses the predictor's grid path (no support grid; the official grid for grid_rule="cotracker" at the
    official resolution). Both overwrite each track's query frame with the query point, visibility 1. Everything runs
    under no_grad on the frames' device, without host syncs, for any batch size.
    """

    def __init__(self, checkpoint: str | os.PathLike | None, *, variant: str = "offline", iters: int = 6,
                 resolution: str = "official", amp_dtype: torch.dtype | None = None, grid_rule: str = "cotracker",
                 compile: bool = False, sha256: str | None = None, cuda_graph: bool = False,
                 binary_visibility: bool = False):
        super().__init__(grid_rule=grid_rule)
        if resolution not in ("official", "native"):
            raise ValueError(f"resolution must be 'official' or 'native'; got {resolution!r}")
        model = build_cotracker3(variant, checkpoint, sha256=sha256)
        self.predictor = CoTracker3Predictor(model, iters=iters, resolution=resolution, amp_dtype=amp_dtype,
                                             compile=compile, cuda_graph=cuda_graph, check_inputs=False)
        self.name = f"cotracker3-{variant}"
        self.binary_visibility = binary_visibility

    def _output(self, prediction) -> TrackerOutput:
        visibility = prediction.visibility.float() if self.binary_visibility else prediction.visibility_prob
        return TrackerOutput(tracks=prediction.tracks, visibility=visibility)

    def gflop(self, n_frames: int, n_points: int, height: int, width: int, *, explicit_queries: bool = False) -> float:
        """The analytic count (flops.py) at the resolution the predictor runs (explicit queries: + its support grid)."""
        from .flops import cotracker3_gflop
        from .predictor import resolve_resolution

        model_h, model_w = resolve_resolution(self.predictor.resolution, height, width, self.predictor.model.stride)
        window = None if self.name.endswith("offline") else self.predictor.model.window_len
        support = self.predictor.support_grid_size ** 2 if explicit_queries else 0
        return cotracker3_gflop(n_frames, n_points + support, model_h, model_w, self.predictor.iters,
                                window=window).total

    @torch.no_grad()
    def forward(self, frames: Tensor, queries: Tensor) -> TrackerOutput:
        """frames (B, T, 3, H, W) float in [0, 255]; queries (B, N, 3) as (t, x, y) pixels of the frames."""
        return self._output(self.predictor(frames, queries=queries))

    @torch.no_grad()
    def track_grid(self, frames: Tensor, grid_size: int) -> TrackerOutput:
        """A G x G grid of frame-0 points placed by `self.grid_rule`, tracked through the clip."""
        return self._output(self.predictor(frames, grid_size=grid_size, grid_query_frame=0, grid_rule=self.grid_rule))
