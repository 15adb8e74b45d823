"""CPU video decoding (OpenCV or PyAV) that decodes only the frames a clip needs, and VideoMAE's temporal sampling.

Both readers return RGB uint8 frames and turn every decoder failure into `VideoDecodeError`, which the data set
treats as a skipped video. They walk forward through the stream and seek only when the next wanted frame lies more
than `seek_threshold` frames ahead (or behind): a clip of 16 frames at rate 4 then costs one seek to the keyframe
before its start plus about 61 decoded frames, and nothing after its last frame.

Measured with bench/decode.py (2 shared cores, one thread per decoder, best of 5 interleaved rounds):
  - synthetic set (VP9 128², 40 frames), data set samples of 8 frames at rate 2: OpenCV 107/s, PyAV 92/s;
  - 224² H.264, 300 frames, 16-frame clips at rate 4: OpenCV 31 clips/s, PyAV 43 clips/s (OpenCV seeks 16 frames
    before the target, then decodes forward); full data set samples: OpenCV 25/s, PyAV 28/s.
OpenCV is the default: it wins on the embedded default data, it is installed everywhere (the GPU image has no
PyAV), and it trails by ~12% end to end on K400-like files, where `decoder="pyav"` is the better choice. PyAV is
imported only when used.
"""
from __future__ import annotations

import abc
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import UserError

DECODERS = ("opencv", "pyav")
DEFAULT_DECODER = "opencv"
#: Decode forward instead of seeking when the next wanted frame is at most this many frames ahead.
DEFAULT_SEEK_THRESHOLD = 32


def strip_worker_traceback(message: str, error_type: type) -> str:
    """The original message of an exception that a DataLoader worker raised.

    The DataLoader re-raises a worker's exception in the main process as `error_type(text)`, where text is
    "Caught <name> in DataLoader worker process N.\nOriginal Traceback ...\n<module>.<name>: <message>\n". Project
    errors are printed as one `error:` line, so their constructors keep <message> only. Other text is returned as is.
    """
    if not message.startswith(f"Caught {error_type.__name__} ") or "\nOriginal Traceback" not in message:
        return message
    marker = f"\n{error_type.__module__}.{error_type.__qualname__}: "
    at = message.rfind(marker)
    return message[at + len(marker):].rstrip("\n") if at >= 0 else message


class VideoDecodeError(UserError, RuntimeError):
    """A video that cannot be used: missing, unreadable, corrupt, truncated or too short."""

    def __init__(self, path: str | Path, reason: str | None = None):
        if reason is None:  # one argument: the DataLoader re-raising a worker's error with its message
            message = strip_worker_traceback(str(path), type(self))
            super().__init__(message)
            path, _, reason = message.partition(": ")
        else:
            super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class ShortReadError(VideoDecodeError):
    """The stream ended (or a seek failed) before a wanted frame: the header's frame count was too large."""


