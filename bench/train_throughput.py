"""Training throughput and what the point tracker costs, measured in one run.

Phases (same model, batch and device):
  model      train steps on one prepared batch (no decode, no tracking): the ceiling, with MFU
  prepare    batch preparation alone: tracking + motion targets + masks + gathers
  serial     prepare then train, on one stream (the public code's arrangement)
  overlapped prepare batch i+1 on a side stream while training on batch i (this project's arrangement)
Ratios printed: tracker share of a serial step, overlap speed-up, overlapped throughput against the model ceiling.
Decoding is excluded (clips are random uint8 frames already on the device): bench/decode.py measures it.

  python bench/train_throughput.py --preset throughput_vit_b                  # GPU, ViT-B 16x224 batch 32
  python bench/train_throughput.py --preset default --steps 3 --warmup 1      # CPU smoke run, small shapes
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, device_tag, print_table, synchronize, write_results  # noqa: E402

from trackmae_stream.config import load_config  # noqa: E402
from trackmae_stream.engine import build_model, compute_losses  # noqa: E402
from trackmae_stream.metrics import IntervalTimer, peak_tflops  # noqa: E402
from trackmae_stream.model import forward_flops, resolve_backend  # noqa: E402
from trackmae_stream.optim import build_optimizer  # noqa: E402
from trackmae_stream.pipeline import StreamingPrefetcher, build_batch_preparer  # noqa: E402


def random_batches(cfg, device: torch.device, count: int):
    """`count` loader-style batches of random uint8 clips (pinned host memory on CUDA, like a DataLoader)."""
    b, t, s = cfg.batch_size, cfg.data.num_frames, cfg.data.input_size
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (b, t, s, s, 3), dtype=torch.uint8, generator=gen)
    if device.type == "cuda":
        base = base.pin_memory()
    return [{"frames": base} for _ in range(count)]


def build_parser() -> argparse.ArgumentParser:
    """The command line (bench/gpu_check.py --dry-run parses its planned arguments with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="throughput_vit_b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    cfg = load_config(args.preset, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        print("no CUDA device: running on CPU at the preset's shapes (use --preset default for a quick look)")

    preparer = build_batch_preparer(cfg, device)
    masks, tracker = preparer.masks, preparer.tracker
    model = build_model(cfg, preparer.targets).to(device)
    backend = resolve_backend(cfg.model.attention, device)
    model.set_attention_backend(backend)
    optimizer = build_optimizer(model, cfg.optim, 1e-4)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.precision == "bf16"
                else torch.autocast("cpu", enabled=False))

    def train_step(batch) -> None:
        with autocast:
            pred = model(batch.patches, batch.visible_idx, batch.masked_idx)
            loss = compute_losses(pred, batch, preparer.targets)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    n = args.warmup + args.steps
    host = random_batches(cfg, device, n + 1)
    fixed = preparer(host[0], 0)
    timer = IntervalTimer()

    def run(phase: str) -> float:
        synchronize(device)
        if phase == "model":
            for _ in range(args.warmup):
                train_step(fixed)
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(fixed)
        elif phase == "prepare":
            for i in range(args.warmup):
                preparer(host[i], i)
            synchronize(device)
            t0 = time.perf_counter()
            for i in range(args.steps):
                preparer(host[i], i)
        else:
            stream = torch.cuda.Stream(device) if phase == "overlapped" else None
            batches = StreamingPrefetcher(host, preparer, start_step=0, timer=timer, stream=stream)
            for _ in range(args.warmup):
                train_step(next(batches))
                batches.prefetch()  # as the trainer: after the step is launched
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(next(batches))
                batches.prefetch()
        synchronize(device)
        return (time.perf_counter() - t0) / args.steps

    phases = ["model", "prepare", "serial"] + (["overlapped"] if device.type == "cuda" else [])
    seconds = {p: run(p) for p in phases}
    flops = 3.0 * forward_flops(model.shape, masks.num_visible)
    peak = peak_tflops(device, cfg.peak_tflops)
    rows = []
    for phase, sec in seconds.items():
        row = {"phase": phase, "ms_per_step": sec * 1e3, "clips_per_s": cfg.batch_size / sec}
        if phase != "prepare" and peak:
            row["mfu"] = flops * cfg.batch_size / sec / (peak * 1e12)
        rows.append(row)
    print(f"device: {device_name(device)} | {cfg.model.arch} {cfg.data.num_frames}x{cfg.data.input_size}² batch "
          f"{cfg.batch_size} | attention {backend} | tracker {tracker.name if tracker else 'none'} | "
          f"{masks.num_visible} visible tokens | {flops / 1e9:.1f} train GFLOP/clip")
    print_table(rows, [("phase", "{}"), ("ms_per_step", "{:.1f}"), ("clips_per_s", "{:.1f}"), ("mfu", "{:.1%}")])
    ratios = {"tracker_share_of_serial_step": seconds["prepare"] / seconds["serial"],
              "serial_over_model": seconds["serial"] / seconds["model"]}
    if "overlapped" in seconds:
        ratios["overlap_speedup"] = seconds["serial"] / seconds["overlapped"]
        ratios["overlapped_over_model"] = seconds["overlapped"] / seconds["model"]
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    path = write_results({"device": device_name(device), "preset": args.preset, "overrides": args.overrides,
                          "batch_size": cfg.batch_size, "attention": backend,
                          "tracker": tracker.name if tracker else None, "train_gflop_per_clip": flops / 1e9,
                          "peak_tflops": peak, "phases": rows, "ratios": ratios},
                         args.out, f"train_{device_tag(device)}.json")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
