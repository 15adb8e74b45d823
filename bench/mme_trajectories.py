"""How far tracker-made MME trajectory targets land from the official flow-made ones (SPEC §2.6).

Input: the closed-form flow of ../shared/reference/seed_methods/README.md (2 clips, 72 raw frames of 80 x 80, frame
indices s + 4i with s = 2, 5, crops (80, 80, 0, 0) and (70, 60, 8, 0), input size 64), computed here from its
formulas (and checked against the vectors' flow_px when that file is present). Targets compared, all through
`trackmae_stream.methods.mme`:

- official: integer grid tracking of the flow (T2) -> loader -> crop -> PatchStd (bit-exact with the vectors);
- recipe_ideal: the exact tracker recipe (`mme_dump_from_tracks`) fed by an ideal sub-pixel tracker (Euler steps,
  bilinear flow sampling) re-queried on MME's grid at every start frame: the best any tracker can do via SPEC §2.6;
- recipe_ideal_truncated: the same with each step truncated toward zero (MME's integer steps, not its integer path);
- project_requeried_raw_steps: `mme_trajectory_from_tracks` on per-slot windows (B, T', L+1, G², 2): the crop's
  8 x 8 cell-centre grid (2 x 2 points per token) queried anew at each tubelet's first frame f_2t and followed by
  the ideal tracker over the L raw frames to f_2t + 4 (needs the raw video, like MME);
- project_requeried_sampled_frames: the same grid and interval, but only the two sampled frames f_2t and f_2t+1
  (windows (B, T', 2, G², 2), L equal steps): what a tracker on the 16-frame clip with per-slot queries gives;
- project_format_single_query: the pipeline's track layout (B, T', G², 2): one such grid queried at the clip's
  first frame only, followed through the whole clip, positions at each tubelet's first frame (a tubelet-long
  interval, a grid that drifts with the scene).

An ideal tracker isolates the method gap (what a perfect tracker would still differ by); a real tracker adds its own
error on top. Differences are mean / max |dz| over the entries of tokens valid in both targets, leaving out the
official target's degenerate (zero-spread) groups (SPEC P5), plus the token-validity agreement.

Run: python bench/mme_trajectories.py [--out bench/results/mme_trajectories.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trackmae_stream.methods import mme  # noqa: E402

VECTORS = REPO.parent / "shared" / "reference" / "seed_methods" / "mme_vectors.npz"
STARTS = (2, 5)
CROPS = ((80, 80, 0, 0), (70, 60, 8, 0))
SIZE, RAW, SIDE, L = 64, 80, 80, 4


def closed_form_flow() -> np.ndarray:
    """README: flow_px (2, 71, 80, 80, 2), float64 formulas cast to float32."""
    t, y, x = np.meshgrid(np.arange(71.0), np.arange(80.0), np.arange(80.0), indexing="ij")
    u0 = 2.6 * np.sin(2 * np.pi * y / 40 + 0.2 * t) + 0.8 * np.cos(2 * np.pi * x / 26)
    v0 = 1.9 * np.cos(2 * np.pi * x / 32 - 0.15 * t) - 0.5 + 1.2 * np.sin(2 * np.pi * (x + y) / 50)
    omega = 0.06 * (1 + 0.5 * np.sin(0.1 * t))
    u1 = -omega * (y - 39.5) + 0.7 * np.sin(2 * np.pi * x / 17 + 0.3 * t)
    v1 = omega * (x - 39.5) - 1.3 * np.cos(2 * np.pi * y / 21)
    return np.stack([np.stack([u0, v0], -1), np.stack([u1, v1], -1)]).astype(np.float32)


def sample(field: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear flow at (x, y), clamped into the frame. field (H, W, 2) -> (P, 2)."""
    h, w = field.shape[:2]
    x, y = np.clip(x, 0, w - 1), np.clip(y, 0, h - 1)
    x0, y0 = np.minimum(np.floor(x).astype(int), w - 2), np.minimum(np.floor(y).astype(int), h - 2)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    return (field[y0, x0] * (1 - fx) * (1 - fy) + field[y0, x0 + 1] * fx * (1 - fy)
            + field[y0 + 1, x0] * (1 - fx) * fy + field[y0 + 1, x0 + 1] * fx * fy)


