"""Stored whole-frame tracks -> the tracks of an augmented clip's query grid, in clip pixels.

Coordinates.
  - Clip pixels: the tracker interface's pixel-centre convention (`tracking.base`): x = 0 is the centre of the clip's
    first column, the clip is input_size x input_size.
  - Normalised source coordinates (u, v): edge-based fractions of the decoded frame (W x H), u = (x + 0.5) / W and
    v = (y + 0.5) / H for a source pixel-centre position (x, y); (0, 0) is the frame's top-left corner, (1, 1) its
    bottom-right one. A half-pixel-centred resize (cv2 INTER_LINEAR, torch `interpolate(align_corners=False)`)
    leaves them unchanged, so tracks of the frame resized to store_size x store_size convert with
    u = (x_store + 0.5) / store_size (`pixels_to_unit`), whatever the source's aspect ratio.
  - The clip is `crop_resize_flip(frames, box, input_size, flip)`: source columns [box.x, box.x + box.w) resized to
    input_size (cv2 INTER_LINEAR: source x = box.x + (c + 0.5) * box.w / input_size - 0.5 for clip column c), then
    mirrored (c -> input_size - 1 - c). `clip_to_source` is that map (the mirror undone first), `source_to_clip` its
    inverse; both are affine per clip and axis.

The stored grid: G x G frame-0 points u_j = (j + 0.5) / G, v_i = (i + 0.5) / G, row-major (v outer)
(`store_query_points`; in store pixels the `patch_centred` `query_grid` of the store_size frame), tracked at T'
frames (frame 0 = the query frame): stored (B, T', G*G, 2) normalised positions, stored_vis (B, T', G*G).

Interpolation (`remap_tracks`). A frame-0 query q = (u, v) sits at grid coordinates g = (u G - 1/2, v G - 1/2),
clamped per axis to [0, G - 1]; with x0 = min(floor(g_x), G - 2), w_x = g_x - x0 (same for y), its four stencil points
(x0 + a, y0 + b), a, b in {0, 1}, get the bilinear weights w_ab = (a w_x + (1 - a)(1 - w_x)) (b w_y + (1 - b)(1 - w_y)).
Displacements, not positions, are interpolated:
    track_q(t) = q + sum_ab w_ab (stored_ab(t) - stored_ab(0)),
so track_q(0) = q exactly (even when a tracker's frame-0 output is not exactly its query), and any motion field
affine in the frame-0 position (translation, rotation, zoom: a rigid surface under a similarity) is reproduced
exactly inside the grid's hull [1/(2G), 1 - 1/(2G)]^2. The same assumption as the paper's bilinear upsampling
of the tracked grid (υ = 2); it fails only where a stencil straddles two differently moving surfaces.
Border rule: a query outside the hull (within half a grid step of the frame's edge) takes the displacement of its
per-axis clamped position on the hull's edge (constant extrapolation, like grid_sample's padding_mode="border").
Visibility rule (the min rule of `target.drop_invisible`'s upsampling): the minimum of stored_vis over the stencil
points with a nonzero weight; so thresholding it at any v keeps a remapped point only where every stored point its
track takes a share from is visible. `remap_to_clip` (crop_visibility, default on) also sets it to 0 where the track
leaves the clip's frame ([-0.5, input_size - 0.5] per axis), as the synthetic ground truth does for its own frame and
a tracker run on the clip would.

`remap_to_clip(c) = source_to_clip(remap_tracks(clip_to_source(c)))`, computed as c + J (track_q(t) - q) with J the
(diagonal, per clip) Jacobian of `source_to_clip`, which keeps frame 0 exactly at c and the displacements free of
the round trip's rounding.

Everything is torch, batched, float32 (float64 when the points are float64), on the inputs' device, without host
syncs; crop_box, flipped and source_size should already be on that device (the loader's batch travels there).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _geometry(points: Tensor, crop_box: Tensor, flipped: Tensor, source_size: Tensor,
              input_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """points as (B or 1, N, 2) float, and box (B, 4), source size (B, 2), flip (B, 1) on the points' device."""
    if points.shape[-1] != 2 or points.ndim not in (2, 3):
        raise ValueError(f"points must be (N, 2) or (B, N, 2), got {tuple(points.shape)}")
    if crop_box.ndim != 2 or crop_box.shape[1] != 4:
        raise ValueError(f"crop_box must be (B, 4) (x, y, w, h), got {tuple(crop_box.shape)}")
    batch = crop_box.shape[0]
    if tuple(flipped.shape) != (batch,) or tuple(source_size.shape) != (batch, 2):
        raise ValueError(f"flipped must be ({batch},) and source_size ({batch}, 2), got {tuple(flipped.shape)} and "
                         f"{tuple(source_size.shape)}")
    if points.ndim == 3 and points.shape[0] not in (1, batch):
        raise ValueError(f"points hold {points.shape[0]} clips but crop_box {batch}")
    if input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    dtype = points.dtype if points.is_floating_point() else torch.float32
    pts = points.to(dtype)
    pts = pts.unsqueeze(0) if pts.ndim == 2 else pts
    box = crop_box.to(device=pts.device, dtype=dtype)
    size = source_size.to(device=pts.device, dtype=dtype)
    flip = flipped.to(device=pts.device, dtype=torch.bool)[:, None]
    return pts, box, size, flip


