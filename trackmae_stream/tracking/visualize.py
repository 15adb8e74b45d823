"""Draw point tracks on video frames (any tracker's), save them as an image sheet or a video; and the command line

    python -m trackmae_stream.tracking.visualize VIDEO --out OUT.mp4|OUT.png [--tracker auto|lucas-kanade|cotracker3]
        [--checkpoint PATH] [--grid 14] [--frames 16] [--start 0] [--stride 2] [--size 224]

which decodes frames start, start + stride, ... with the project's decoder, tracks a G x G grid of frame-0 points with
the tracker the trainer would build (`tracking.build_tracker`; Lucas-Kanade needs no weights) and draws the tracks:
one colour per point (a rainbow in grid order), a tail over the last frames that fades with age, the current point
filled where the tracker's visibility is >= 0.5 and hollow where it is below. `.png`/`.jpg` gives a contact sheet of
the frames, a video suffix a video.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from ..errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_CODECS = {".mp4": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9", ".gif": "gif"}


def track_colors(num_tracks: int) -> np.ndarray:
    """(N, 3) uint8 RGB colours along a rainbow, in query order (a row-major grid reads as bands of colour)."""
    ramp = np.linspace(0, 255, max(num_tracks, 1)).astype(np.uint8).reshape(-1, 1)
    bgr = cv2.applyColorMap(ramp, cv2.COLORMAP_RAINBOW).reshape(-1, 3)
    return bgr[:num_tracks, ::-1].copy()


def draw_tracks(frames: np.ndarray, tracks: np.ndarray, visibility: np.ndarray | None = None, trail: int = 8,
                radius: int | None = None, visibility_threshold: float = 0.5) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 RGB with each track's recent path and current point drawn on a copy.

    tracks (T, N, 2) as (x, y) px; visibility (T, N) bool or a score in [0, 1] (None = all visible). The tail covers
    the last `trail` frames, each segment blended more weakly the older it is; points are filled discs where
    visibility >= `visibility_threshold`, hollow circles below it. Non-finite positions are not drawn.
    """
    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8; got {frames.shape} {frames.dtype}")
    n_frames, height, width = frames.shape[:3]
    tracks = np.asarray(tracks)
    if tracks.ndim != 3 or tracks.shape[0] != n_frames or tracks.shape[2] != 2:
        raise ValueError(f"tracks must be (T={n_frames}, N, 2); got {tracks.shape}")
    visible = (np.ones(tracks.shape[:2], dtype=bool) if visibility is None
               else np.asarray(visibility, dtype=np.float64) >= visibility_threshold)
    if visible.shape != tracks.shape[:2]:
        raise ValueError(f"visibility must be (T, N) = {tracks.shape[:2]}; got {visible.shape}")
    radius = radius or max(2, round(min(height, width) / 100))  # >= 2: a hollow circle of radius 1 looks filled
    colors = [tuple(int(c) for c in rgb) for rgb in track_colors(tracks.shape[1])]
    finite = np.isfinite(tracks).all(-1)
    # cv2 draws with integer coordinates; 4 fractional bits give sub-pixel placement.
    shift = 4
    fixed = np.round(np.nan_to_num(tracks) * (1 << shift)).astype(np.int32)
    out = frames.copy()
    for t in range(n_frames):
        canvas = out[t]
        # Oldest segment first, each on its own overlay blended with weight (trail - age) / trail: a fading tail.
        for age in range(min(trail, t) - 1, -1, -1):
            j = t - 1 - age  # the segment from frame j to j + 1
            alpha = (trail - age) / trail
            layer = canvas.copy() if alpha < 1 else canvas
            for n, color in enumerate(colors):
                if finite[j, n] and finite[j + 1, n]:
                    cv2.line(layer, tuple(fixed[j, n].tolist()), tuple(fixed[j + 1, n].tolist()), color, 1,
                             cv2.LINE_AA, shift)
            if layer is not canvas:
                cv2.addWeighted(layer, alpha, canvas, 1.0 - alpha, 0.0, dst=canvas)
        for n, color in enumerate(colors):
            if finite[t, n]:
                cv2.circle(canvas, tuple(fixed[t, n].tolist()), radius << shift, color, -1 if visible[t, n] else 1,
                           cv2.LINE_AA, shift)
    return out


