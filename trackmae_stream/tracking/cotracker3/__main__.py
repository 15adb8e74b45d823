"""Track points in a video file with CoTracker3.

    python -m trackmae_stream.tracking.cotracker3 VIDEO --weights PATH --grid 14 --out tracks.npz [--vis tracks.png]

Writes an .npz with tracks (T, N, 2) px, visibility (T, N) bool (the official rule), visibility_prob, confidence,
queries (N, 3) as (t, x, y) px, frame_indices (T,) of the decoded video, and `meta` (a JSON string).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..base import GRID_RULES
from .checkpoint import VARIANTS
from .predictor import CoTracker3Predictor


def read_video(path: str | Path, max_frames: int | None = None, frame_stride: int = 1) -> tuple[np.ndarray,
                                                                                              np.ndarray, float]:
    """Decode a video with PyAV: (frames (T, H, W, 3) uint8 RGB, frame_indices (T,), fps of the kept frames)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1; got {frame_stride}")
    frames, indices = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 25.0
        for index, frame in enumerate(container.decode(stream)):
            if index % frame_stride:
                continue
            frames.append(frame.to_ndarray(format="rgb24"))
            indices.append(index)
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"video {path} has no decodable frames")
    return np.stack(frames), np.asarray(indices, dtype=np.int64), fps / frame_stride


def read_queries(path: str | Path) -> np.ndarray:
    """(N, 3) queries (t, x, y) px from a .npy file or a text file with three columns."""
    path = Path(path)
    queries = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != 3:
        raise ValueError(f"queries file {path}: expected (N, 3) rows of (t, x, y); got shape {queries.shape}")
    return queries


def _parse_resolution(text: str) -> str | tuple[int, int]:
    if text in ("official", "native"):
        return text
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be 'official', 'native' or HxW; got {text!r}") from None
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trackmae_stream.tracking.cotracker3", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", help="input video file (anything PyAV decodes)")
    parser.add_argument("--weights", required=True, help="checkpoint path, URL, or 'official' (torch.hub cache)")
    parser.add_argument("--sha256", help="expected SHA-256 of the checkpoint file")
    parser.add_argument("--variant", choices=VARIANTS, default="offline")
    parser.add_argument("--out", required=True, help="output .npz")
    points = parser.add_mutually_exclusive_group()
    points.add_argument("--grid", type=int, default=10, help="G: track a G x G grid (default 10)")
    points.add_argument("--queries", help=".npy or text file of (t, x, y) rows, in pixels of the video")
    parser.add_argument("--grid-query-frame", type=int, default=0)
    parser.add_argument("--grid-rule", choices=GRID_RULES, default="cotracker")
    parser.add_argument("--backward", action="store_true", help="also track backward from the query frame")
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--resolution", type=_parse_resolution, default="official",
                        help="'official' (384x512), 'native' or HxW")
    parser.add_argument("--bf16", action="store_true", help="run the network under bf16 autocast")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--max-frames", type=int, help="decode at most this many frames")
    parser.add_argument("--frame-stride", type=int, default=1, help="keep every k-th frame")
    parser.add_argument("--vis", help="also save a visualisation: .png/.jpg image strip or .mp4/.webm/.gif video")
    parser.add_argument("--trail", type=int, default=8, help="frames of trajectory drawn behind each point")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    frames, frame_indices, fps = read_video(args.video, args.max_frames, args.frame_stride)
    n_frames, height, width = frames.shape[:3]
    predictor = CoTracker3Predictor.from_checkpoint(
        args.weights, args.variant, sha256=args.sha256, iters=args.iters, resolution=args.resolution,
        amp_dtype=torch.bfloat16 if args.bf16 else None).to(device)
    video = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2)[None].float()

    started = time.perf_counter()
    if args.queries:
        queries = torch.from_numpy(read_queries(args.queries))[None].to(device)
        prediction = predictor(video, queries=queries, backward_tracking=args.backward)
        queries_px = queries[0]
    else:
        prediction = predictor(video, grid_size=args.grid, grid_query_frame=args.grid_query_frame,
                               backward_tracking=args.backward, grid_rule=args.grid_rule)
        # The query point of each track is its (overwritten) position at the query frame.
        xy = prediction.tracks[0, args.grid_query_frame]
        queries_px = torch.cat([torch.full_like(xy[:, :1], float(args.grid_query_frame)), xy], dim=1)
    elapsed = time.perf_counter() - started

    result = {name: value[0].float().cpu().numpy() for name, value in prediction._asdict().items()}
    result["visibility"] = prediction.visibility[0].cpu().numpy()
    meta = {"video": str(args.video), "height": height, "width": width, "fps": fps, "variant": args.variant,
            "weights": str(args.weights), "iters": args.iters, "resolution": args.resolution,
            "bf16": args.bf16, "backward_tracking": args.backward, "seconds": elapsed}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **result, queries=queries_px.float().cpu().numpy(), frame_indices=frame_indices,
             meta=np.array(json.dumps(meta)))
    print(f"tracked {result['tracks'].shape[1]} points through {n_frames} frames ({height}x{width}) "
          f"in {elapsed:.2f} s on {device}; wrote {out}")
    if args.vis:
        from .visualize import save_visualization

        path = save_visualization(frames, result["tracks"], result["visibility"], args.vis, fps=fps,
                                  trail=args.trail)
        print(f"wrote the visualisation {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
