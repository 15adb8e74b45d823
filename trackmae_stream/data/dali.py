"""DALI clip loader: DALI decodes (NVDEC on the GPU, or libavcodec on the CPU), crops, resizes and flips; the host
only plans each clip.

The plan (which video, which frames, which crop, whether to flip) is drawn on the host with the CPU loader's own
functions and keys (`ResumableDistributedSampler`, and the data set's keyed draws `draw_frame_indices`,
`draw_crop_and_flip`, `draw_substitute`), so with no dropped videos a DALI batch asks for exactly the frames, crops
and flips the CPU loader (`VideoClipDataset`) would; only the decoders' colour conversion and the resize kernels
differ. Per batch the host reads each video file's bytes and hands them to DALI through
`fn.external_source`; `fn.decoders.video` decodes just the planned frames (device "mixed" for the GPU: NVDEC), and one
`fn.resize` per repeat does crop + resize (+ flip, via a reversed region of interest) in a single pass.

Bad videos: DALI's decoder raises inside the pipeline, and a DALI pipeline cannot continue after an error. So the list
is validated once, before the pipeline is built, by `probe_video` (with PyAV: open, demux every packet to count
frames and catch truncated or corrupt containers, decode the first frame for the frame size, check the codec is one
the chosen DALI backend decodes; without PyAV, which is optional, OpenCV reads the header and the first frame only);
failing entries are dropped with one counted warning (`DaliClipLoader.dropped`, `dropped_summary()`), and
building fails with `TooManySkippedVideosError` when they exceed `max_skip_fraction`. Probes can be cached in a JSON
file keyed by path, size and modification time (`probe_cache`), which makes restarts on large lists cheap. A file that
vanishes after probing is replaced at run time by another usable record, reported in `skipped` like the CPU loader
does. A bitstream error deeper than the first frame passes the probe and makes DALI raise: the loader then decodes
that batch's videos fully (`decoding_error`), marks the failing ones bad (`runtime_failures`; from then on they are
substituted and reported in `skipped`), rebuilds the pipeline and replays the batch, so every rank still yields the
same number of batches. If they all decode, the error is re-raised naming the batch's videos.

Batches: the CPU loader's dict (see `collate_clips`): `frames` uint8 (B * num_sample, T, S, S, 3) RGB on the GPU for
device="gpu" (on the CPU for device="cpu"); `label` int64 (B * num_sample,); `index`, `source_index` int64 (B,);
`skipped` int64 (B, 4), -1 padded; `frame_indices` int64 (B * num_sample, T); `crop_box` int64 (B * num_sample, 4)
as (x, y, width, height); `flipped` bool (B * num_sample,). All but `frames` stay on the host.

Epochs, as with the CPU `PretrainLoader`: `set_epoch(e)` before iterating epoch e (or `resume(e, batch_index)` to
continue one mid-way); each `iter(loader)` runs the selected epoch once (iterating again without `set_epoch` repeats
it); `len(loader)` is the number of batches that iteration yields, `batches_per_epoch` a full epoch's. DALI cannot
reset mid-epoch: starting a new iteration before the previous one was exhausted first drains the batches DALI has
already prefetched (at most `prefetch`).
"""
from __future__ import annotations

import collections
import importlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from .dataset import draw_crop_and_flip, draw_frame_indices, draw_substitute
from .decode import VideoDecodeError
from .lists import VideoRecord, read_video_list
from .sampler import ResumableDistributedSampler, count_batches
from .skips import DEFAULT_MAX_SKIP_FRACTION, TooManySkippedVideosError
from .transforms import DEFAULT_SCALES

try:  # DALI is optional (pyproject extra "dali"): the module imports without it and says so when used
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
except ImportError as _error:  # pragma: no cover - exercised only where DALI is absent
    _DALI_IMPORT_ERROR: ImportError | None = _error
else:
    _DALI_IMPORT_ERROR = None

