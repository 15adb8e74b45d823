"""Cost of the Lucas-Kanade fallback tracker per batch, by shape, window and device (JSON output).

  python bench/lk.py                                   # CPU: small shapes
  python bench/lk.py --batch 32 --frames 16 --size 224 # GPU: a ViT-B batch (8 tracked frames at the official setting)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, device_tag, median, print_table, time_fn, write_results  # noqa: E402

from trackmae_stream.tracking.lucas_kanade import LucasKanadeTracker  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--grid", type=int, default=14)
    parser.add_argument("--windows", type=int, nargs="+", default=[15, 21])
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # on a shared machine, 1 thread gives steadier CPU numbers
    generator = torch.Generator().manual_seed(0)
    frames = (torch.rand(args.batch, args.frames, 3, args.size, args.size, generator=generator) * 255).to(device)
    rows = []
    for window in args.windows:
        tracker = LucasKanadeTracker(window=window, levels=args.levels, iters=args.iters).to(device)
        with torch.no_grad():
            seconds = median(time_fn(lambda: tracker.track_grid(frames, args.grid), device, warmup=1,
                                     repeats=args.repeats))
        rows.append({"window": window, "levels_used": tracker.num_levels(args.size, args.size),
                     "ms_per_batch": 1e3 * seconds, "clips_per_s": args.batch / seconds})
    print(f"LK | batch {args.batch} x {args.frames} frames x {args.size}px | grid {args.grid}^2 | iters {args.iters} "
          f"| {device_name(device)}")
    print_table(rows, [("window", "{}"), ("levels_used", "{}"), ("ms_per_batch", "{:.1f}"), ("clips_per_s", "{:.1f}")])
    path = write_results({"device": device_name(device), "args": vars(args), "results": rows}, args.out,
                         f"lk_{device_tag(device)}.json")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
