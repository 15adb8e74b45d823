"""CPU decoder throughput: OpenCV vs PyAV (vs decord when installed), on the synthetic VP9 set and on 224² files.

Measures, per decoder and thread setting, in one process:
  - sequential: every frame of each video in order (frames/s);
  - clips: VideoMAE clips (16 frames at rate 4 from a random offset), decoding only the needed span (clips/s and
    delivered frames/s), which is what a DataLoader worker does;
  - pipeline: VideoClipDataset samples (decode + multi-scale crop + resize), samples/s.
Test files are generated under a temporary folder (or --work-dir): a 224² H.264 clip and the same clip in VP9, both
`--long-frames` frames long, plus the synthetic set (cached in the default cache folder unless --synthetic-root).

    python bench/decode.py --out bench/results/decode.json
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

from trackmae_stream.data import VideoClipDataset, VideoRecord, open_video, sample_clip_indices  # noqa: E402
from trackmae_stream.data.synthetic import encode_video, ensure_synthetic_dataset, render_clip, sample_clip  # noqa: E402

CLIP_FRAMES, CLIP_RATE = 16, 4


def _decord_reader(path: Path, threads: int):
    import decord

    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads)


def _available_decoders() -> list[tuple[str, str, int]]:
    """(label, backend, threads): threads 1 is the DataLoader-worker setting, 0 lets the library choose."""
    rows = [("opencv", "opencv", 1), ("opencv (auto threads)", "opencv", 0), ("pyav", "pyav", 1),
            ("pyav (auto threads)", "pyav", 0)]
    try:  # decord is optional: measured only where it imports
        importlib.import_module("decord")
    except ImportError:
        return rows
    return rows + [("decord", "decord", 1), ("decord (auto threads)", "decord", 0)]


def _read(backend: str, threads: int, path: Path, indices: np.ndarray | None) -> int:
    """Decode `indices` (None: all frames) of one video; returns the number of frames delivered."""
    if backend == "decord":
        reader = _decord_reader(path, threads)
        wanted = list(range(len(reader))) if indices is None else indices.tolist()
        return int(reader.get_batch(wanted).shape[0])
    with open_video(path, backend, threads=threads) as reader:
        wanted = np.arange(reader.num_frames) if indices is None else indices
        return len(reader.read(wanted))


def _interleaved_best_rates(works: dict[str, Callable[[], int]], repeats: int) -> dict[str, float]:
    """Best items/s of each work() -> items over `repeats` rounds; every round runs all of them in turn, so that
    load from other processes on a shared machine hits every decoder alike."""
    best = {key: 0.0 for key in works}
    for _ in range(repeats):
        for key, work in works.items():
            start = time.perf_counter()
            items = work()
            best[key] = max(best[key], items / (time.perf_counter() - start))
    return best


def _make_long_videos(folder: Path, size: int, num_frames: int) -> dict[str, Path]:
    frames = render_clip(*sample_clip(np.random.default_rng(0), 0, size, num_frames))
    return {f"{size}² H.264 ({num_frames} fr)": encode_video(frames, folder / "long.mp4", "h264"),
            f"{size}² VP9 ({num_frames} fr)": encode_video(frames, folder / "long.webm", "vp9")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many interleaved rounds")
    parser.add_argument("--clips", type=int, default=40, help="clips per clip measurement")
    parser.add_argument("--long-size", type=int, default=224)
    parser.add_argument("--long-frames", type=int, default=300, help="K400 clips are ~300 frames")
    parser.add_argument("--synthetic-root", type=Path, help="default: the synthetic set's cache folder")
    parser.add_argument("--work-dir", type=Path, help="where to write the 224² files (default: a temp folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temp:
        work_dir = args.work_dir or Path(temp)
        work_dir.mkdir(parents=True, exist_ok=True)
        synthetic = ensure_synthetic_dataset(args.synthetic_root)
        long_videos = _make_long_videos(work_dir, args.long_size, args.long_frames)
        results = {"machine": platform.machine(), "python": platform.python_version(), "sequential": [],
                   "clips": [], "pipeline": []}

        sources = {f"synthetic VP9 {synthetic.size}² ({len(synthetic.videos)} x {synthetic.num_frames} fr)":
                   synthetic.videos}
        sources.update({name: [path] * max(1, 1200 // args.long_frames) for name, path in long_videos.items()})
        decoders = _available_decoders()
        for source, paths in sources.items():
            works = {label: (lambda b=backend, t=threads: sum(_read(b, t, p, None) for p in paths))
                     for label, backend, threads in decoders}
            for label, rate in _interleaved_best_rates(works, args.repeats).items():
                results["sequential"].append({"decoder": label, "source": source, "frames_per_s": round(rate)})

        for source, path in long_videos.items():
            with open_video(path) as reader:
                count = reader.num_frames
            rng = np.random.default_rng(0)
            clips = [sample_clip_indices(count, CLIP_FRAMES, CLIP_RATE, rng) for _ in range(args.clips)]
            works = {label: (lambda b=backend, t=threads: sum(_read(b, t, path, c) > 0 for c in clips))
                     for label, backend, threads in decoders}
            for label, rate in _interleaved_best_rates(works, args.repeats).items():
                results["clips"].append({"decoder": label, "source": source, "clips_per_s": round(rate, 1),
                                         "frames_per_s": round(rate * CLIP_FRAMES)})

        pipelines = (
            (f"synthetic {synthetic.size}², 8 fr x rate 2 -> 112²", [VideoRecord(p, 0) for p in synthetic.videos],
             dict(num_frames=8, sampling_rate=2, input_size=112)),
            (f"{args.long_size}² H.264, 16 fr x rate 4 -> 224²",
             [VideoRecord(next(iter(long_videos.values())), 0)] * args.clips,
             dict(num_frames=16, sampling_rate=4, input_size=224)))
        for source, records, clip in pipelines:
            datasets = {backend: VideoClipDataset(records, **clip, decoder=backend) for backend in ("opencv", "pyav")}
            works = {backend: (lambda d=dataset: sum(d[i]["frames"].shape[0] for i in range(len(d))))
                     for backend, dataset in datasets.items()}
            for backend, rate in _interleaved_best_rates(works, args.repeats).items():
                results["pipeline"].append({"decoder": backend, "source": source, "samples_per_s": round(rate, 1)})

    print_table(results["sequential"], [("decoder", "{}"), ("source", "{}"),
                                        ("frames_per_s", "{}", "sequential frames/s")])
    print()
    print_table(results["clips"], [("decoder", "{}"), ("source", "{}", "source (16 fr x rate 4 clips)"),
                                   ("clips_per_s", "{:.1f}", "clips/s"), ("frames_per_s", "{}", "frames/s")])
    print()
    print_table(results["pipeline"], [("decoder", "{}"), ("source", "{}", "VideoClipDataset samples"),
                                      ("samples_per_s", "{:.1f}", "samples/s")])
    if args.out:
        path = write_results(results, args.out, "decode.json")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