def sample_clip_indices(num_video_frames: int, num_frames: int, sampling_rate: int,
                        rng: np.random.Generator) -> np.ndarray:
    """VideoMAE's pretraining rule: every `sampling_rate`-th frame of a segment at a uniform random offset.

    The segment spans num_frames * sampling_rate frames and starts at an offset drawn uniformly from
    [0, num_video_frames - span]. A video shorter than the span starts at frame 0 and repeats the last strided frame
    that exists (VideoMAE's clamp; VideoMAE itself stops one stride early when the next strided frame would be the
    video's very last frame, which this rule does not copy). A video with fewer than `num_frames` frames raises
    `ValueError`: the data set skips it as too short. Returns int64 (num_frames,).
    """
    if num_frames < 1 or sampling_rate < 1:
        raise ValueError(f"num_frames and sampling_rate must be >= 1, got {num_frames}, {sampling_rate}")
    if num_video_frames < num_frames:
        raise ValueError(f"video has {num_video_frames} frames, fewer than num_frames={num_frames}")
    span = num_frames * sampling_rate
    offset = int(rng.integers(0, num_video_frames - span + 1)) if num_video_frames >= span else 0
    steps = np.minimum(np.arange(num_frames), (num_video_frames - 1 - offset) // sampling_rate)
    return (offset + steps * sampling_rate).astype(np.int64)


class VideoReader(abc.ABC):
    """An open video. `num_frames` is the container's claim; `read` decodes only the frames asked for."""

    def __init__(self, path: str | Path, seek_threshold: int = DEFAULT_SEEK_THRESHOLD):
        self.path = Path(path)
        self.seek_threshold = seek_threshold
        self.num_frames = 0
        # The forward walk survives between reads: a later read continues it instead of seeking when it can.
        self._frames: Iterator[tuple[int, Any]] | None = None
        self._next: int | None = 0  # index the walk yields next; None after a seek (until a frame arrives)

    @abc.abstractmethod
    def _frames_from(self, start: int) -> Iterator[tuple[int, Any]]:
        """Decoded frames as (index, handle) from a position at or before `start` (seeking when needed)."""

    @abc.abstractmethod
    def _to_rgb(self, handle: Any) -> np.ndarray:
        """(H, W, 3) uint8 RGB of a frame handle yielded by `_frames_from` (before the iterator advances)."""

    @abc.abstractmethod
    def close(self) -> None:
        ...

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, reason: str, error: BaseException | None = None) -> VideoDecodeError:
        detail = f"{reason} ({type(error).__name__}: {error})" if error is not None else reason
        return VideoDecodeError(self.path, detail)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Frames at `indices` (any order, repeats allowed) as uint8 (len(indices), H, W, 3) RGB."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size == 0:
            raise ValueError("no frame indices to read")
        if indices.min() < 0:
            raise ValueError(f"negative frame index in {indices.tolist()}")
        decoded: dict[int, np.ndarray] = {}
        try:
            for target in np.unique(indices).tolist():
                seek = self._next is None or not 0 <= target - self._next <= self.seek_threshold
                if seek or self._frames is None:
                    self._frames = self._frames_from(target if seek else self._next)
                    if seek:
                        self._next = None  # a seek lands on the keyframe before target: position unknown
                for index, handle in self._frames:
                    self._next = index + 1
                    if index == target:
                        decoded[target] = self._to_rgb(handle)
                        break
                    if index > target:
                        raise self._fail(f"seek to frame {target} landed on frame {index}")
                else:
                    where = f"after frame {self._next - 1}" if self._next else "right after seeking"
                    self._frames, self._next = None, None
                    raise ShortReadError(self.path, f"stream ended {where}, before frame {target} "
                                                    f"(header claims {self.num_frames} frames)")
        except VideoDecodeError:
            raise
        except Exception as error:  # any decoder/library error is a bad video, never a crash
            self._frames, self._next = None, None
            raise self._fail("decoding failed", error) from error
        shapes = {frame.shape for frame in decoded.values()}
        if len(shapes) != 1:
            raise self._fail(f"frames of different shapes {sorted(shapes)}")
        return np.stack([decoded[i] for i in indices.tolist()])

    def count_decodable_frames(self) -> int:
        """Decode the whole stream from the start and count its frames (slow; for headers that lie)."""
        count = 0
        try:
            for _ in self._frames_from(0):
                count += 1
        except Exception:  # a corrupt tail ends the count
            pass
        self._frames, self._next = None, None
        return count


class OpenCVReader(VideoReader):
    """cv2.VideoCapture (FFmpeg backend). Seeks with CAP_PROP_POS_FRAMES, skips with grab() (no colour conversion)."""

    def __init__(self, path: str | Path, threads: int = 1, seek_threshold: int = DEFAULT_SEEK_THRESHOLD):
        super().__init__(path, seek_threshold)
        self._threads = threads
        self._capture = self._open()
        self._position = 0  # index of the frame the next grab() returns
        self.num_frames = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if self.num_frames <= 0:
            self.num_frames = self.count_decodable_frames()

    def _open(self) -> cv2.VideoCapture:
        if not self.path.is_file():
            raise VideoDecodeError(self.path, "missing (no such file)")
        try:
            capture = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, self._threads])
        except Exception as error:
            raise self._fail("cannot open", error) from error
        if not capture.isOpened():
            raise VideoDecodeError(self.path, "unreadable (OpenCV/FFmpeg cannot open it)")
        return capture

    def _frames_from(self, start: int) -> Iterator[tuple[int, Any]]:
        if start != self._position:
            if start == 0:  # reopening is the reliable way back to the first frame
                self._capture.release()
                self._capture = self._open()
            elif not self._capture.set(cv2.CAP_PROP_POS_FRAMES, start):
                return
            self._position = start
        while self._capture.grab():
            self._position += 1
            yield self._position - 1, None

    def _to_rgb(self, handle: Any) -> np.ndarray:
        ok, frame = self._capture.retrieve()
        if not ok or frame is None:
            raise self._fail(f"cannot convert frame {self._position - 1}")
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self._capture.release()