def recipe_tracks(flow: np.ndarray) -> np.ndarray:
    """Ideal tracker re-queried at every start frame on MME's grid: (B, S, L+1, 100, 2), going on from the clamped
    point like MME's own tracker."""
    batch, n_flow = flow.shape[:2]
    gy, gx = np.meshgrid(np.arange(10) * 8 + 4.0, np.arange(10) * 8 + 4.0, indexing="ij")
    out = np.zeros((batch, n_flow - L, L + 1, 100, 2))
    for b in range(batch):
        for s in range(n_flow - L):
            x, y = gx.ravel().copy(), gy.ravel().copy()
            out[b, s, 0] = np.stack([x, y], -1)
            for k in range(L):
                x, y = np.clip(x, 0, RAW - 1), np.clip(y, 0, RAW - 1)
                step = sample(flow[b, s + k], x, y)
                x, y = x + step[:, 0], y + step[:, 1]
                out[b, s, k + 1] = np.stack([x, y], -1)
    return out


def project_tracks(flow: np.ndarray, frame_inds: np.ndarray, tokens_side: int) -> np.ndarray:
    """The project's layout: one grid of (2 tokens_side)^2 points at the centres of the crop's 8 px cells, queried
    at the clip's first frame, followed through every raw frame; positions at each tubelet's first frame, in crop
    pixels. (B, T', G², 2)."""
    side = 2 * tokens_side
    centres = (np.arange(side) + 0.5) * SIZE / side - 0.5
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    out = np.zeros((flow.shape[0], frame_inds.shape[1] // 2, side * side, 2))
    for b, (cw, ch, ow, oh) in enumerate(CROPS):
        sx, sy = cw / SIZE, ch / SIZE
        x = (cx.ravel() + 0.5) * sx - 0.5 + ow  # crop pixel -> original pixel (pixel-centre resize)
        y = (cy.ravel() + 0.5) * sy - 0.5 + oh
        wanted = {int(f): t for t, f in enumerate(frame_inds[b, ::2])}
        for frame in range(int(frame_inds[b, 0]), int(frame_inds[b, -2]) + 1):
            if frame in wanted:
                out[b, wanted[frame]] = np.stack([(x - ow + 0.5) / sx - 0.5, (y - oh + 0.5) / sy - 0.5], -1)
            step = sample(flow[b, frame], x, y)
            x, y = x + step[:, 0], y + step[:, 1]
    return out


def requeried_windows(flow: np.ndarray, frame_inds: np.ndarray, tokens_side: int, raw_steps: bool) -> np.ndarray:
    """Per-slot windows (B, T', K+1, G², 2) in crop pixels: the crop's cell-centre grid queried anew at each
    tubelet's first frame f_2t and followed to its second frame f_2t+1 = f_2t + 4 (MME's interval); positions at
    the L+1 raw frames (raw_steps, K = L) or at the two sampled frames only (K = 1)."""
    side = 2 * tokens_side
    centres = (np.arange(side) + 0.5) * SIZE / side - 0.5
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    keep = list(range(L + 1)) if raw_steps else [0, L]
    out = np.zeros((flow.shape[0], frame_inds.shape[1] // 2, len(keep), side * side, 2))
    for b, (cw, ch, ow, oh) in enumerate(CROPS):
        sx, sy = cw / SIZE, ch / SIZE
        for t in range(frame_inds.shape[1] // 2):
            x, y = (cx.ravel() + 0.5) * sx - 0.5 + ow, (cy.ravel() + 0.5) * sy - 0.5 + oh
            first = int(frame_inds[b, 2 * t])
            for k in range(L + 1):
                if k in keep:
                    out[b, t, keep.index(k)] = np.stack([(x - ow + 0.5) / sx - 0.5, (y - oh + 0.5) / sy - 0.5], -1)
                if k < L:
                    step = sample(flow[b, first + k], x, y)
                    x, y = x + step[:, 0], y + step[:, 1]
    return out


def official_pipeline(disp, valid, frame_inds):
    loader = mme.mme_loader_slice(disp, valid, torch.from_numpy(frame_inds))
    cropped = mme.mme_crop_resize(loader, CROPS, SIZE // 8)
    target, token_valid = mme.mme_trajectory_target(cropped)
    tokens, _ = mme.mme_trajectory_tokens(cropped)
    spread = tokens.amax(-1) - tokens.amin(-1)  # (B, N, 2, L)
    degenerate = (spread == 0).unsqueeze(-1).expand(-1, -1, -1, -1, 4).reshape(target.shape)
    return target, token_valid, degenerate


def compare(name, ref, ref_valid, degenerate, other, other_valid) -> dict:
    both = (ref_valid & other_valid).unsqueeze(-1).expand_as(ref) & ~degenerate
    diff = (other - ref).abs()[both]
    return dict(target=name, mean_abs_dz=round(float(diff.mean()), 4), max_abs_dz=round(float(diff.max()), 4),
                median_abs_dz=round(float(diff.median()), 4), entries_compared=int(both.sum()),
                token_validity_agreement=round(float((ref_valid == other_valid).float().mean()), 4),
                tokens_valid=int(other_valid.sum()), tokens_valid_official=int(ref_valid.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "mme_trajectories.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    flow32 = closed_form_flow()
    checked = None
    if VECTORS.exists():
        with np.load(VECTORS) as vec:
            checked = float(np.abs(vec["flow_px"] - flow32).max())
    frame_inds = np.array([[s + 4 * i for i in range(16)] for s in STARTS])
    flow = flow32.astype(np.float64)

    disp, valid = mme.mme_track_flow(torch.from_numpy(flow32))
    official, official_valid, degenerate = official_pipeline(disp, valid, frame_inds)
    results = []
    tracks = torch.from_numpy(recipe_tracks(flow)).float()
    for name, truncate in (("recipe_ideal", False), ("recipe_ideal_truncated", True)):
        d, v = mme.mme_dump_from_tracks(tracks, frame_size=(RAW, SIDE), truncate=truncate)
        target, token_valid, _ = official_pipeline(d, v, frame_inds)
        results.append(compare(name, official, official_valid, degenerate, target, token_valid))
    for name, raw_steps in (("project_requeried_raw_steps", True), ("project_requeried_sampled_frames", False)):
        windows = torch.from_numpy(requeried_windows(flow, frame_inds, SIZE // 16, raw_steps)).float()
        target, token_valid = mme.mme_trajectory_from_tracks(windows, tokens_side=SIZE // 16,
                                                             frame_size=(SIZE, SIZE))
        results.append(compare(name, official, official_valid, degenerate, target, token_valid))
    proj = torch.from_numpy(project_tracks(flow, frame_inds, SIZE // 16)).float()
    target, token_valid = mme.mme_trajectory_from_tracks(proj, tokens_side=SIZE // 16, frame_size=(SIZE, SIZE))
    results.append(compare("project_format_single_query", official, official_valid, degenerate, target,
                           token_valid))
    results[-1]["mean_grid_drift_px_at_last_slot"] = round(float((proj[:, -1] - proj[:, 0]).norm(dim=-1).mean()), 1)
    # scale of the numbers: |z| <= 1.5; two independent random targets of this kind differ by about
    g = torch.Generator().manual_seed(0)
    shuffled = official[:, torch.randperm(official.shape[1], generator=g)]
    results.append(compare("official_tokens_shuffled (chance level)", official, official_valid, degenerate, shuffled,
                           official_valid))
    report = dict(
        what="mean/max |dz| between MME's official flow-made trajectory target and tracker-made ones "
             "(ideal sub-pixel tracker on the same flow)",
        input="README closed-form flow, 2 clips, 80x80 raw, 64 px crops, 8x4x4 tokens, L=4",
        flow_max_abs_diff_vs_vectors=checked,
        official_target_abs_mean=round(float(official.abs()[~degenerate].mean()), 4),
        flow_mean_speed_px_per_raw_frame=round(float(np.linalg.norm(flow, axis=-1).mean()), 2),
        results=results,
        command="python bench/mme_trajectories.py",
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
