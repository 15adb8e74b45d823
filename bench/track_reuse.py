"""What reusing tracks buys: training clips/s with free tracks, inline tracking, the track store (cold and warm) and
tracking on other ranks, measured in one run on one machine, per tracker.

Every variant is the same training run (data loading, the same model with its motion decoder, targets, masks); only
where the tracks come from changes:
  none        tracks cost nothing (the query grid held still: a baseline, not a method)
  inline      the tracker runs on every clip in the training process (tracker.placement=inline)
  store_cold  a fresh store: every (video, window) is tracked on first use and written (placement=store)
  store_warm  the store filled beforehand by `python -m trackmae_stream.tracks precompute` (placement=store)
  ranks       one extra torchrun rank decodes and tracks, the training rank trains (placement=ranks)
Printed and written: clips/s, ratio = clips/s of `none` ÷ clips/s of the variant (1.0 = tracking is free), the
tracker GFLOP per trained clip from the run log (CoTracker3's analytic count; Lucas-Kanade has no FLOP model).

  python bench/track_reuse.py                                  # CPU: Lucas-Kanade and CoTracker3 (random weights)
  python bench/track_reuse.py --trackers cotracker3 --preset throughput_vit_b   # GPU, ViT-B (see bench/README.md)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, device_name, device_tag, print_table  # noqa: E402

from trackmae_stream.config import load_config, tracker_grid_size  # noqa: E402
from trackmae_stream.engine import Trainer  # noqa: E402
from trackmae_stream.tracking import TrackerOutput, query_grid  # noqa: E402

VARIANTS = ("none", "inline", "store_cold", "store_warm", "ranks")
REPO = Path(__file__).resolve().parents[1]

# Small CPU shapes: a tiny ViT on 64² clips of 8 frames, so that a variant takes seconds, not minutes.
CPU_OVERRIDES = ["data.input_size=64", "data.num_frames=8", "data.sampling_rate=2", "data.synthetic_videos=96",
                 "data.synthetic_size=96", "data.synthetic_frames=24", "batch_size=4", "model.embed_dim=96",
                 "model.depth=2", "model.num_heads=3", "model.decoder_dim=64", "model.decoder_depth=1",
                 "model.decoder_heads=2", "optim.lr=1e-3", "optim.warmup_steps=1", "tracker.store_size=96",
                 "tracker.windows_per_video=2", "tracker.store_grid=16", "data.num_workers=1"]


class FreeTracks:
    """The `none` baseline's track source: every query point stays where it is, visible (costs nothing)."""

    def __init__(self, grid: int, grid_rule: str, slots: int):
        self.grid, self.grid_rule, self.slots = grid, grid_rule, slots
        self.stats = {"hits": 0, "misses": 0}

    def __call__(self, batch, frames_u8: torch.Tensor) -> TrackerOutput:
        b, _, h, w = frames_u8.shape[:4]
        points = query_grid(self.grid, h, w, self.grid_rule, device=frames_u8.device)
        tracks = points.expand(b, self.slots, -1, -1).contiguous()
        return TrackerOutput(tracks=tracks, visibility=torch.ones(tracks.shape[:3], device=tracks.device))


