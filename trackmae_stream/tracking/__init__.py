"""Point trackers behind one interface (`PointTracker`): CoTracker3 (our implementation of the official model) and a
weight-free pyramidal Lucas-Kanade fallback for runs without a CoTracker3 checkpoint, and the synthetic set's exact
tracks (synthetic_gt) to separate tracker quality from the method."""
from __future__ import annotations

import torch

from ..config import TrackerConfig
from .base import GRID_RULES, PointTracker, TrackerOutput, grid_queries, query_grid

__all__ = ["PointTracker", "TrackerOutput", "query_grid", "grid_queries", "GRID_RULES", "build_tracker",
           "resolve_tracker_backend"]


def resolve_tracker_backend(cfg: TrackerConfig) -> str:
    if cfg.backend == "auto":
        return "cotracker3" if cfg.checkpoint else "lucas-kanade"
    return cfg.backend


def build_tracker(cfg: TrackerConfig, device: torch.device) -> PointTracker:
    """The configured tracker, on `device`, in eval mode with frozen weights."""
    backend = resolve_tracker_backend(cfg)
    if backend == "cotracker3":
        from .cotracker3 import CoTracker3Tracker

        tracker = CoTracker3Tracker(cfg.checkpoint, variant=cfg.variant, iters=cfg.iters, resolution=cfg.resolution,
                                    amp_dtype=torch.bfloat16 if cfg.precision == "bf16" else None,
                                    grid_rule=cfg.grid_rule, compile=cfg.compile, cuda_graph=cfg.cuda_graph,
                                    sha256=cfg.sha256)
    elif backend == "lucas-kanade":
        from .lucas_kanade import LucasKanadeTracker

        tracker = LucasKanadeTracker(grid_rule=cfg.grid_rule)
    elif backend == "synthetic_gt":
        from .synthetic_gt import SyntheticGroundTruthTracker

        tracker = SyntheticGroundTruthTracker(grid_rule=cfg.grid_rule)
    else:
        raise ValueError(f"tracker.backend={cfg.backend!r} is unknown")
    return tracker.to(device).eval().requires_grad_(False)
