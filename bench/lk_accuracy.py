"""How good the weight-free Lucas-Kanade tracker is on the synthetic motion task, against its exact tracks.

  python bench/lk_accuracy.py --out bench/results/lk_accuracy_cpu.json

Clips as training cuts them (the default preset's clip: random window and multi-scale crop, 16 frames every 2nd,
112 px; one query point per token, the tracker's grid rule), tracked on the first frame of every tubelet exactly as
the trainer does; the reference is `tracker.backend=synthetic_gt` on the same clips (exact positions and visibility).
Reported: the per-step end-point error (the displacement the motion target is made of) over all points, over the
points LK calls visible (visibility >= 0.5 at both ends of the step, what target.drop_invisible keeps) and over those
the ground truth calls visible; how well LK's visibility flags the truly occluded or departed steps; and the
correlation of LK's motion target (official per-patch normalisation and none) with the exact one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trackmae_stream import kernels  # noqa: E402
from trackmae_stream.config import load_config, tokens_per_side, tracker_grid_size  # noqa: E402
from trackmae_stream.data import VideoClipDataset, ensure_synthetic_dataset, read_video_list  # noqa: E402
from trackmae_stream.tracking import build_tracker  # noqa: E402
from trackmae_stream.tracking.synthetic_gt import SyntheticTrackSource  # noqa: E402


def _stats(x: np.ndarray) -> dict:
    if x.size == 0:
        return {"n": 0}
    return {"n": int(x.size), "median": float(np.median(x)), "mean": float(x.mean()),
            "p90": float(np.percentile(x, 90)), "p99": float(np.percentile(x, 99))}


def _r2(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(1.0 - ((pred - ref) ** 2).sum() / max(((ref - ref.mean()) ** 2).sum(), 1e-12))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=96)
    parser.add_argument("--cache", default=None, help="synthetic set folder (default: the cache folder)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    cfg = load_config("default", args.overrides)
    d = cfg.data
    synthetic = ensure_synthetic_dataset(args.cache, num_videos=max(args.clips, d.synthetic_videos),
                                         size=d.synthetic_size, num_frames=d.synthetic_frames, task=d.synthetic_task)
    records = read_video_list(synthetic.list_file, synthetic.root)[: args.clips]
    dataset = VideoClipDataset(records, num_frames=d.num_frames, sampling_rate=d.sampling_rate,
                               input_size=d.input_size, scales=d.scales, seed=1)
    tubelet, grid = cfg.model.tubelet_size, tracker_grid_size(cfg)
    lk = build_tracker(cfg.tracker, torch.device("cpu"))
    exact = SyntheticTrackSource([str(r.path) for r in records], grid_size=grid, grid_rule=cfg.tracker.grid_rule,
                                 tubelet=tubelet, input_size=d.input_size, device=torch.device("cpu"))
    steps_lk, steps_gt, vis_lk, vis_gt, targets = [], [], [], [], {"patch": [], "none": []}
    start = time.perf_counter()
    for begin in range(0, len(records), 16):
        items = [dataset[i] for i in range(begin, min(begin + 16, len(records)))]
        batch = {k: torch.cat([it[k] for it in items]) for k in ("frames", "frame_indices", "crop_box", "flipped")}
        batch["source_index"] = torch.stack([it["source_index"] for it in items])
        frames = batch["frames"]
        truth = exact(batch, frames)
        found = lk.track_grid(frames[:, ::tubelet].permute(0, 1, 4, 2, 3).float(), grid)
        steps_lk.append(found.tracks.diff(dim=1).numpy())
        steps_gt.append(truth.tracks.diff(dim=1).numpy())
        vis_lk.append(np.minimum(found.visibility[:, 1:], found.visibility[:, :-1]).numpy())
        vis_gt.append(np.minimum(truth.visibility[:, 1:], truth.visibility[:, :-1]).numpy())
        for norm in targets:
            kw = dict(tokens_side=tokens_per_side(cfg), upsample=cfg.target.upsample, displacement="frame", norm=norm)
            targets[norm].append((kernels.motion_targets(found.tracks, **kw)[0].numpy(),
                                  kernels.motion_targets(truth.tracks, **kw)[0].numpy()))
    seconds = time.perf_counter() - start
    s_lk, s_gt = np.concatenate(steps_lk), np.concatenate(steps_gt)
    v_lk, v_gt = np.concatenate(vis_lk) >= 0.5, np.concatenate(vis_gt) >= 0.5
    epe = np.linalg.norm(s_lk - s_gt, axis=-1)
    occluded = ~v_gt
    result = {
        "clips": len(records), "clip": {"num_frames": d.num_frames, "sampling_rate": d.sampling_rate,
                                        "input_size": d.input_size, "grid": grid, "set": str(synthetic.root)},
        "true_step_px": _stats(np.linalg.norm(s_gt, axis=-1)),
        "epe_step_px": {"all": _stats(epe), "lk_visible": _stats(epe[v_lk]), "truly_visible": _stats(epe[v_gt]),
                        "truly_visible_and_lk_visible": _stats(epe[v_lk & v_gt])},
        "visibility": {"truly_occluded_share": float(occluded.mean()),
                       "lk_flags_occluded_recall": float((~v_lk)[occluded].mean()) if occluded.any() else None,
                       "lk_flags_visible_false_alarm": float((~v_lk)[~occluded].mean())},
        "motion_target_r2_vs_exact": {norm: _r2(np.concatenate([p for p, _ in pairs]).ravel(),
                                                np.concatenate([r for _, r in pairs]).ravel())
                                      for norm, pairs in targets.items()},
        "seconds": seconds,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