logger = logging.getLogger(__name__)

#: Codecs DALI 2.4 decodes, per backend (CPU: libavcodec build without H.264/HEVC/AV1; GPU: NVDEC).
DALI_CPU_CODECS: tuple[str, ...] = ("vp8", "vp9", "mjpeg")
DALI_GPU_CODECS: tuple[str, ...] = ("h264", "hevc", "vp8", "vp9", "mjpeg", "av1", "mpeg4")
#: Width of `skipped`, the CPU data set's default max_retries, so batches from both loaders stack alike.
SKIPPED_WIDTH = 4
_PROBE_CACHE_VERSION = 1


def _require_dali() -> None:
    if _DALI_IMPORT_ERROR is not None:
        raise ImportError("the DALI loader needs NVIDIA DALI: pip install nvidia-dali-cuda130==2.4.0 "
                          f"(pyproject extra 'dali'); import failed with: {_DALI_IMPORT_ERROR}")


# ------------------------------------------------------------------------------------------------ probing

@dataclass(frozen=True)
class VideoProbe:
    """What the loader needs to know about a usable video."""

    num_frames: int  # demuxed video packets (= frames for the codecs DALI decodes)
    width: int
    height: int
    codec: str


def pyav_available() -> bool:
    """PyAV is optional (the GPU image lacks it): without it probing falls back to OpenCV, header-level only.

    An import probe (not just `importlib.util.find_spec`): an installed PyAV that fails to import counts as absent.
    """
    try:
        importlib.import_module("av")
    except ImportError:
        return False
    return True


# OpenCV reports the container's codec tag; DALI speaks FFmpeg codec names.
_CODEC_TAGS = {"vp90": "vp9", "vp09": "vp9", "vp80": "vp8", "vp08": "vp8", "h264": "h264", "avc1": "h264",
               "x264": "h264", "hevc": "hevc", "hev1": "hevc", "hvc1": "hevc", "h265": "hevc", "mjpg": "mjpeg",
               "av01": "av1", "mp4v": "mpeg4", "fmp4": "mpeg4"}