def pixels_to_unit(points: Tensor, width: float | Tensor, height: float | Tensor) -> Tensor:
    """(..., 2) pixel-centre (x, y) of a width x height frame -> normalised (u, v) = ((x + 0.5) / W, (y + 0.5) / H)."""
    return torch.stack([(points[..., 0] + 0.5) / width, (points[..., 1] + 0.5) / height], dim=-1)


def unit_to_pixels(points: Tensor, width: float | Tensor, height: float | Tensor) -> Tensor:
    """Inverse of `pixels_to_unit`: (u W - 0.5, v H - 0.5)."""
    return torch.stack([points[..., 0] * width - 0.5, points[..., 1] * height - 0.5], dim=-1)


def store_query_points(store_grid: int, device: torch.device | str | None = None) -> Tensor:
    """(G*G, 2) float32 normalised frame-0 points of the stored grid, u_j = (j + 0.5) / G, row-major (v outer)."""
    if store_grid < 2:
        raise ValueError(f"store_grid must be >= 2, got {store_grid}")
    # built on the device itself: no host-to-device copy
    centres = (torch.arange(store_grid, dtype=torch.float32, device=device) + 0.5) / store_grid
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([u, v], dim=-1).reshape(-1, 2)


def clip_to_source(points: Tensor, crop_box: Tensor, flipped: Tensor, source_size: Tensor,
                   input_size: int) -> Tensor:
    """Clip pixels (N, 2) or (B, N, 2) -> (B, N, 2) normalised source coordinates (the inverse of the augmentation).

    crop_box (B, 4) (x, y, w, h) in source pixels, flipped (B,) bool, source_size (B, 2) (W, H) of the decoded frame.
    """
    pts, box, size, flip = _geometry(points, crop_box, flipped, source_size, input_size)
    x = torch.where(flip, (input_size - 1) - pts[..., 0], pts[..., 0])  # undo the mirror first
    u = (box[:, None, 0] + (x + 0.5) * (box[:, None, 2] / input_size)) / size[:, None, 0]
    v = (box[:, None, 1] + (pts[..., 1] + 0.5) * (box[:, None, 3] / input_size)) / size[:, None, 1]
    return torch.stack([u, v.expand_as(u)], dim=-1)


def source_to_clip(points: Tensor, crop_box: Tensor, flipped: Tensor, source_size: Tensor,
                   input_size: int) -> Tensor:
    """Normalised source coordinates (N, 2) or (B, N, 2) -> (B, N, 2) clip pixels (the augmentation's geometry)."""
    pts, box, size, flip = _geometry(points, crop_box, flipped, source_size, input_size)
    x = (pts[..., 0] * size[:, None, 0] - box[:, None, 0]) * (input_size / box[:, None, 2]) - 0.5
    y = (pts[..., 1] * size[:, None, 1] - box[:, None, 1]) * (input_size / box[:, None, 3]) - 0.5
    x = torch.where(flip, (input_size - 1) - x, x)
    return torch.stack([x, y.expand_as(x)], dim=-1)


def _check_store(stored: Tensor, stored_vis: Tensor, store_grid: int) -> None:
    if stored.ndim != 4 or stored.shape[-1] != 2:
        raise ValueError(f"stored must be (B, T', P, 2), got {tuple(stored.shape)}")
    if store_grid < 2 or stored.shape[2] != store_grid * store_grid:
        raise ValueError(f"stored holds {stored.shape[2]} points per frame, not store_grid^2 = {store_grid}^2")
    if tuple(stored_vis.shape) != tuple(stored.shape[:3]):
        raise ValueError(f"stored_vis must be (B, T', P) = {tuple(stored.shape[:3])}, got {tuple(stored_vis.shape)}")


