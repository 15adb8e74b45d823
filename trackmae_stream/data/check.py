"""Check every video of a VideoMAE list with the CPU decoder before a run finds the bad ones one by one.

  python -m trackmae_stream.data.check LIST [--root DIR] [--workers N] [--decoder opencv|pyav] [--min-frames N] [--full]

Each video is opened and its first and last frames are decoded (a cut or corrupt tail fails there; `--full` decodes
every frame, slower); a header that overstates the frame count by up to FRAME_COUNT_TOLERANCE frames passes, as in
training. Videos are checked in parallel in a process pool. Progress goes to stderr; the unreadable videos go to
stdout as `path: reason` lines, in list order. Exit status: 0 all readable, 1 some unreadable, 2 usage error (a
missing or malformed list, a bad option).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .dataset import FRAME_COUNT_TOLERANCE
from .decode import DECODERS, DEFAULT_DECODER, ShortReadError, VideoDecodeError, open_video
from .lists import read_video_list

#: Seconds between two progress lines.
PROGRESS_INTERVAL = 2.0


@dataclass(frozen=True)
class VideoCheck:
    path: str
    frames: int  # frames that decode (the header's count when only the first and last were decoded)
    reason: str = ""  # why the video is unusable; empty when it is fine

    @property
    def ok(self) -> bool:
        return not self.reason


def _decodable_frames(path: str | Path, decoder: str, full: bool) -> int:
    """Frames of the video that decode; VideoDecodeError when it cannot be opened or is cut beyond the tolerance."""
    with open_video(path, decoder) as reader:
        claimed = reader.num_frames
        if claimed < 1:
            raise VideoDecodeError(path, "unreadable (no decodable frame)")
        if full:
            decodable = reader.count_decodable_frames()
        else:
            try:
                reader.read(np.array([0, claimed - 1]))
                return claimed
            except ShortReadError:
                decodable = reader.count_decodable_frames()
        # The training data set's rule: a header may overstate the count a little (WebM derives it from the
        # duration); a last frame that does not come although every frame decodes from the start is a broken seek.
        if decodable < claimed - FRAME_COUNT_TOLERANCE:
            raise VideoDecodeError(path, f"truncated or corrupt: {decodable} of the {claimed} frames its header "
                                         "claims decode")
        if not full and decodable >= claimed:
            raise VideoDecodeError(path, f"corrupt: seeking to frame {claimed - 1} fails, although {decodable} "
                                         "frames decode from the start")
        return decodable


def check_video(path: str | Path, decoder: str = DEFAULT_DECODER, *, min_frames: int = 1,
                full: bool = False) -> VideoCheck:
    """Whether one video decodes (see the module's docstring); never raises for a bad video."""
    try:
        frames = _decodable_frames(path, decoder, full)
    except VideoDecodeError as error:
        return VideoCheck(str(path), 0, error.reason)
    except Exception as error:  # a decoder library's own error is a bad video here too
        return VideoCheck(str(path), 0, f"decoding failed ({type(error).__name__}: {error})")
    if frames < min_frames:
        return VideoCheck(str(path), frames, f"too short: {frames} frames < {min_frames}")
    return VideoCheck(str(path), frames)


def _check_one(job: tuple[str, str, int, bool]) -> VideoCheck:
    path, decoder, min_frames, full = job
    return check_video(path, decoder, min_frames=min_frames, full=full)


def _quiet_worker() -> None:
    # FFmpeg and OpenCV print lines of their own for every bad file, which would bury the progress; the reasons come
    # back in the results.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _check_and_send(job: tuple[str, str, int, bool], connection) -> None:
    _quiet_worker()
    connection.send(_check_one(job))


def _check_isolated(job: tuple[str, str, int, bool], context) -> VideoCheck:
    """Check one video in a process of its own, so that a decoder crash is reported against that video."""
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_check_and_send, args=(job, send), daemon=True)
    process.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:  # the process died without an answer
        result = None
    process.join()
    if result is not None:
        return result
    code = process.exitcode or 0
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    return VideoCheck(job[0], 0, f"the decoder crashed ({how})")


def check_videos(paths: Iterable[str | Path], *, decoder: str = DEFAULT_DECODER, workers: int = 1,
                 min_frames: int = 1, full: bool = False) -> Iterator[VideoCheck]:
    """Check videos in `workers` processes; yields one VideoCheck per path, in the given order.

    A video that crashes the decoder breaks the pool: the videos that may have been in flight are then checked one
    process each (the crash is reported against its video), and a fresh pool takes the rest.
    """
    jobs = [(str(path), decoder, min_frames, full) for path in paths]
    # fork: the workers start at once and need nothing re-imported (this process has not used OpenCV's threads)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    done = 0
    while done < len(jobs):
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_quiet_worker) as pool:
                for result in pool.map(_check_one, jobs[done:], chunksize=chunk):
                    done += 1
                    yield result
        except BrokenProcessPool:
            # Results arrive in order: the crash lies in the chunks that were running or queued past `done`.
            suspects = jobs[done:done + (2 * workers + 2) * chunk]
            for job in suspects:
                yield _check_isolated(job, context)
            done += len(suspects)


class _UsageError(UserError):
    """A bad command line: exit status 2."""


def _progress(done: int, total: int, bad: int, final: bool) -> None:
    line = f"checked {done} of {total} videos, {bad} unreadable"
    if sys.stderr.isatty():  # one line that updates in place on a terminal, plain lines in a log
        print(f"\r{line}", end="\n" if final else "", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


def run(list_file: str, root: str | None, *, decoder: str, workers: int, min_frames: int, full: bool) -> int:
    if workers < 1:
        raise _UsageError(f"--workers must be >= 1, got {workers}")
    if min_frames < 1:
        raise _UsageError(f"--min-frames must be >= 1, got {min_frames}")
    if root is not None and not Path(root).is_dir():
        raise _UsageError(f"--root {root}: folder not found")
    try:
        records = read_video_list(list_file, root)
    except UserError as error:
        raise _UsageError(str(error)) from error
    total, bad, last = len(records), [], time.monotonic()
    for done, result in enumerate(check_videos([r.path for r in records], decoder=decoder,
                                               workers=min(workers, total), min_frames=min_frames, full=full), 1):
        if not result.ok:
            bad.append(result)
        if time.monotonic() - last >= PROGRESS_INTERVAL and done < total:
            _progress(done, total, len(bad), final=False)
            last = time.monotonic()
    _progress(total, total, len(bad), final=True)
    for result in bad:
        print(f"{result.path}: {result.reason}")
    if bad:
        print(f"{len(bad)} of {total} videos are unreadable")
        return 1
    print(f"all {total} videos are readable")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trackmae_stream.data.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("list_file", metavar="LIST", help="VideoMAE-format list (`path label` or `path 0 -1`)")
    parser.add_argument("--root", help="folder that relative list paths start from (default: the list's folder)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes decoding in parallel (default: the usable cores)")
    parser.add_argument("--decoder", choices=DECODERS, default=DEFAULT_DECODER)
    parser.add_argument("--min-frames", type=int, default=1,
                        help="report videos with fewer frames as too short (training needs data.num_frames)")
    parser.add_argument("--full", action="store_true", help="decode every frame, not only the first and last")
    args = parser.parse_args(argv)
    try:
        return run(args.list_file, args.root, decoder=args.decoder, workers=args.workers,
                   min_frames=args.min_frames, full=args.full)
    except _UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
