"""Clip loading throughput: the DALI loader (CPU and GPU backends) against the CPU DataLoader, same clips.

Every loader yields the same batches (same list, seed, temporal sampling, multi-scale crop and resize); rates count
delivered clips and delivered frames (B x T per batch), after `--warmup` untimed batches. GPU batches are synchronised
before the clock stops. Videos: `--list` (a VideoMAE list), else the synthetic set generated at `--video-size` with
`--codec` (VP9 by default: the only family DALI's CPU backend decodes; H.264 for NVDEC).

  python bench/dali_decode.py                                  # CPU machine: DALI cpu vs OpenCV/PyAV workers
  python bench/dali_decode.py --codec h264 --loaders dali-gpu cpu-opencv --video-size 224 --batch-size 16
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, device_tag, print_table, synchronize, write_results  # noqa: E402

from trackmae_stream.data import VideoClipDataset, build_pretrain_loader, read_video_list  # noqa: E402
from trackmae_stream.data.synthetic import default_cache_dir, ensure_synthetic_dataset  # noqa: E402

LOADERS = ("cpu-opencv", "cpu-pyav", "dali-cpu", "dali-gpu")


def build(kind: str, records, args):
    common = dict(num_frames=args.num_frames, sampling_rate=args.sampling_rate, input_size=args.input_size,
                  seed=0)
    if kind.startswith("dali"):
        from trackmae_stream.data.dali import build_dali_loader
        return build_dali_loader(records, batch_size=args.batch_size, device=kind.split("-")[1],
                                 num_threads=args.threads, prefetch=args.prefetch, **common)
    dataset = VideoClipDataset(records, decoder=kind.split("-")[1], **common)
    # Spawned workers: a forked child inherits whatever locks the parent's thread pools (OpenCV's during synthetic-set
    # generation, DALI's) held at fork time; a fork after them hung here.
    return build_pretrain_loader(dataset, batch_size=args.batch_size, num_workers=args.threads,
                                 multiprocessing_context="spawn" if args.threads > 0 else None)


def measure(loader, args) -> dict:
    """Seconds for `--batches` batches after `--warmup`, cycling epochs as needed.

    Epochs are always run to their end (untimed past the last measured batch): abandoning a CPU loader mid-epoch and
    closing it kills workers inside PyAV, which aborts them.
    """
    needed, done, epoch, start, seconds = args.warmup + args.batches, 0, 0, None, None
    while done < needed:
        loader.set_epoch(epoch)
        for batch in loader:
            synchronize(batch["frames"].device)
            done += 1
            if done == args.warmup:
                start = time.perf_counter()
            if done == needed:
                seconds = time.perf_counter() - start
        epoch += 1
    clips = args.batches * args.batch_size
    return {"seconds": seconds, "clips_per_s": clips / seconds, "frames_per_s": clips * args.num_frames / seconds}


def build_parser() -> argparse.ArgumentParser:
    """The command line (bench/gpu_check.py --dry-run parses its planned arguments with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", default=None, help="VideoMAE list file (default: the synthetic set)")
    parser.add_argument("--codec", default="vp9", choices=("vp9", "h264"))
    parser.add_argument("--video-size", type=int, default=128)
    parser.add_argument("--video-frames", type=int, default=64)
    parser.add_argument("--num-videos", type=int, default=32)
    parser.add_argument("--loaders", nargs="+", default=None, choices=LOADERS,
                        help="default: every loader that can run here (dali-gpu needs CUDA; dali-cpu needs VP9)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--sampling-rate", type=int, default=2)
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads / DataLoader workers")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    if args.list:
        records, source = read_video_list(args.list), args.list
    else:
        root = default_cache_dir() / f"bench-{args.codec}-{args.video_size}-{args.video_frames}-{args.num_videos}"
        dataset = ensure_synthetic_dataset(root, num_videos=args.num_videos, size=args.video_size,
                                           num_frames=args.video_frames, codec=args.codec, val_fraction=0.0)
        records, source = read_video_list(dataset.list_file), f"synthetic {args.codec} {args.video_size}px"
    loaders = args.loaders or [kind for kind in LOADERS
                               if not (kind == "dali-gpu" and not torch.cuda.is_available())
                               and not (kind == "dali-cpu" and args.codec == "h264")]
    device = torch.device("cuda" if "dali-gpu" in loaders else "cpu")

    rows = []
    for kind in loaders:
        loader = build(kind, records, args)
        rows.append({"loader": kind, **measure(loader, args)})
        if hasattr(loader, "close"):  # stop the CPU loader's persistent workers before timing the next loader
            loader.close()
        del loader
    print(f"{source} | {len(records)} videos | batch {args.batch_size} x {args.num_frames} frames at rate "
          f"{args.sampling_rate} -> {args.input_size}px | threads {args.threads} | {device_name(device)}")
    print_table(rows, [("loader", "{}"), ("clips_per_s", "{:.1f}"), ("frames_per_s", "{:.0f}"),
                       ("seconds", "{:.2f}")])
    path = write_results({"device": device_name(device), "source": source, "videos": len(records),
                          "args": vars(args), "results": rows}, args.out,
                         f"dali_decode_{args.codec}_{device_tag(device)}.json")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