def _stencil(queries: Tensor, store_grid: int) -> tuple[Tensor, Tensor]:
    """Flat indices (B, N, 4) and bilinear weights (B, N, 4) of each query's stencil, order 00, 10, 01, 11 (x, y)."""
    g = (queries * store_grid - 0.5).clamp(0.0, store_grid - 1.0)  # border rule: clamp onto the hull
    low = g.floor().clamp(max=store_grid - 2.0)  # the last cell owns the far edge (weight 1 on its upper corner)
    w = g - low
    x0, y0 = low[..., 0].long(), low[..., 1].long()
    wx, wy = w[..., 0], w[..., 1]
    base = y0 * store_grid + x0
    index = torch.stack([base, base + 1, base + store_grid, base + store_grid + 1], dim=-1)
    weight = torch.stack([(1 - wx) * (1 - wy), wx * (1 - wy), (1 - wx) * wy, wx * wy], dim=-1)
    return index, weight


def _interpolate(stored: Tensor, stored_vis: Tensor, store_grid: int,
                 queries: Tensor) -> tuple[Tensor, Tensor]:
    """Interpolated displacements since frame 0 (B, T', N, 2) and the min-rule visibility (B, T', N)."""
    _check_store(stored, stored_vis, store_grid)
    batch, frames = stored.shape[:2]
    dtype = stored.dtype if stored.dtype == torch.float64 else torch.float32
    q = queries.to(device=stored.device, dtype=dtype)
    q = q.unsqueeze(0) if q.ndim == 2 else q
    if q.ndim != 3 or q.shape[-1] != 2 or q.shape[0] not in (1, batch):
        raise ValueError(f"queries must be (N, 2) or (B, N, 2) with B = {batch}, got {tuple(queries.shape)}")
    q = q.expand(batch, -1, -1)
    num = q.shape[1]
    index, weight = _stencil(q, store_grid)
    index = index.reshape(batch, 1, num * 4).expand(batch, frames, num * 4)
    stored = stored.to(dtype)
    disp = stored - stored[:, :1]  # displacements since the query frame
    corners = disp.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, 2)).reshape(batch, frames, num, 4, 2)
    moved = (corners * weight[:, None, :, :, None]).sum(dim=3)
    vis = stored_vis.to(dtype).gather(2, index).reshape(batch, frames, num, 4)
    # min over the stencil points that contribute: a zero weight's point (e.g. beyond the clamped border) is ignored
    vis = torch.where(weight[:, None] > 0, vis, torch.ones((), dtype=dtype, device=vis.device)).amin(dim=-1)
    return moved, vis


def remap_tracks(stored: Tensor, stored_vis: Tensor, store_grid: int, queries: Tensor) -> tuple[Tensor, Tensor]:
    """Tracks (B, T', N, 2) and visibility (B, T', N) of frame-0 queries (B, N, 2) (or (N, 2)), all normalised.

    stored (B, T', G*G, 2) normalised positions of the stored grid (frame 0 = the query frame), stored_vis
    (B, T', G*G). Bilinear interpolation of displacements, border clamp, min-rule visibility (module doc)."""
    moved, vis = _interpolate(stored, stored_vis, store_grid, queries)
    q = queries.to(device=moved.device, dtype=moved.dtype)
    q = q.unsqueeze(0) if q.ndim == 2 else q
    return q[:, None] + moved, vis


def remap_to_clip(stored: Tensor, stored_vis: Tensor, store_grid: int, clip_queries: Tensor, crop_box: Tensor,
                  flipped: Tensor, source_size: Tensor, input_size: int, *,
                  crop_visibility: bool = True) -> tuple[Tensor, Tensor]:
    """Tracks (B, T', N, 2) in clip pixels and visibility (B, T', N) of the clip's frame-0 queries (N, 2) or
    (B, N, 2) in clip pixels (e.g. `query_grid`): what a tracker run on the augmented clip would return.

    crop_box (B, 4), flipped (B,), source_size (B, 2) as in `clip_to_source`. With crop_visibility, a point outside
    the clip's frame at t is invisible there (module doc)."""
    _check_store(stored, stored_vis, store_grid)
    dtype = stored.dtype if stored.dtype == torch.float64 else torch.float32
    clip_q, box, size, flip = _geometry(clip_queries.to(device=stored.device, dtype=dtype), crop_box, flipped,
                                        source_size, input_size)
    source_q = clip_to_source(clip_q, crop_box, flipped, source_size, input_size)  # (B, N, 2)
    moved, vis = _interpolate(stored, stored_vis, store_grid, source_q)
    # source_to_clip is affine per clip: a normalised displacement maps through its diagonal Jacobian
    jx = size[:, 0] * input_size / box[:, 2]
    jx = torch.where(flip[:, 0], -jx, jx)
    jacobian = torch.stack([jx, size[:, 1] * input_size / box[:, 3]], dim=-1)  # (B, 2)
    tracks = clip_q[:, None] + moved * jacobian[:, None, None, :]
    if crop_visibility:
        inside = ((tracks >= -0.5) & (tracks <= input_size - 0.5)).all(dim=-1)
        vis = vis * inside.to(vis.dtype)
    return tracks, vis