def run_variant(preset: str, overrides: list[str], steps: int, log_every: int, out_dir: Path,
                free: bool = False) -> dict:
    """Train `steps` steps in this process; clips/s = median over the log intervals after the first."""
    args = [*overrides, f"optim.max_steps={steps}", f"log_every={log_every}", "ckpt_every=1000000",
            "progress=false", "tensorboard=false", f"output_dir={out_dir}"]
    cfg = load_config(preset, args)
    trainer = Trainer(cfg)
    try:
        if free:
            trainer.preparer.track_source = FreeTracks(tracker_grid_size(cfg), trainer.tracker.grid_rule,
                                                       cfg.data.num_frames // cfg.model.tubelet_size)
        summary = trainer.train()
    finally:
        trainer.close()
    return summarize_log(summary.run_dir / "log.jsonl")


def summarize_log(path: Path) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    intervals = [r for r in records if "clips_per_s" in r][1:]  # the first interval holds start-up
    gflop = [r["tracker_gflop_per_clip"] for r in intervals if r.get("tracker_gflop_per_clip") is not None]
    return {"clips_per_s": statistics.median(r["clips_per_s"] for r in intervals),
            "tracker_gflop_per_clip": statistics.mean(gflop) if gflop else None,
            "store_hits": sum(r.get("store_hits", 0) for r in intervals),
            "store_misses": sum(r.get("store_misses", 0) for r in intervals)}


def run_ranks(preset: str, overrides: list[str], steps: int, log_every: int, out_dir: Path) -> dict:
    """One training rank and one tracking rank under torchrun (placement=ranks)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [*overrides, "tracker.placement=ranks", "tracker.tracking_ranks=1", f"optim.max_steps={steps}",
            f"log_every={log_every}", "ckpt_every=1000000", "progress=false", "tensorboard=false",
            f"output_dir={out_dir}", "run_name=ranks"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "trackmae_stream.train",
                           "--config", preset, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"placement=ranks run failed:\n{proc.stderr[-3000:]}")
    return summarize_log(out_dir / "ranks" / "log.jsonl")


def precompute_store(preset: str, overrides: list[str]) -> None:
    from trackmae_stream.distributed import init_distributed
    from trackmae_stream.tracks.precompute import precompute

    cfg = load_config(preset, overrides)
    summary = precompute(cfg, init_distributed(cfg.device), progress=False)
    if summary.failed:
        raise RuntimeError(f"precompute: {summary.failed} videos failed: {summary.failures[:3]}")


def bar_chart(results: dict, path: Path) -> None:
    """A PNG bar chart (OpenCV drawing: no plotting library needed): ratio per variant, one group per tracker."""
    trackers = list(results)
    width, height, margin = 900, 420, 60
    image = np.full((height, width, 3), 255, np.uint8)
    ratios = [results[t].get(f"ratio_{v}") for t in trackers for v in VARIANTS[1:]]
    top = max([r for r in ratios if r is not None] + [1.5]) * 1.1
    colors = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88)]
    group_w = (width - 2 * margin) / max(1, len(trackers))
    bar_w = group_w / (len(VARIANTS) + 1)
    y_of = lambda r: int(height - margin - (height - 2 * margin) * r / top)  # noqa: E731
    for level in (1.0, 1.25, 1.5):
        y = y_of(level)
        cv2.line(image, (margin, y), (width - margin, y), (200, 200, 200), 1)
        cv2.putText(image, f"{level:g}x", (8, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (90, 90, 90), 1, cv2.LINE_AA)
    for gi, tracker in enumerate(trackers):
        x0 = margin + gi * group_w
        cv2.putText(image, tracker, (int(x0 + bar_w), height - 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1,
                    cv2.LINE_AA)
        for vi, variant in enumerate(VARIANTS[1:]):
            ratio = results[tracker].get(f"ratio_{variant}")
            if ratio is None:
                continue
            x = int(x0 + (vi + 0.5) * bar_w)
            cv2.rectangle(image, (x, y_of(ratio)), (int(x + bar_w * 0.9), y_of(0)), colors[vi], -1)
            cv2.putText(image, f"{ratio:.2f}", (x, y_of(ratio) - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                        cv2.LINE_AA)
    for vi, variant in enumerate(VARIANTS[1:]):
        cv2.rectangle(image, (margin + vi * 170, 12), (margin + vi * 170 + 14, 26), colors[vi], -1)
        cv2.putText(image, variant, (margin + vi * 170 + 20, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)
    cv2.putText(image, "clips/s without tracking / clips/s with it (lower is better; 1 = free)", (margin, 50),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (60, 60, 60), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def tracker_overrides(name: str, workdir: Path) -> list[str]:
    if name == "lucas-kanade":
        return ["tracker.backend=lucas-kanade"]
    from trackmae_stream.tracking.cotracker3 import CoTrackerThreeOffline

    ckpt = workdir / "cotracker3_random.pth"
    if not ckpt.exists():
        torch.manual_seed(0)
        torch.save(CoTrackerThreeOffline().state_dict(), ckpt)
    return ["tracker.backend=cotracker3", f"tracker.checkpoint={ckpt}", "tracker.resolution=native",
            "tracker.iters=4"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--trackers", nargs="+", default=["lucas-kanade", "cotracker3"],
                        choices=["lucas-kanade", "cotracker3"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/track_reuse_<device>.json)")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every variant")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = (CPU_OVERRIDES if device.type == "cpu" else []) + list(args.overrides)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="track_reuse_") as tmp:
        tmp = Path(tmp)
        for tracker in args.trackers:
            common = base + tracker_overrides(tracker, tmp) + [f"data.synthetic_dir={tmp / 'synthetic'}"]
            row: dict = {}
            for variant in args.variants:
                out = tmp / tracker / variant
                store = f"tracker.store_path={tmp / tracker / (variant + '_store')}"
                if variant == "none":
                    row[variant] = run_variant(args.preset, common, args.steps, args.log_every, out, free=True)
                elif variant == "inline":
                    row[variant] = run_variant(args.preset, common, args.steps, args.log_every, out)
                elif variant == "store_cold":
                    row[variant] = run_variant(args.preset, [*common, "tracker.placement=store", store], args.steps,
                                               args.log_every, out)
                elif variant == "store_warm":
                    warm = [*common, "tracker.placement=store", store]
                    precompute_store(args.preset, warm)
                    row[variant] = run_variant(args.preset, warm, args.steps, args.log_every, out)
                else:
                    row[variant] = run_ranks(args.preset, common, args.steps, args.log_every, out)
                print(f"{tracker:>13} {variant:>10}: {row[variant]['clips_per_s']:.2f} clips/s", flush=True)
            free = row.get("none", {}).get("clips_per_s")
            for variant in VARIANTS[1:]:
                if variant in row and free:
                    row[f"ratio_{variant}"] = free / row[variant]["clips_per_s"]
            results[tracker] = row
    table = [{"tracker": t, "variant": v, "ratio": results[t].get(f"ratio_{v}", 1.0), **results[t][v]}
             for t in results for v in args.variants if v in results[t]]
    print_table(table, [("tracker", "{}"), ("variant", "{}"), ("clips_per_s", "{:.2f}", "clips/s"),
                        ("ratio", "{:.2f}"), ("tracker_gflop_per_clip", "{:.2f}", "tracker GFLOP/clip"),
                        ("store_hits", "{}", "store hits"), ("store_misses", "{}", "misses")])
    tag = device_tag(device)
    out = Path(args.out) if args.out else RESULTS_DIR / f"track_reuse_{tag}.json"
    payload = {"device": device_name(device), "preset": args.preset, "overrides": base, "steps": args.steps,
               "command": "python bench/track_reuse.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "trackers": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    bar_chart(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
