"""The point-tracker interface the trainer talks to, and the query-grid rules.

A tracker takes frames (B, T, 3, H, W) as float in [0, 255] and queries (B, N, 3) as (t, x, y) in pixels of those
frames (pixel-centre convention: x = 0 is the centre of the first column), and returns tracks (B, T, N, 2) in the
same pixel units plus a visibility (B, T, N) in [0, 1]. Everything stays on the frames' device; no host syncs.
"""
from __future__ import annotations

import abc
import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

GRID_RULES = ("cotracker", "naive", "patch_centred")


@dataclass
class TrackerOutput:
    tracks: Tensor  # (B, T, N, 2) float32, (x, y) pixels of the input frames
    visibility: Tensor  # (B, T, N) float in [0, 1]


def query_grid(grid_size: int, height: int, width: int, rule: str = "cotracker",
               device: torch.device | str | None = None) -> Tensor:
    """Frame-0 query points (G*G, 2) as (x, y), row-major (y outer, x inner): CoTracker's point order.

    Rules:
      - "cotracker": what the official CoTrackerPredictor effectively queries: `get_points_on_a_grid(G, (384, 512))`
        (margin 512/64 = 8) mapped back to the frame by ((W-1)/511, (H-1)/383). The public TrackMAE default.
      - "naive": `get_points_on_a_grid(G, (H, W))` on the frame itself (margin W/64).
      - "patch_centred": the centres of a G x G partition of the frame, (j + 0.5) * W / G - 0.5; with G = 14 on
        224 px these are the ViT patch centres 16 j + 7.5, which the paper describes.
    The grid is built once per (G, H, W, rule, device) and cached there: a training step asks for it every batch,
    and building it anew would copy host memory to the device (a host sync) each time. Do not modify it in place.
    """
    if grid_size < 2:
        raise ValueError(f"grid_size must be >= 2, got {grid_size}")
    if rule not in GRID_RULES:
        raise ValueError(f"unknown grid rule {rule!r}; expected one of {GRID_RULES}")
    return _cached_grid(grid_size, height, width, rule, torch.device(device) if device is not None else None)


@functools.lru_cache(maxsize=64)
def _cached_grid(grid_size: int, height: int, width: int, rule: str, device: torch.device | None) -> Tensor:
    if rule == "cotracker":
        margin = 512 / 64
        ys = torch.linspace(margin, 384 - margin, grid_size, dtype=torch.float32)
        xs = torch.linspace(margin, 512 - margin, grid_size, dtype=torch.float32)
        xs = xs * torch.tensor((width - 1) / (512 - 1), dtype=torch.float32)
        ys = ys * torch.tensor((height - 1) / (384 - 1), dtype=torch.float32)
    elif rule == "naive":
        margin = width / 64
        ys = torch.linspace(margin, height - margin, grid_size, dtype=torch.float32)
        xs = torch.linspace(margin, width - margin, grid_size, dtype=torch.float32)
    else:  # patch_centred
        idx = torch.arange(grid_size, dtype=torch.float64) + 0.5
        xs = (idx * width / grid_size - 0.5).float()
        ys = (idx * height / grid_size - 0.5).float()
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(-1, 2).to(device)


def grid_queries(batch: int, grid_size: int, height: int, width: int, rule: str = "cotracker",
                 query_frame: int = 0, device: torch.device | str | None = None) -> Tensor:
    """(B, G*G, 3) queries (t, x, y) at `query_frame` for every clip of a batch."""
    xy = query_grid(grid_size, height, width, rule, device=device)
    t = torch.full((xy.shape[0], 1), float(query_frame), device=xy.device)
    return torch.cat([t, xy], dim=1).unsqueeze(0).expand(batch, -1, -1).contiguous()


class PointTracker(nn.Module, abc.ABC):
    """Base class of the trainer's trackers. Subclasses implement `forward(frames, queries)`."""

    #: short name written to the run log, e.g. "cotracker3-offline" or "lucas-kanade"
    name: str = "tracker"

    def __init__(self, grid_rule: str = "cotracker"):
        super().__init__()
        if grid_rule not in GRID_RULES:
            raise ValueError(f"unknown grid rule {grid_rule!r}; expected one of {GRID_RULES}")
        self.grid_rule = grid_rule

    @abc.abstractmethod
    def forward(self, frames: Tensor, queries: Tensor) -> TrackerOutput:
        """frames (B, T, 3, H, W) float in [0, 255]; queries (B, N, 3) as (t, x, y) pixels."""

    def gflop(self, n_frames: int, n_points: int, height: int, width: int, *,
              explicit_queries: bool = False) -> float | None:
        """Analytic GFLOP of tracking one clip of n_frames x height x width with n_points queries, by `track_grid`
        or (explicit_queries) by `forward` (None: this tracker has no FLOP model; the log then shows none)."""
        return None

    @torch.no_grad()
    def track_grid(self, frames: Tensor, grid_size: int) -> TrackerOutput:
        """Track a G x G grid of frame-0 points (placed by `self.grid_rule`) through the clip."""
        b, _, _, h, w = frames.shape
        queries = grid_queries(b, grid_size, h, w, self.grid_rule, device=frames.device)
        return self(frames, queries)