def _probe_pyav(path: Path) -> VideoProbe:
    """Demux every packet (no decoding): exact frame count, truncated or corrupt containers caught."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoDecodeError(path, "unreadable (no video stream)")
        stream = container.streams.video[0]
        count, first = 0, None
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream flush packet
                continue
            if packet.is_corrupt:
                raise VideoDecodeError(path, f"corrupt packet {count}")
            count += 1
            if first is None:
                decoded = packet.decode()
                first = decoded[0] if decoded else None
        if first is None:  # a decoder with delay gives its first frame only when flushed
            flushed = stream.codec_context.decode(None)
            first = flushed[0] if flushed else None
        if first is None or count == 0:
            raise VideoDecodeError(path, "no decodable frame")
        return VideoProbe(num_frames=count, width=int(first.width), height=int(first.height),
                          codec=stream.codec_context.name)


def _probe_opencv(path: Path) -> VideoProbe:
    """Header-level fallback: codec tag and frame count from the container, size from the first decoded frame."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        if not capture.isOpened():
            raise VideoDecodeError(path, "unreadable (OpenCV/FFmpeg cannot open it)")
        tag = int(capture.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode("latin-1").lower()
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        ok, first = capture.read()
        if not ok or first is None:
            raise VideoDecodeError(path, "no decodable frame")
        if count <= 0:
            count = 1 + sum(1 for _ in iter(capture.grab, False))
    finally:
        capture.release()
    return VideoProbe(num_frames=count, width=int(first.shape[1]), height=int(first.shape[0]),
                      codec=_CODEC_TAGS.get(tag, tag))


def probe_video(path: str | Path, codecs: Sequence[str] = DALI_GPU_CODECS, backend: str = "auto") -> VideoProbe:
    """Cheap validation of one video for DALI: raises VideoDecodeError naming the file and the problem.

    backend "pyav" opens the container, demuxes every packet (no decoding) to count frames and to catch truncated
    or corrupt containers, and decodes the first frame for its size; "opencv" is header-level (frame count from the
    container, first frame decoded); "auto" is PyAV when installed. Then checks the codec is in `codecs`.
    """
    if backend not in ("auto", "pyav", "opencv"):
        raise ValueError(f"unknown probe backend {backend!r}; expected 'auto', 'pyav' or 'opencv'")
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(path, "missing (no such file)")
    use_pyav = backend == "pyav" or (backend == "auto" and pyav_available())
    try:
        probe = _probe_pyav(path) if use_pyav else _probe_opencv(path)
    except VideoDecodeError:
        raise
    except Exception as error:  # any FFmpeg error means DALI would fail on the file too
        raise VideoDecodeError(path, f"unreadable ({type(error).__name__}: {error})") from error
    if probe.codec not in codecs:
        raise VideoDecodeError(path, f"codec {probe.codec!r} is not decoded by this DALI backend "
                                     f"(supported: {', '.join(codecs)})")
    return probe


def decoding_error(path: str | Path) -> str | None:
    """Decode every frame (slow; for diagnosis): None when the whole stream decodes, else what went wrong.

    With PyAV any decoder error counts; the OpenCV fallback can only see a stream that ends before the frame count
    its container claims.
    """
    try:
        if pyav_available():
            import av

            with av.open(str(path)) as container:
                for _ in container.decode(video=0):
                    pass
            return None
        capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        try:
            claimed = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
            decoded = 0
            while capture.grab():  # grab() decodes without converting
                decoded += 1
        finally:
            capture.release()
    except Exception as error:
        return f"undecodable stream ({type(error).__name__}: {error})"
    if decoded < claimed:
        return f"undecodable stream (decoding stops after {decoded} of {claimed} frames)"
    return None


def _file_key(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def probe_records(records: Sequence[VideoRecord], *, codecs: Sequence[str], min_frames: int, workers: int = 4,
                  cache_path: str | Path | None = None) -> list[VideoProbe | VideoDecodeError]:
    """Probe every record (threads), reusing and updating an optional JSON cache; one result per record.

    A video with fewer than `min_frames` frames is an error (the CPU loader skips those too). The cache holds raw
    probe results keyed by path, size and mtime, so changing `min_frames` or the backend does not invalidate it.
    """
    cache: dict[str, dict[str, Any]] = {}
    cache_file = Path(cache_path) if cache_path is not None else None
    if cache_file is not None and cache_file.exists():
        try:
            loaded = json.loads(cache_file.read_text())
            if loaded.get("version") == _PROBE_CACHE_VERSION:
                cache = loaded["entries"]
        except (OSError, ValueError, KeyError, AttributeError):
            logger.warning("ignoring unreadable probe cache %s", cache_file)

    def probe_one(record: VideoRecord) -> tuple[str, dict[str, Any]]:
        key = str(record.path)
        file_key = _file_key(record.path)
        cached = cache.get(key)
        if cached is not None and file_key is not None and cached.get("file") == file_key:
            return key, cached
        try:
            entry: dict[str, Any] = {"probe": asdict(probe_video(record.path, codecs=DALI_GPU_CODECS))}
        except VideoDecodeError as error:
            entry = {"error": error.reason}
        entry["file"] = file_key
        return key, entry

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        entries = dict(pool.map(probe_one, records))
    if cache_file is not None:
        cache.update(entries)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"version": _PROBE_CACHE_VERSION, "entries": cache}))
        os.replace(temporary, cache_file)  # atomic: concurrent ranks never read a half-written cache

    results: list[VideoProbe | VideoDecodeError] = []
    for record in records:
        entry = entries[str(record.path)]
        if "error" in entry:
            results.append(VideoDecodeError(record.path, entry["error"]))
            continue
        probe = VideoProbe(**entry["probe"])
        if probe.codec not in codecs:
            results.append(VideoDecodeError(record.path, f"codec {probe.codec!r} is not decoded by this DALI "
                                                         f"backend (supported: {', '.join(codecs)})"))
        elif probe.num_frames < min_frames:
            results.append(VideoDecodeError(record.path, f"too short: {probe.num_frames} frames < num_frames "
                                                         f"{min_frames}"))
        else:
            results.append(probe)
    return results


