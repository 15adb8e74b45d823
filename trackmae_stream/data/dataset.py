"""The pretraining clip data set: decode once, cut `num_sample` augmented clips, skip bad videos deterministically.

Every random draw comes from a generator keyed by (seed, epoch, index, attempt, purpose, repeat), never from worker
RNG state: a sample is the same for any number of DataLoader workers and after a resume. The epoch travels with the
index (the loader's sampler yields (epoch, index) keys) because persistent workers hold copies of the data set.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .decode import (
    DECODERS,
    DEFAULT_DECODER,
    ShortReadError,
    VideoDecodeError,
    open_video,
    sample_clip_indices,
    strip_worker_traceback,
)
from .lists import VideoRecord
from .transforms import DEFAULT_SCALES, CropBox, crop_resize_flip, sample_crop_and_flip

logger = logging.getLogger(__name__)

#: A header may overstate the frame count by this much (WebM derives it from the duration) before the video is
#: called truncated; within it, the clip is re-sampled from the frames that really decode.
FRAME_COUNT_TOLERANCE = 2
#: Purposes of the keyed generators (part of the key).
TEMPORAL, CROP, SUBSTITUTE = 0, 1, 2


class UnreadableVideosError(UserError, RuntimeError):
    """A sample for which the video and all its substitutes failed to decode; the message names every file.

    Constructed from the message alone, so that the DataLoader re-raises it from a worker as this class (with the
    worker's traceback stripped: see `strip_worker_traceback`).
    """

    def __init__(self, message: str):
        super().__init__(strip_worker_traceback(message, type(self)))


def keyed_rng(seed: int, epoch: int, index: int, attempt: int, purpose: int, repeat: int = 0) -> np.random.Generator:
    """The generator of one draw, keyed by [seed, epoch, index, attempt, purpose, repeat] (attempt: how many videos
    already failed for this sample; repeat: which of the num_sample augmentations)."""
    return np.random.default_rng([seed, epoch, index, attempt, purpose, repeat])


# The data set's three keyed draws. Other loaders that must draw the same clips (DALI) call these.

def draw_frame_indices(num_available: int, num_frames: int, sampling_rate: int, *, seed: int, epoch: int, index: int,
                       attempt: int) -> np.ndarray:
    """Source frame numbers of sample `index`'s clip from a video of `num_available` frames (`sample_clip_indices`)."""
    return sample_clip_indices(num_available, num_frames, sampling_rate,
                               keyed_rng(seed, epoch, index, attempt, TEMPORAL))


def draw_crop_and_flip(image_width: int, image_height: int, input_size: int, *, seed: int, epoch: int, index: int,
                       attempt: int, repeat: int, scales: Sequence[float], max_distort: int, fix_crop: bool,
                       more_fix_crop: bool, flip: bool) -> tuple[CropBox, bool]:
    """Crop and flip of augmentation `repeat` of sample `index` (`sample_crop_and_flip`)."""
    return sample_crop_and_flip(image_width, image_height, input_size,
                                keyed_rng(seed, epoch, index, attempt, CROP, repeat), scales=scales,
                                max_distort=max_distort, fix_crop=fix_crop, more_fix_crop=more_fix_crop, flip=flip)


def draw_substitute(num_candidates: int, *, seed: int, epoch: int, index: int, attempt: int) -> int:
    """Which of `num_candidates` records replaces the video that failed at `attempt` of sample `index`."""
    return int(keyed_rng(seed, epoch, index, attempt, SUBSTITUTE).integers(num_candidates))


class VideoClipDataset(torch.utils.data.Dataset):
    """Clips of `num_frames` frames every `sampling_rate` frames, multi-scale cropped to input_size^2.

    `__getitem__(key)` (key: index, or (epoch, index) from the loader's sampler) returns
      frames        uint8 (num_sample, num_frames, input_size, input_size, 3) RGB, not normalised
                    (see `normalize_clip`);
      label         int64 (num_sample,);
      index         int64 (), the requested index; source_index int64 (), the record actually decoded;
      skipped       int64 (max_retries,), records that failed while producing this sample, padded with -1;
      frame_indices int64 (num_sample, num_frames), source frame numbers (shared by the repeats, VideoMAE V2 style:
                    one decode, num_sample augmentations);
      crop_box      int64 (num_sample, 4), (x, y, width, height) of each crop in source pixels;
      flipped       bool (num_sample,).
    A missing, unreadable, corrupt or too-short video (fewer than num_frames frames), or any exception while decoding
    it, is logged once per file and worker, and another record, drawn from the keyed generator, takes its place;
    after max_retries substitutes in a row fail, UnreadableVideosError names them all. With `substitute=False`
    (evaluation: a video must not stand in for another) the VideoDecodeError of the video itself is raised.
    """

    def __init__(self, records: Sequence[VideoRecord], *, num_frames: int, sampling_rate: int, input_size: int,
                 scales: Sequence[float] = DEFAULT_SCALES, max_distort: int = 1, fix_crop: bool = True,
                 more_fix_crop: bool = True, flip: bool = False, num_sample: int = 1, decoder: str = DEFAULT_DECODER,
                 decoder_threads: int = 1, seed: int = 0, max_retries: int = 4, substitute: bool = True,
                 track_windows: Any = None):
        if not records:
            raise ValueError("VideoClipDataset needs at least one record")
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; expected one of {DECODERS}")
        for name, value in (("num_frames", num_frames), ("sampling_rate", sampling_rate),
                            ("input_size", input_size), ("num_sample", num_sample)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if seed < 0 or max_retries < 0:
            raise ValueError(f"seed and max_retries must be >= 0, got {seed}, {max_retries}")
        self.records = list(records)
        self.num_frames = num_frames
        self.sampling_rate = sampling_rate
        self.input_size = input_size
        self.scales = tuple(scales)
        self.max_distort = max_distort
        self.fix_crop = fix_crop
        self.more_fix_crop = more_fix_crop
        self.flip = flip
        self.num_sample = num_sample
        self.decoder = decoder
        self.decoder_threads = decoder_threads
        self.seed = seed
        self.max_retries = max_retries
        self.substitute = substitute
        # tracker.placement=store (trackmae_stream.tracks.source.TrackWindows): the clip start is drawn among the
        # video's K windows, and each sample carries the window's stored tracks or the frames to track
        self.track_windows = track_windows
        self.epoch = 0
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain integer keys (the loader passes the epoch with every key instead)."""
        self.epoch = epoch

    def _decode(self, record: VideoRecord, epoch: int, index: int,
                attempt: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Frames (T, H, W, 3), their indices and the window (-1: none) of one record; VideoDecodeError when it
        cannot be used."""
        with open_video(record.path, self.decoder, threads=self.decoder_threads) as reader:
            available = reader.num_frames
            while True:
                if available < self.num_frames:
                    raise VideoDecodeError(record.path, f"too short: {available} frames < num_frames "
                                                        f"{self.num_frames}")
                window = -1
                if self.track_windows is not None:
                    window, indices = self.track_windows.frame_indices(available, seed=self.seed, epoch=epoch,
                                                                       index=index, attempt=attempt)
                else:
                    indices = draw_frame_indices(available, self.num_frames, self.sampling_rate, seed=self.seed,
                                                 epoch=epoch, index=index, attempt=attempt)
                try:
                    return reader.read(indices), indices, window
                except ShortReadError as error:
                    decodable = reader.count_decodable_frames()
                    if decodable >= available or available - decodable > FRAME_COUNT_TOLERANCE:
                        raise VideoDecodeError(record.path, f"truncated or corrupt: {error.reason}; "
                                                            f"{decodable} frames decode") from error
                    available = decodable

    def _warn_once(self, error: VideoDecodeError) -> None:
        if error.path not in self._warned:
            self._warned.add(error.path)
            logger.warning("skipping video %s: %s (another sample takes its place; the trainer counts skips)",
                           error.path, error.reason)

    def _augment(self, frames: np.ndarray, epoch: int, index: int,
                 attempt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The num_sample crops of decoded frames: clips (num_sample, T, size, size, 3), boxes, flipped flags."""
        height, width = frames.shape[1:3]
        size = self.input_size
        clips = np.empty((self.num_sample, self.num_frames, size, size, 3), dtype=np.uint8)
        boxes = np.empty((self.num_sample, 4), dtype=np.int64)
        flipped = np.zeros(self.num_sample, dtype=bool)
        for repeat in range(self.num_sample):
            box, flipped[repeat] = draw_crop_and_flip(
                width, height, size, seed=self.seed, epoch=epoch, index=index, attempt=attempt, repeat=repeat,
                scales=self.scales, max_distort=self.max_distort, fix_crop=self.fix_crop,
                more_fix_crop=self.more_fix_crop, flip=self.flip)
            clips[repeat] = crop_resize_flip(frames, box, size, flip=bool(flipped[repeat]))
            boxes[repeat] = (box.x, box.y, box.width, box.height)
        return clips, boxes, flipped

    def _load(self, record: VideoRecord, epoch: int, index: int,
              attempt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Clips, boxes, flips, frame indices and track extras (placement=store) of one record; VideoDecodeError for
        whatever goes wrong with it."""
        try:
            frames, indices, window = self._decode(record, epoch, index, attempt)
            extras = (self.track_windows.extras(str(record.path), frames, window, indices)
                      if self.track_windows is not None else {})
            return (*self._augment(frames, epoch, index, attempt), indices, extras)
        except VideoDecodeError:
            raise
        except Exception as error:
            # A decoder library's own exception on a strange file (or a frame no crop fits) is a bad video: skipped
            # and counted, never a crash of the run. The type stays in the reason, so a systematic bug shows.
            raise VideoDecodeError(record.path, f"decoding failed ({type(error).__name__}: {error})") from error

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} records")
        skipped = np.full(self.max_retries, -1, dtype=np.int64)
        failures: list[VideoDecodeError] = []
        source = index
        for attempt in range(self.max_retries + 1):
            try:
                clips, boxes, flipped, indices, extras = self._load(self.records[source], epoch, index, attempt)
                break
            except VideoDecodeError as error:
                if not self.substitute:
                    raise
                self._warn_once(error)
                failures.append(error)
                if attempt == self.max_retries:
                    raise UnreadableVideosError(
                        f"sample {index}: {len(failures)} videos in a row could not be decoded: "
                        + "; ".join(str(f) for f in failures)
                        + ". Check the list file and the data root (python -m trackmae_stream.data.check LIST "
                          "finds every unreadable video).") from error
                skipped[attempt] = source
                source = draw_substitute(len(self.records), seed=self.seed, epoch=epoch, index=index, attempt=attempt)

        label = self.records[source].label
        return {
            "frames": torch.from_numpy(clips),
            "label": torch.full((self.num_sample,), label, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
            "source_index": torch.tensor(source, dtype=torch.int64),
            "skipped": torch.from_numpy(skipped),
            "frame_indices": torch.from_numpy(np.repeat(indices[None], self.num_sample, axis=0)),
            "crop_box": torch.from_numpy(boxes),
            "flipped": torch.from_numpy(flipped),
            **extras,
        }
