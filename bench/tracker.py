"""Benchmark CoTracker3 as the trainer calls it: `CoTracker3Tracker.track_grid(frames, 14)` on 8-frame clips.

Grid: native 224x224 vs official 384x512, fp32 vs bf16 autocast, eager / torch.compile / CUDA graphs, iterations
(4, 6) and batch sizes (1, 8, 32; out-of-memory configurations are recorded as such; the compiled modes only at
`--compile-batch-sizes`, since every shape compiles anew). On CUDA it times with CUDA
events after warm-up; on CPU it runs one small shape (and says so). Prints a table with the analytic GFLOP per clip
(flops.py) and the achieved TFLOP/s, and writes JSON.

    python bench/tracker.py                       # -> bench/results/tracker_<device>.json
    python bench/tracker.py --batch-sizes 1 8 --modes eager graph --out /tmp/tracker.json
    python bench/tracker.py --batch-sizes 32 --configs official:fp32:eager:6 native:bf16:graph:4   # just these
"""
from __future__ import annotations

import argparse
import functools
import itertools
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, device_tag, median, print_table, synchronize, time_fn, write_results  # noqa: E402

from trackmae_stream.tracking.cotracker3 import CoTracker3Tracker  # noqa: E402
from trackmae_stream.tracking.cotracker3.flops import cotracker3_gflop  # noqa: E402
from trackmae_stream.tracking.cotracker3.predictor import resolve_resolution  # noqa: E402

MODES = {"eager": {}, "compile": {"compile": True}, "graph": {"cuda_graph": True},
         "compile+graph": {"compile": True, "cuda_graph": True}}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
RESOLUTIONS = ("native", "official")


def parse_setting(text: str) -> tuple[str, str, str, int]:
    """'native:bf16:graph:4' -> (resolution, dtype, mode, iters), for --configs."""
    parts = text.split(":")
    if (len(parts) != 4 or parts[0] not in RESOLUTIONS or parts[1] not in DTYPES or parts[2] not in MODES
            or not parts[3].isdigit() or int(parts[3]) < 1):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected RESOLUTION:DTYPE:MODE:ITERS with resolution in {RESOLUTIONS}, dtype in "
            f"{tuple(DTYPES)}, mode in {tuple(MODES)} and iters >= 1, e.g. native:bf16:graph:4")
    return parts[0], parts[1], parts[2], int(parts[3])


def run_config(resolution: str, dtype: str, mode: str, iters: int, batch: int, args, device: torch.device) -> dict:
    row = {"resolution": resolution, "dtype": dtype, "mode": mode, "iters": iters, "batch": batch}
    height, width = args.frame_size
    model_h, model_w = resolve_resolution(resolution, height, width)
    gflop = cotracker3_gflop(args.frames, args.grid ** 2, model_h, model_w, iters)
    row.update(model_size=f"{model_h}x{model_w}", gflop_per_clip=round(gflop.total, 2),
               gflop_breakdown={k: round(v, 2) for k, v in gflop.as_dict().items()})
    if device.type != "cuda" and MODES[mode].get("cuda_graph"):
        return {**row, "status": "skipped (CUDA graphs need CUDA)"}
    tracker = CoTracker3Tracker(None, iters=iters, resolution=resolution, amp_dtype=DTYPES[dtype],
                                **MODES[mode]).to(device).eval()
    frames = torch.rand(batch, args.frames, 3, height, width, generator=torch.Generator().manual_seed(0)) * 255
    frames = frames.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        compile_started = time.perf_counter()
        call = functools.partial(tracker.track_grid, frames, args.grid)
        call()  # compiles / captures outside the timed calls
        synchronize(device)
        first_call_s = time.perf_counter() - compile_started
        times = [1e3 * seconds for seconds in time_fn(call, device, warmup=args.warmup, repeats=args.repeats)]
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "status": "out of memory"}
    ms = median(times)
    row.update(status="ok", first_call_s=round(first_call_s, 2), ms_per_batch=round(ms, 3),
               ms_per_clip=round(ms / batch, 3), clips_per_s=round(1e3 * batch / ms, 1),
               achieved_tflops=round(gflop.total * batch / ms, 2),  # GFLOP / ms == TFLOP / s
               ms_min=round(min(times), 3), ms_max=round(max(times), 3))
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    del tracker, frames, call
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