# ------------------------------------------------------------------------------------------------ planning

@dataclass(frozen=True)
class ClipPlanConfig:
    num_frames: int
    sampling_rate: int
    input_size: int
    scales: tuple[float, ...]
    max_distort: int
    fix_crop: bool
    more_fix_crop: bool
    flip: bool
    num_sample: int
    seed: int


class _ClipSource:
    """The external source: one call per batch, in order, returning encoded videos and their plans.

    Runs on the host thread that drives the pipeline. The plan of each batch is queued for the loader, which pops it
    when DALI returns that batch (external-source batches come back in the order they were produced).
    """

    def __init__(self, records: Sequence[VideoRecord], probes: Sequence[VideoProbe | None], usable: Sequence[int],
                 config: ClipPlanConfig, batch_size: int, drop_last: bool):
        self.records = records
        self.probes = probes
        self.usable = list(usable)
        self.config = config
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.plans: collections.deque[dict[str, Any]] = collections.deque()
        self.bad: dict[int, str] = {}  # record index -> reason, found unusable at run time
        self.epoch = 0
        self.positions: list[int] = []
        self.next_batch = 0
        self.num_batches = 0

    def begin(self, epoch: int, positions: list[int]) -> None:
        """Serve `positions` (indices into `usable`) of `epoch` from the next call on."""
        self.epoch = epoch
        self.positions = positions
        self.next_batch = 0
        self.num_batches = count_batches(len(positions), self.batch_size, self.drop_last)
        self.plans.clear()

    def stop(self) -> None:
        """End the epoch early: the next call raises StopIteration."""
        self.num_batches = self.next_batch

    def rewind(self, batch_number: int) -> None:
        """Serve batch `batch_number` of the epoch again next (after a pipeline failure); forget queued plans."""
        self.next_batch = batch_number
        self.plans.clear()

    def _read(self, index: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(record used, its bytes, skipped record indices).

        A record found bad at run time, or whose file vanished since probing, is replaced by another usable record
        drawn from a keyed generator, as the CPU data set does.
        """
        skipped = np.full(SKIPPED_WIDTH, -1, dtype=np.int64)
        source = index
        for attempt in range(SKIPPED_WIDTH + 1):
            reason = self.bad.get(source)
            if reason is None:
                try:
                    return source, np.fromfile(self.records[source].path, dtype=np.uint8), skipped
                except OSError as error:
                    reason = f"unreadable since probing ({error})"
                    self.bad[source] = reason
                    logger.warning("skipping video %s: %s", self.records[source].path, reason)
            # Substitutes come from the records not yet known bad (a rare event: the scan is affordable).
            candidates = [i for i in self.usable if i not in self.bad] if self.bad else self.usable
            if attempt == SKIPPED_WIDTH or not candidates:
                raise TooManySkippedVideosError(
                    f"sample {index}: {attempt + 1} videos in a row are unusable (last: {self.records[source].path}: "
                    f"{reason}); {len(candidates)} usable videos left; check the list and the data root")
            skipped[attempt] = source
            source = candidates[draw_substitute(len(candidates), seed=self.config.seed, epoch=self.epoch, index=index,
                                                attempt=attempt)]
        raise AssertionError("unreachable")

    def plan_sample(self, index: int, source: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]],
                                                            np.ndarray, np.ndarray]:
        """Frame indices (T,), per repeat (roi_start, roi_end) in (y, x) pixels, crop boxes (R, 4), flips (R,).

        The CPU data set's keyed draws for the requested `index` (attempt 0), applied to the video actually used.
        """
        c = self.config
        probe = self.probes[source]
        key = dict(seed=c.seed, epoch=self.epoch, index=index, attempt=0)
        frame_ids = draw_frame_indices(probe.num_frames, c.num_frames, c.sampling_rate, **key)
        rois, boxes, flips = [], np.empty((c.num_sample, 4), np.int64), np.zeros(c.num_sample, bool)
        for repeat in range(c.num_sample):
            box, flips[repeat] = draw_crop_and_flip(
                probe.width, probe.height, c.input_size, **key, repeat=repeat, scales=c.scales,
                max_distort=c.max_distort, fix_crop=c.fix_crop, more_fix_crop=c.more_fix_crop, flip=c.flip)
            boxes[repeat] = (box.x, box.y, box.width, box.height)
            left, right = (box.x + box.width, box.x) if flips[repeat] else (box.x, box.x + box.width)
            # A region of interest whose start exceeds its end is read mirrored: crop, resize and flip in one pass.
            rois.append((np.array([box.y, left], np.float32), np.array([box.y + box.height, right], np.float32)))
        return frame_ids, rois, boxes, flips

    def __call__(self) -> list[list[np.ndarray]]:
        if self.next_batch >= self.num_batches:
            raise StopIteration
        start = self.next_batch * self.batch_size
        positions = self.positions[start:start + self.batch_size]
        self.next_batch += 1
        encoded, frames, roi_starts, roi_ends = [], [], [[] for _ in range(self.config.num_sample)], \
            [[] for _ in range(self.config.num_sample)]
        plan: dict[str, list[Any]] = collections.defaultdict(list)
        for position in positions:
            index = self.usable[position]
            source, data, skipped = self._read(index)
            frame_ids, rois, boxes, flips = self.plan_sample(index, source)
            encoded.append(data)
            frames.append(frame_ids.astype(np.int32))
            for repeat, (roi_start, roi_end) in enumerate(rois):
                roi_starts[repeat].append(roi_start)
                roi_ends[repeat].append(roi_end)
            plan["index"].append(index)
            plan["source_index"].append(source)
            plan["skipped"].append(skipped)
            plan["label"].append(np.full(self.config.num_sample, self.records[source].label, np.int64))
            plan["frame_indices"].append(np.repeat(frame_ids[None], self.config.num_sample, axis=0))
            plan["crop_box"].append(boxes)
            plan["flipped"].append(flips)
            plan["path"].append(str(self.records[source].path))
        arrays: dict[str, Any] = {key: (np.asarray(value) if key in ("index", "source_index", "path")
                                        else np.stack(value) if key == "skipped" else np.concatenate(value))
                                  for key, value in plan.items()}
        arrays["batch"] = self.next_batch - 1
        self.plans.append(arrays)
        return [encoded, frames, *roi_starts, *roi_ends]


def _build_pipeline(source: _ClipSource, *, batch_size: int, num_threads: int, device_id: int | None, prefetch: int,
                    seed: int, decoder_device: str, input_size: int, num_sample: int,
                    decoder_options: dict[str, Any]) -> Any:
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=prefetch,
                  seed=seed)
    def clip_pipeline():
        inputs = fn.external_source(source=source, num_outputs=2 + 2 * num_sample, batch=True,
                                    dtype=[types.UINT8, types.INT32] + [types.FLOAT] * (2 * num_sample))
        encoded, frame_ids = inputs[0], inputs[1]
        roi_starts, roi_ends = inputs[2:2 + num_sample], inputs[2 + num_sample:]
        video = fn.decoders.video(encoded, frames=frame_ids, device=decoder_device, **decoder_options)
        # Bilinear without antialiasing: the CPU loader's cv2.INTER_LINEAR.
        return tuple(fn.resize(video, size=[input_size, input_size], roi_start=roi_start, roi_end=roi_end,
                               roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=False)
                     for roi_start, roi_end in zip(roi_starts, roi_ends))

    return clip_pipeline()


# ------------------------------------------------------------------------------------------------ loader

class DaliClipLoader:
    """Iterable of pretraining batches decoded by DALI; see the module docstring for the batch and epoch contract.

    Attributes: `records` (the whole list), `usable` (indices of the records that passed the probe), `dropped`
    (VideoDecodeError per dropped record, `dropped_indices` their indices), `device` ("gpu" or "cpu").
    """

    def __init__(self, records: Sequence[VideoRecord], probes: Sequence[VideoProbe | VideoDecodeError], *,
                 batch_size: int, config: ClipPlanConfig, shard_id: int, num_shards: int, shuffle: bool,
                 drop_last: bool, device: str, device_id: int | None, num_threads: int, prefetch: int,
                 decoder_options: dict[str, Any]):
        self.records = list(records)
        self.device = device
        self.batch_size = batch_size
        self.config = config
        self.usable = [i for i, probe in enumerate(probes) if isinstance(probe, VideoProbe)]
        self.dropped = [probe for probe in probes if isinstance(probe, VideoDecodeError)]
        self.dropped_indices = [i for i, probe in enumerate(probes) if isinstance(probe, VideoDecodeError)]
        if not self.usable:
            raise TooManySkippedVideosError(f"none of the {len(self.records)} videos is usable by DALI ({device}); "
                                            f"e.g. {self.dropped[0]}")
        self.sampler = ResumableDistributedSampler(len(self.usable), rank=shard_id, world_size=num_shards,
                                                   seed=config.seed, shuffle=shuffle, drop_last=drop_last)
        self.drop_last = drop_last
        self.runtime_failures: list[VideoDecodeError] = []  # videos DALI failed on after passing the probe
        usable_probes = [probe if isinstance(probe, VideoProbe) else None for probe in probes]
        self._source = _ClipSource(self.records, usable_probes, self.usable, config, batch_size, drop_last)
        self._pipeline_options = dict(
            batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch=prefetch, seed=config.seed,
            decoder_device="mixed" if device == "gpu" else "cpu", input_size=config.input_size,
            num_sample=config.num_sample, decoder_options=decoder_options)
        self._outputs = [f"frames_{repeat}" for repeat in range(config.num_sample)]
        self._start_pipeline()
        self._exhausted = True  # no epoch in progress
        self._generation = 0

    def _start_pipeline(self) -> None:
        pipeline = _build_pipeline(self._source, **self._pipeline_options)
        # Nothing runs before the first batch is asked for (prepare_first_batch=False), and epochs are restarted
        # by `__iter__` (auto_reset=False), after the source knows which epoch to serve.
        self._iterator = DALIGenericIterator(pipeline, self._outputs, auto_reset=False, prepare_first_batch=False)
        self._ran = False  # this DALI iterator has not been started yet

    # -- epoch control (PretrainLoader's interface)
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentations the next iteration yields, from its start."""
        self.sampler.set_epoch(epoch)

    def resume(self, epoch: int, batch_index: int) -> None:
        """Continue `epoch` at its batch `batch_index` (the number of batches already consumed in that epoch)."""
        self.set_epoch(epoch)
        self.sampler.set_start(batch_index, self.batch_size)

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a full epoch on this shard."""
        return self.sampler.batches_per_epoch(self.batch_size, self.drop_last)

    def __len__(self) -> int:
        return count_batches(len(self.sampler), self.batch_size, self.drop_last)

    @property
    def num_dropped(self) -> int:
        return len(self.dropped)

    def dropped_summary(self) -> str:
        """One log line about the videos the probe dropped."""
        if not self.dropped:
            return f"DALI loader: all {len(self.records)} videos usable"
        shown = "; ".join(str(error) for error in self.dropped[:3]) + ("; ..." if len(self.dropped) > 3 else "")
        return (f"DALI loader: dropped {len(self.dropped)} of {len(self.records)} videos "
                f"({100 * len(self.dropped) / len(self.records):.1f}%): {shown}")

    def close(self) -> None:
        """Release the DALI pipeline (its threads and device buffers) now rather than at garbage collection."""
        self._iterator = None
        self._exhausted = True

    # -- iteration
    def _drain(self) -> None:
        """Finish an abandoned epoch: stop the source and consume what DALI already prefetched."""
        self._source.stop()
        while True:
            try:
                next(self._iterator)
            except StopIteration:
                break
            except RuntimeError:  # a failure in batches nobody will read: start afresh
                self._start_pipeline()
                break
        self._exhausted = True

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._iterator is None:
            raise RuntimeError("this DALI loader was closed")
        if not self._exhausted:
            self._drain()
        positions = self.sampler.epoch_indices(self.sampler.epoch)[self.sampler.start:]
        self._source.begin(self.sampler.epoch, positions)
        if self._ran:
            self._iterator.reset()  # schedules the first runs of the new epoch
        self._ran = True
        self._exhausted = False
        self._generation += 1
        return self._batches(self._generation)

    def _batches(self, generation: int) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            if generation != self._generation:
                raise RuntimeError("this DALI loader iteration was superseded by a newer iter(loader)")
            try:
                outputs = next(self._iterator)[0]
            except StopIteration:
                self._exhausted = True
                return
            except TooManySkippedVideosError:  # raised by the source itself: nothing left to substitute
                raise
            except RuntimeError as error:
                self._recover(error)
                continue
            plan = self._source.plans.popleft()
            yield self._collate(outputs, plan)

    def _recover(self, error: RuntimeError) -> None:
        """A DALI pipeline is dead after an error: find the batch's undecodable videos by decoding them fully
        (`decoding_error`), mark them bad (later draws substitute them and report them in `skipped`), rebuild the
        pipeline and replay that batch. Every rank keeps its batch count, which distributed training relies on."""
        if not self._source.plans:
            raise error
        failed = self._source.plans[0]
        bad = {}
        for index in sorted(set(failed["source_index"].tolist())):
            reason = decoding_error(self.records[index].path)
            if reason is not None:
                bad[index] = reason
        if not bad:
            raise RuntimeError(f"DALI failed on a batch whose videos all decode outside DALI "
                               f"({', '.join(failed['path'])}); remove them from the list") from error
        for index, reason in bad.items():
            self._source.bad[index] = reason
            self.runtime_failures.append(VideoDecodeError(self.records[index].path, reason))
            logger.warning("DALI failed on %s (%s): it passed the probe; substituting it from now on",
                           self.records[index].path, reason)
        self._source.rewind(int(failed["batch"]))
        self._start_pipeline()
        self._ran = True

    def _collate(self, outputs: dict[str, torch.Tensor], plan: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        clips = [outputs[name] for name in self._outputs]
        # Sample-major order (s0r0, s0r1, s1r0, ...), as the CPU collate concatenates each sample's repeats.
        frames = clips[0] if len(clips) == 1 else torch.stack(clips, dim=1).flatten(0, 1)
        batch = {"frames": frames}
        for key in ("label", "index", "source_index", "skipped", "frame_indices", "crop_box"):
            batch[key] = torch.from_numpy(plan[key].astype(np.int64))
        batch["flipped"] = torch.from_numpy(plan["flipped"].astype(bool))
        return batch


def build_dali_loader(source: str | Path | Sequence[VideoRecord], *, batch_size: int, num_frames: int,
                      sampling_rate: int, input_size: int, scales: Sequence[float] = DEFAULT_SCALES,
                      max_distort: int = 1, fix_crop: bool = True, more_fix_crop: bool = True, flip: bool = False,
                      num_sample: int = 1, seed: int = 0, shard_id: int = 0, num_shards: int = 1,
                      shuffle: bool = True, drop_last: bool = True, device: str = "gpu", device_id: int | None = None,
                      num_threads: int = 2, prefetch: int = 2, root: str | Path | None = None,
                      probe_workers: int = 4, probe_cache: str | Path | None = None,
                      max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION,
                      decoder_options: dict[str, Any] | None = None) -> DaliClipLoader:
    """A DALI loader over a VideoMAE-format list file (or parsed records), sharded like the CPU loader.

    Args mirror `VideoClipDataset` + `build_pretrain_loader` (shard_id/num_shards are rank/world size). DALI-specific:
      device: "gpu" (NVDEC decoding on cuda:`device_id`, default the current device; frames arrive on the GPU) or
        "cpu" (libavcodec; VP8/VP9/MJPEG only in DALI 2.4).
      num_threads: DALI CPU worker threads; prefetch: batches DALI prepares ahead (prefetch_queue_depth).
      probe_workers, probe_cache: threads and optional JSON cache of the up-front validation (`probe_records`).
      max_skip_fraction: raise TooManySkippedVideosError when more of the list than this fails the probe.
      decoder_options: extra keyword arguments of `fn.decoders.video` (e.g. {"build_index": False}); the default
        pad_mode is "edge", so a frame count one too high repeats the last frame rather than failing the run.
    """
    _require_dali()
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
    for name, value in (("batch_size", batch_size), ("num_frames", num_frames), ("sampling_rate", sampling_rate),
                        ("input_size", input_size), ("num_sample", num_sample), ("num_threads", num_threads),
                        ("prefetch", prefetch), ("num_shards", num_shards)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id {shard_id}, num_shards {num_shards}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= max_skip_fraction <= 1.0:
        raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
    if device == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("build_dali_loader(device='gpu') needs a CUDA device; use device='cpu' (VP8/VP9/MJPEG)")
        device_id = torch.cuda.current_device() if device_id is None else device_id
    else:
        device_id = None  # DALI's CPU-only mode

    records = read_video_list(source, root) if isinstance(source, (str, Path)) else list(source)
    if not records:
        raise ValueError("build_dali_loader needs at least one record")
    codecs = DALI_GPU_CODECS if device == "gpu" else DALI_CPU_CODECS
    probes = probe_records(records, codecs=codecs, min_frames=num_frames, workers=probe_workers,
                           cache_path=probe_cache)
    dropped = [probe for probe in probes if isinstance(probe, VideoDecodeError)]
    if dropped:
        fraction = len(dropped) / len(records)
        logger.warning("DALI loader: dropping %d of %d videos (%.1f%%) that fail the probe, e.g. %s",
                       len(dropped), len(records), 100 * fraction, dropped[0])
        if fraction > max_skip_fraction:
            raise TooManySkippedVideosError(
                f"{len(dropped)} of {len(records)} videos fail the DALI probe ({100 * fraction:.1f}% > "
                f"max_skip_fraction {100 * max_skip_fraction:.1f}%); e.g. "
                + "; ".join(str(error) for error in dropped[:5]))
    options = {"pad_mode": "edge"}
    options.update(decoder_options or {})
    config = ClipPlanConfig(num_frames=num_frames, sampling_rate=sampling_rate, input_size=input_size,
                            scales=tuple(scales), max_distort=max_distort, fix_crop=fix_crop,
                            more_fix_crop=more_fix_crop, flip=flip, num_sample=num_sample, seed=seed)
    return DaliClipLoader(records, probes, batch_size=batch_size, config=config, shard_id=shard_id,
                          num_shards=num_shards, shuffle=shuffle, drop_last=drop_last, device=device,
                          device_id=device_id, num_threads=num_threads, prefetch=prefetch,
                          decoder_options=options)