def image_strip(frames: np.ndarray, max_frames: int = 8, columns: int | None = None) -> np.ndarray:
    """Up to `max_frames` evenly spaced frames as a contact sheet, row by row, `columns` per row (None: one row):
    (rows * H, columns * W, 3); cells after the last frame stay black."""
    picks = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
    columns = len(picks) if columns is None else max(1, min(columns, len(picks)))
    rows = -(-len(picks) // columns)
    height, width = frames.shape[1:3]
    sheet = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for k, i in enumerate(picks):
        r, c = divmod(k, columns)
        sheet[r * height:(r + 1) * height, c * width:(c + 1) * width] = frames[i]
    return sheet


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: float = 10.0) -> None:
    """Encode (T, H, W, 3) uint8 RGB frames; the codec follows the suffix (VIDEO_CODECS), encoded with PyAV. Without
    PyAV (the GPU image has none), .mp4 falls back to OpenCV's MPEG-4 Part 2 writer (mp4v)."""
    path = Path(path)
    codec = VIDEO_CODECS.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"{path}: unsupported video suffix; use one of {sorted(VIDEO_CODECS)}")
    try:
        import av  # imported here: only the video output needs it
    except ImportError:
        if path.suffix.lower() != ".mp4":
            raise ImportError(f"{path}: writing {path.suffix} needs PyAV (pip install av); without it only .mp4 "
                              f"(OpenCV) is available") from None
        _write_video_opencv(frames, path, fps)
        return
    height, width = frames.shape[1:3]
    if codec != "gif":  # yuv420p needs even sizes
        frames = frames[:, : height - height % 2, : width - width % 2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=max(1, round(fps)))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_video_opencv(frames: np.ndarray, path: Path, fps: float) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps),
                             (frames.shape[2], frames.shape[1]))
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot open an mp4v video writer")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def save_visualization(frames: np.ndarray, tracks: np.ndarray, visibility: np.ndarray | None,
                       path: str | os.PathLike, fps: float = 10.0, trail: int = 8, max_strip_frames: int = 8,
                       columns: int | None = None) -> Path:
    """Draw the tracks and save: an image suffix gives a contact sheet (`image_strip`), a video suffix a video.
    Returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES and suffix not in VIDEO_CODECS:
        raise ValueError(f"{path}: unknown visualisation suffix; use one of "
                         f"{sorted(IMAGE_SUFFIXES + tuple(VIDEO_CODECS))}")
    drawn = draw_tracks(frames, tracks, visibility, trail=trail)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in IMAGE_SUFFIXES:
        sheet = image_strip(drawn, max_strip_frames, columns)
        if not cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write the image {path}")
    else:
        write_video(drawn, path, fps)
    return path


# ------------------------------------------------------------------------------------------------ command line

class CommandLineError(UserError, ValueError):
    """A bad argument or input clip: `main` prints it as one `error:` line and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise CommandLineError(message)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from ..data.decode import DECODERS, DEFAULT_DECODER
    from .base import GRID_RULES

    parser = _Parser(prog="python -m trackmae_stream.tracking.visualize", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", help="input video file")
    parser.add_argument("--out", required=True,
                        help="output: .png/.jpg contact sheet, or .mp4/.mkv/.webm/.gif video")
    parser.add_argument("--tracker", choices=("auto", "lucas-kanade", "cotracker3"), default="auto",
                        help="auto (default): cotracker3 with --checkpoint, else lucas-kanade (no weights)")
    parser.add_argument("--checkpoint", help="CoTracker3 weights: a local file or 'official' (torch.hub download)")
    parser.add_argument("--grid", type=_positive, default=14, help="G: track a G x G grid of frame-0 points")
    parser.add_argument("--grid-rule", choices=GRID_RULES, default="cotracker")
    parser.add_argument("--frames", type=_positive, default=16, help="frames to decode (at least 2)")
    parser.add_argument("--start", type=int, default=0, help="index of the first frame")
    parser.add_argument("--stride", type=_positive, default=2, help="keep every k-th frame from --start")
    parser.add_argument("--size", type=int, default=224,
                        help="centre-crop to a square and resize to SIZE x SIZE, as the trainer's clips (0: as is)")
    parser.add_argument("--decoder", choices=DECODERS, default=DEFAULT_DECODER)
    parser.add_argument("--resolution", choices=("official", "native"), default="official",
                        help="CoTracker3: track at 384x512 (official) or at the frames' size")
    parser.add_argument("--iters", type=_positive, default=6, help="CoTracker3 update iterations")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--trail", type=int, default=8, help="frames of fading tail behind each point")
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate of a video output")
    parser.add_argument("--columns", type=_positive, default=8, help="frames per row of a contact sheet")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    suffix = Path(args.out).suffix.lower()
    if suffix not in IMAGE_SUFFIXES and suffix not in VIDEO_CODECS:
        raise CommandLineError(f"--out {args.out}: unknown suffix; use one of "
                               f"{sorted(IMAGE_SUFFIXES + tuple(VIDEO_CODECS))}")
    if args.grid < 2:
        raise CommandLineError(f"--grid {args.grid}: must be >= 2")
    if args.frames < 2:
        raise CommandLineError(f"--frames {args.frames}: tracking needs at least 2 frames")
    if args.start < 0:
        raise CommandLineError(f"--start {args.start}: must be >= 0")
    if args.size < 0 or 0 < args.size < 8:
        raise CommandLineError(f"--size {args.size}: must be 0 (keep) or >= 8")
    if args.trail < 0 or not args.fps > 0:
        raise CommandLineError("--trail must be >= 0 and --fps > 0")
    if args.tracker == "auto":
        args.tracker = "cotracker3" if args.checkpoint else "lucas-kanade"
    if args.tracker == "cotracker3":
        if not args.checkpoint:
            raise CommandLineError("--tracker cotracker3 needs --checkpoint PATH (or 'official')")
        remote = args.checkpoint == "official" or args.checkpoint.startswith(("http://", "https://"))
        if not remote and not Path(args.checkpoint).expanduser().is_file():
            raise CommandLineError(f"--checkpoint {args.checkpoint}: no such file")
    elif args.checkpoint:
        raise CommandLineError(f"--checkpoint is for --tracker cotracker3, not {args.tracker}")
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise CommandLineError(f"--device {args.device}: not a device (e.g. cpu, cuda, cuda:1)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CommandLineError(f"--device {args.device}: CUDA is not available here")


def read_frames(path: str | os.PathLike, *, frames: int, start: int = 0, stride: int = 1, size: int = 0,
                decoder: str = "opencv") -> np.ndarray:
    """uint8 (T, H, W, 3) RGB frames start, start + stride, ... (at most `frames`, those the video has), optionally
    centre-cropped to a square and resized to size x size. Raises VideoDecodeError for a missing/unreadable video
    and CommandLineError when fewer than 2 frames remain."""
    from ..data.decode import open_video
    from ..data.transforms import CropBox, crop_resize_flip

    with open_video(path, decoder) as reader:
        available = reader.num_frames
        indices = start + stride * np.arange(frames)
        indices = indices[indices < available]
        if len(indices) < 2:
            raise CommandLineError(f"{path}: the video has {available} frames; --start {start} --stride {stride} "
                                   f"leaves {len(indices)} (tracking needs 2)")
        clip = reader.read(indices)
    if size:
        height, width = clip.shape[1:3]
        side = min(height, width)
        box = CropBox(x=(width - side) // 2, y=(height - side) // 2, width=side, height=side)
        clip = crop_resize_flip(clip, box, size)
    return clip


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2 with one `error:` line on stderr for bad input)."""
    from ..config import TrackerConfig
    from . import build_tracker

    try:
        args = build_parser().parse_args(argv)
        _check_args(args)
        clip = read_frames(args.video, frames=args.frames, start=args.start, stride=args.stride, size=args.size,
                           decoder=args.decoder)
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                              else args.device)
        cfg = TrackerConfig(backend=args.tracker, checkpoint=args.checkpoint, grid_size=args.grid,
                            grid_rule=args.grid_rule, iters=args.iters, resolution=args.resolution)
        tracker = build_tracker(cfg, device)
    except UserError as error:  # a bad argument, video or checkpoint: the message names it
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    started = time.perf_counter()
    frames = torch.from_numpy(clip).to(device).permute(0, 3, 1, 2)[None].float()  # (1, T, 3, H, W) in [0, 255]
    output = tracker.track_grid(frames, args.grid)
    tracks = output.tracks[0].float().cpu().numpy()
    visibility = output.visibility[0].float().cpu().numpy()
    elapsed = time.perf_counter() - started
    try:
        path = save_visualization(clip, tracks, visibility, args.out, fps=args.fps, trail=args.trail,
                                  max_strip_frames=len(clip), columns=args.columns)
    except (OSError, ImportError) as error:  # an unwritable --out, or a video suffix that needs PyAV
        print(f"error: {error}", file=sys.stderr)
        return 2
    n_frames, height, width = clip.shape[:3]
    print(f"tracked {tracks.shape[1]} points through {n_frames} frames ({height}x{width}) with {tracker.name} in "
          f"{elapsed:.2f} s on {device}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