TABLE_COLUMNS = [("model_size", "{}", "res"), ("dtype", "{}"), ("mode", "{}"), ("iters", "{}", "it"),
                 ("batch", "{}", "B"), ("gflop_per_clip", "{:.1f}", "GFLOP/clip"), ("ms_per_clip", "{:.2f}", "ms/clip"),
                 ("clips_per_s", "{:.1f}", "clips/s"), ("achieved_tflops", "{:.2f}", "TFLOP/s"),
                 ("peak_mem_gib", "{:.2f}", "mem GiB"), ("status", "{}")]


def build_parser() -> argparse.ArgumentParser:
    """The command line (bench/gpu_check.py --dry-run parses its planned arguments with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolutions", nargs="+", default=list(RESOLUTIONS), choices=RESOLUTIONS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=None, choices=list(MODES),
                        help="default: eager compile graph on CUDA, eager on CPU")
    parser.add_argument("--iters", nargs="+", type=int, default=[4, 6])
    parser.add_argument("--configs", nargs="+", type=parse_setting, default=None, metavar="RES:DTYPE:MODE:ITERS",
                        help="run exactly these settings (each at every --batch-sizes, compiled ones too) instead of "
                             "the grid of --resolutions x --dtypes x --modes x --iters")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default 1 8 32 (CUDA), 1 (CPU)")
    parser.add_argument("--compile-batch-sizes", nargs="+", type=int, default=[8],
                        help="batch sizes timed in the compile modes (each shape compiles anew, ~1 min on GPU)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--grid", type=int, default=None, help="grid side (default 14 on CUDA, 4 on CPU)")
    parser.add_argument("--frame-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="input frames (default 224 224 on CUDA, 64 64 on CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", help="JSON path (default bench/results/tracker_<device>.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    # The benchmark uses random weights on purpose (speed does not depend on them): skip the per-config warning.
    logging.getLogger("trackmae_stream.tracking.cotracker3.checkpoint").setLevel(logging.ERROR)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    small_cpu_shape = not on_cuda and args.frame_size is None
    args.modes = args.modes or (["eager", "compile", "graph"] if on_cuda else ["eager"])
    args.batch_sizes = args.batch_sizes or ([1, 8, 32] if on_cuda else [1])
    args.grid = args.grid or (14 if on_cuda else 4)
    args.frame_size = args.frame_size or ((224, 224) if on_cuda else (64, 64))
    args.warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 1)
    args.repeats = args.repeats if args.repeats is not None else (10 if on_cuda else 2)
    if on_cuda:
        # Timings for fp32 mean fp32: no TF32 in the matrix products or convolutions.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    if small_cpu_shape:
        print(f"CPU run: small shape ({args.frames} frames {args.frame_size[0]}x{args.frame_size[1]}, "
              f"{args.grid}x{args.grid} grid; 'official' resizes to 384x512) -- not the GPU configuration")

    if args.configs:
        settings = [(*setting, batch) for setting in args.configs for batch in args.batch_sizes]
    else:
        settings = [(resolution, dtype, mode, iters, batch) for resolution, dtype, mode, iters, batch
                in itertools.product(args.resolutions, args.dtypes, args.modes, args.iters, args.batch_sizes)
                if not (MODES[mode].get("compile") and batch not in args.compile_batch_sizes)]
    rows = []
    for resolution, dtype, mode, iters, batch in settings:
        row = run_config(resolution, dtype, mode, iters, batch, args, device)
        rows.append(row)
        print(f"  {row['model_size']} {dtype} {mode} iters={iters} B={batch}: "
              f"{row.get('ms_per_clip', float('nan')):.2f} ms/clip ({row['status']})", flush=True)
    print()
    print_table(rows, TABLE_COLUMNS)

    result = {"device": device_name(device), "python": sys.version.split()[0], "small_cpu_shape": small_cpu_shape,
              "frames": args.frames, "frame_size": list(args.frame_size), "queries": args.grid ** 2,
              "warmup": args.warmup, "repeats": args.repeats, "tf32": False, "results": rows}
    out = write_results(result, args.out, f"tracker_{device_tag(device)}.json")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