class PyAVReader(VideoReader):
    """PyAV (FFmpeg). Frame indices come from presentation timestamps; seeks land on the keyframe before."""

    def __init__(self, path: str | Path, threads: int = 1, seek_threshold: int = DEFAULT_SEEK_THRESHOLD):
        import av  # optional dependency: only this reader needs it
        from av.video.reformatter import VideoReformatter

        super().__init__(path, seek_threshold)
        self._fresh = True  # nothing decoded yet: frame 0 needs no seek
        # One converter for all frames: each frame's own reformatter would rebuild its swscale context every
        # frame (measured 4x slower, same pixels).
        self._reformatter = VideoReformatter()
        if not self.path.is_file():
            raise VideoDecodeError(self.path, "missing (no such file)")
        try:
            self._container = av.open(str(self.path))
        except Exception as error:
            raise self._fail("unreadable (PyAV/FFmpeg cannot open it)", error) from error
        try:
            if not self._container.streams.video:
                raise VideoDecodeError(self.path, "unreadable (no video stream)")
            self._stream = self._container.streams.video[0]
            if threads != 1:
                self._stream.thread_type = "AUTO"
                self._stream.codec_context.thread_count = threads
            rate = self._stream.average_rate or self._stream.guessed_rate
            if not rate:
                raise VideoDecodeError(self.path, "unreadable (no frame rate)")
            self._rate = Fraction(rate)
            self._time_base = Fraction(self._stream.time_base)
            self._start_pts = self._stream.start_time or 0
            self.num_frames = int(self._stream.frames) or self._frames_from_duration()
        except VideoDecodeError:
            self._container.close()
            raise
        except Exception as error:
            self._container.close()
            raise self._fail("unreadable", error) from error

    def _frames_from_duration(self) -> int:
        if self._stream.duration:
            seconds = self._stream.duration * self._time_base
        elif self._container.duration:
            seconds = Fraction(self._container.duration, 1_000_000)  # container durations are in AV_TIME_BASE
        else:
            return self.count_decodable_frames()
        return int(round(seconds * self._rate))

    def _frames_from(self, start: int) -> Iterator[tuple[int, Any]]:
        if start > 0 or not self._fresh:
            target_pts = self._start_pts + int(round(start / self._rate / self._time_base))
            self._container.seek(target_pts, stream=self._stream, backward=True, any_frame=False)
        self._fresh = False
        for frame in self._container.decode(self._stream):
            if frame.pts is None:
                raise self._fail("frame without a timestamp")
            yield int(round((frame.pts - self._start_pts) * self._time_base * self._rate)), frame

    def _to_rgb(self, handle: Any) -> np.ndarray:
        return self._reformatter.reformat(handle, format="rgb24").to_ndarray()

    def close(self) -> None:
        self._container.close()


def open_video(path: str | Path, decoder: str = DEFAULT_DECODER, *, threads: int = 1,
               seek_threshold: int = DEFAULT_SEEK_THRESHOLD) -> VideoReader:
    """Open a video with `decoder` ("opencv" or "pyav"); raises VideoDecodeError when it is missing or unreadable.

    `threads` is the decoder's thread count: 1 inside DataLoader workers (they already run in parallel), 0 lets
    FFmpeg choose.
    """
    if decoder == "opencv":
        return OpenCVReader(path, threads=threads, seek_threshold=seek_threshold)
    if decoder == "pyav":
        return PyAVReader(path, threads=threads, seek_threshold=seek_threshold)
    raise ValueError(f"unknown decoder {decoder!r}; expected one of {DECODERS}")
