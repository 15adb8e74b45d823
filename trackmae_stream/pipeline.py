"""From a loader batch of uint8 clips to what one training step consumes, overlapped with training on CUDA.

Per batch: copy the clips to the device, track a query grid on the first frame of every tubelet (when a target or the
mask policy needs tracks), let every target prepare its values and side outputs (e.g. the motion statistic), draw the
masks, gather the visible raw patches and the targets at the masked tokens. On CUDA all of it runs on a dedicated stream
for batch i+1 while the default stream trains on batch i; the handoff waits on an event and marks every handed-over
tensor with `record_stream`, so the caching allocator never reuses its memory while the training stream may still read
it.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import kernels
from .config import TrainConfig, tokens_per_side, tracker_grid_size
from .masking import MaskGenerator
from .metrics import IntervalTimer
from .targets import TargetBuilder, TargetInputs
from .tracking import PointTracker, TrackerOutput, build_tracker


@dataclass
class TrainBatch:
    """One prepared micro-batch. Targets are keyed by target name (`cfg.target`), in the masked tokens' order.

    A learned mask policy draws its masks in the training step: its batches come `deferred` (no indices yet;
    patches and target values of every token, plus the side outputs it may read) and `select(mask)` turns them into
    the usual form."""

    patches: Tensor  # (B, V, 3*t*p*p) ImageNet-normalised visible tubelets, Conv3d weight order (deferred: (B, N, .))
    visible_idx: Tensor | None  # (B, V) ascending token indices (None: deferred)
    masked_idx: Tensor | None  # (B, M) ascending token indices (None: deferred)
    targets: dict[str, Tensor]  # name -> (B, M, dim) (deferred: (B, N, dim))
    skipped: Tensor | None  # (B, k) host tensor: record indices of videos that failed to decode (-1 padding)
    source_index: Tensor | None  # (B,) host tensor: the records actually decoded
    # name -> (B, M, dim) or (B, M) bool, True = enters the loss; only targets that declare a validity have one
    valid: dict[str, Tensor] = field(default_factory=dict)
    # (1, T, H, W, 3) uint8 copy of the first clip, only for a micro-batch that will be pictured (`BatchPreparer.
    # picture_step`); a copy, because a loader may reuse its output buffer while the next batch is prepared
    frames_u8: Tensor | None = None
    side: dict[str, Tensor] = field(default_factory=dict)  # deferred only: side outputs for the learned policy

    @property
    def num_clips(self) -> int:
        return self.patches.shape[0]

    @property
    def deferred(self) -> bool:
        return self.visible_idx is None

    def tensor_items(self) -> dict[str, Tensor | None]:
        """Every tensor under a flat name (`patches`, `target.<name>`, `valid.<name>`, ...): the wire format of
        tracker.placement=ranks."""
        out: dict[str, Tensor | None] = {"patches": self.patches, "visible_idx": self.visible_idx,
                                         "masked_idx": self.masked_idx}
        out.update({f"target.{k}": v for k, v in self.targets.items()})
        out.update({f"valid.{k}": v for k, v in self.valid.items()})
        out.update({f"side.{k}": v for k, v in self.side.items()})
        out.update({"skipped": self.skipped, "source_index": self.source_index, "frames_u8": self.frames_u8})
        return out

    @classmethod
    def from_tensor_items(cls, items: dict[str, Tensor | None]) -> TrainBatch:
        def group(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix):]: v for k, v in items.items() if k.startswith(prefix) and v is not None}

        return cls(patches=items["patches"], visible_idx=items.get("visible_idx"), masked_idx=items.get("masked_idx"),
                   targets=group("target."), valid=group("valid."), side=group("side."),
                   skipped=items.get("skipped"), source_index=items.get("source_index"),
                   frames_u8=items.get("frames_u8"))

    def device_tensors(self) -> list[Tensor]:
        return [v for v in self.tensor_items().values() if isinstance(v, Tensor) and v.device.type == "cuda"]

    def select(self, mask: kernels.MaskOutput) -> TrainBatch:
        """A deferred batch at the masks drawn for it: visible patches, target values at the masked tokens. A mask of
        G·B rows (a policy drawing G masks per clip) selects from each clip's G copies in a row."""
        if not self.deferred:
            raise ValueError("select() is for deferred batches (learned mask policies)")
        m = mask.masked_idx
        copies, rest = divmod(m.shape[0], self.num_clips)
        if rest or copies < 1:
            raise ValueError(f"{m.shape[0]} masks for {self.num_clips} clips: need a multiple")
        src = self
        if copies > 1:
            def repeat(x: Tensor) -> Tensor:
                return x.repeat_interleave(copies, 0)

            src = TrainBatch(patches=repeat(self.patches), visible_idx=None, masked_idx=None,
                             targets={k: repeat(v) for k, v in self.targets.items()},
                             valid={k: repeat(v) for k, v in self.valid.items()}, skipped=self.skipped,
                             source_index=self.source_index, frames_u8=self.frames_u8)

        def at_masked(x: Tensor) -> Tensor:
            if x.dim() == 2:
                return torch.gather(x, 1, m)
            return torch.gather(x, 1, m.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        patches = torch.gather(src.patches, 1, mask.visible_idx.unsqueeze(-1).expand(-1, -1, src.patches.shape[-1]))
        return TrainBatch(patches=patches, visible_idx=mask.visible_idx, masked_idx=m,
                          targets={k: at_masked(v) for k, v in src.targets.items()},
                          valid={k: at_masked(v) for k, v in src.valid.items()}, skipped=src.skipped,
                          source_index=src.source_index, frames_u8=src.frames_u8)


class BatchPreparer:
    """Runs on whatever stream is current; the prefetcher decides which."""

    def __init__(self, cfg: TrainConfig, tracker: PointTracker | None, targets: TargetBuilder, masks: MaskGenerator,
                 device: torch.device):
        self.cfg = cfg
        self.tracker = tracker
        self.targets = targets
        self.masks = masks
        self.device = device
        self.grid_size = tracker_grid_size(cfg)
        self.tubelet = cfg.model.tubelet_size
        self.patch = cfg.model.patch_size
        self.mean = tuple(cfg.data.mean)
        self.std = tuple(cfg.data.std)
        self.patch_dtype = torch.bfloat16 if (device.type == "cuda" and cfg.precision == "bf16") else torch.float32
        # micro-batch index -> keep the first clip's frames for a picture (set by the trainer; None: never)
        self.picture_step: Callable[[int], bool] | None = None
        # tracker.placement=store: tracks from the store and the remap instead of tracking the clip
        self.track_source: Any = None

    @property
    def needs_tracks(self) -> bool:
        return self.tracker is not None and self.targets.needs_tracks

    def track(self, frames_u8: Tensor) -> TrackerOutput:
        """Tracks (B, T', G², 2) of the query grid over the first frame of every tubelet, in clip pixels, and their
        visibility (B, T', G²) (used by target.track_motion.drop_invisible)."""
        frames = frames_u8[:, :: self.tubelet].permute(0, 1, 4, 2, 3).float()  # (B, T', 3, H, W) in [0, 255]
        return self.tracker.track_grid(frames, self.grid_size)

    def track_windows(self, batch: dict[str, Any], frames_u8: Tensor, grid: int,
                      offsets: tuple[int, ...]) -> TrackerOutput:
        """Per-slot windows (`TargetInputs.track_windows`): for every tubelet t a grid x grid query grid on clip frame
        t*tubelet + offsets[0], followed through frames t*tubelet + offsets[k] (offsets inside the tubelet) -> tracks
        (B, T', K, G², 2) and
        visibility (B, T', K, G²). From the clip's source with tracker.backend=synthetic_gt, else the tracker on
        those frames (B*T' short clips in one batch)."""
        b, t, h, w, _ = frames_u8.shape
        slots = t // self.tubelet
        if not offsets or any(not 0 <= o < self.tubelet for o in offsets):
            raise ValueError(f"track_windows: offsets {offsets} must lie inside a tubelet [0, {self.tubelet})")
        index = torch.arange(slots)[:, None] * self.tubelet + torch.tensor(offsets)[None, :]  # (T', K)
        source = self.track_source
        if source is not None and hasattr(source, "_motion"):  # synthetic_gt: exact tracks from the stored motion
            import numpy as np

            from .tracking import query_grid
            from .tracking.synthetic_gt import clip_tracks

            sources = np.repeat(np.asarray(batch["source_index"]).reshape(-1), b // len(batch["source_index"]))
            frame_numbers = np.asarray(batch["frame_indices"])
            boxes = np.asarray(batch["crop_box"], dtype=np.float64)
            flipped = np.asarray(batch["flipped"]).astype(bool).reshape(-1)
            points = query_grid(grid, h, w, self.tracker.grid_rule).double().numpy()
            tracks = np.empty((b, slots, len(offsets), len(points), 2), dtype=np.float32)
            visible = np.empty(tracks.shape[:4], dtype=np.float32)
            for i, s in itertools.product(range(b), range(slots)):
                tracks[i, s], visible[i, s] = clip_tracks(source._motion(int(sources[i])), points,
                                                          frame_numbers[i, index[s].numpy()], boxes[i],
                                                          bool(flipped[i]), h)
            return TrackerOutput(torch.from_numpy(tracks).to(self.device), torch.from_numpy(visible).to(self.device))
        clips = frames_u8[:, index.to(frames_u8.device).reshape(-1)].reshape(b * slots, len(offsets), h, w, 3)
        out = self.tracker.track_grid(clips.permute(0, 1, 4, 2, 3).float(), grid)
        visibility = None if out.visibility is None else out.visibility.reshape(b, slots, len(offsets), -1)
        return TrackerOutput(out.tracks.reshape(b, slots, len(offsets), *out.tracks.shape[2:]), visibility)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], step: int) -> TrainBatch:
        frames = batch["frames"].to(self.device, non_blocking=True)
        b = frames.shape[0]
        inputs = TargetInputs(frames_u8=frames)
        if self.tracker is not None:
            inputs.track_windows = functools.partial(self.track_windows, batch, frames)
        if self.needs_tracks:
            tracked = self.track_source(batch, frames) if self.track_source is not None else self.track(frames)
            inputs.tracks, inputs.visibility = tracked.tracks, tracked.visibility
        prepared, side = self.targets.prepare(inputs)
        keep = frames[:1].clone() if self.picture_step and self.picture_step(step) else None
        if self.masks.learned:  # the trainer draws the masks: every token's patches and targets
            all_idx = torch.arange(self.masks.geometry.num_tokens, device=self.device).expand(b, -1)
            patches = kernels.gather_patches(frames, all_idx, tubelet=self.tubelet, patch=self.patch,
                                             layout="BTHWC", mean=self.mean, std=self.std,
                                             out_dtype=self.patch_dtype)
            values, valid = self.targets.at(inputs, prepared, all_idx)
            return TrainBatch(patches=patches, visible_idx=None, masked_idx=None, targets=values, valid=valid,
                              skipped=batch.get("skipped"), source_index=batch.get("source_index"),
                              frames_u8=keep, side={k: side[k] for k in self.masks.needs if k in side})
        mask = self.masks(step, b, self.device, side=side)
        patches = kernels.gather_patches(frames, mask.visible_idx, tubelet=self.tubelet, patch=self.patch,
                                         layout="BTHWC", mean=self.mean, std=self.std, out_dtype=self.patch_dtype)
        values, valid = self.targets.at(inputs, prepared, mask.masked_idx)
        return TrainBatch(patches=patches, visible_idx=mask.visible_idx, masked_idx=mask.masked_idx, targets=values,
                          valid=valid, skipped=batch.get("skipped"), source_index=batch.get("source_index"),
                          frames_u8=keep)


def build_masks(cfg: TrainConfig, rank: int = 0) -> MaskGenerator:
    side = tokens_per_side(cfg)
    slots = cfg.data.num_frames // cfg.model.tubelet_size
    return MaskGenerator(cfg.mask, tokens_per_frame=side * side, num_slots=slots, seed=cfg.seed, rank=rank,
                         embed_dim=cfg.model.embed_dim)


def build_batch_preparer(cfg: TrainConfig, device: torch.device, rank: int = 0) -> BatchPreparer:
    """Targets, masks and (when a target or the mask policy needs tracks) the tracker of a config, wired into one
    preparer; its `targets`, `masks` and `tracker` stay reachable for the model and the run log."""
    masks = build_masks(cfg, rank)
    targets = TargetBuilder(cfg, device, needs=masks.needs).to(device)
    tracker = build_tracker(cfg.tracker, device) if targets.needs_tracker else None
    preparer = BatchPreparer(cfg, tracker, targets, masks, device)
    if tracker is not None and cfg.tracker.placement == "store":
        from .tracks.source import StoreTrackSource, open_store

        preparer.track_source = StoreTrackSource(cfg, tracker, open_store(cfg, readonly=False), device)
    elif tracker is not None and hasattr(tracker, "clip_track_source"):
        # a tracker that reads each clip's source rather than its pixels (synthetic_gt: the set's exact motion)
        preparer.track_source = tracker.clip_track_source(cfg, device)
    return preparer


class StreamingPrefetcher:
    """Iterator of prepared batches. With a side `stream` (CUDA), batch i+1 is prepared on it while the training step
    on batch i runs; without one (CPU, or `tracker.overlap=false`) preparation runs inline.

    Host order matters as much as stream order: the consumer calls `prefetch()` right after it has launched its step
    on batch i, so the step's kernels are queued before the host blocks on the loader or spends time launching the
    tracker for batch i+1 (otherwise the GPU's training stream can run dry while the host does that). `__next__`
    prefetches itself when the caller has not, so plain iteration works too.

    Pinned host batches need no extra lifetime care: the caching host allocator does not reuse a pinned block before
    the asynchronous copy that reads it has completed."""

    def __init__(self, loader: Any, preparer: BatchPreparer, *, start_step: int, timer: IntervalTimer,
                 stream: torch.cuda.Stream | None = None):
        self.loader_iter: Iterator = iter(loader)
        self.preparer = preparer
        self.step = start_step  # micro-batch index: keys the masks of the batch being prepared
        self.timer = timer
        self.stream = stream
        self._next: TrainBatch | None = None
        self._ready: torch.cuda.Event | None = None  # side stream: batch `_next` is prepared
        self._handed_out: torch.cuda.Event | None = None  # consumer stream: its work before the last batch handed out
        self._pending = True  # `_next` still has to be fetched and prepared
        self._exhausted = False
        self.prefetch()

    def _fetch(self) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        try:
            batch = next(self.loader_iter)
        except StopIteration:
            batch = None
        self.timer.add("data", time.perf_counter() - t0)
        return batch

    def _prepare(self, batch: dict[str, Any]) -> TrainBatch:
        t0 = time.perf_counter()
        out = self.preparer(batch, self.step)
        self.timer.add("prepare", time.perf_counter() - t0)
        return out

    def prefetch(self) -> None:
        """Fetch the next batch and queue its preparation; a no-op when that is done already or the loader is
        exhausted. If it raises, nothing is half-committed (`__next__` never hands out a stale batch)."""
        if not self._pending or self._exhausted:
            return
        ready = None
        with contextlib.ExitStack() as on_side_stream:
            if self.stream is not None:
                # Start after the consumer's work queued before the last hand-out (so at most one batch ahead of
                # it), but not after the step the consumer has just launched on that batch: the work to overlap.
                if self._handed_out is None:
                    self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
                else:
                    self.stream.wait_event(self._handed_out)
                on_side_stream.enter_context(torch.cuda.stream(self.stream))
            batch = self._fetch()  # a GPU loader (DALI) then writes its output on the side stream too
            if batch is None:
                self._exhausted = True
                return
            prepared = self._prepare(batch)
            if self.stream is not None:
                ready = torch.cuda.Event()
                ready.record(self.stream)
        self._next, self._ready, self._pending = prepared, ready, False

    def __iter__(self) -> StreamingPrefetcher:
        return self

    def __next__(self) -> TrainBatch:
        self.prefetch()  # the caller did not prefetch after its last step (plain iteration)
        if self._exhausted:
            raise StopIteration
        out, self._next, self._pending = self._next, None, True
        if self.stream is not None:
            consumer = torch.cuda.current_stream(self.stream.device)
            consumer.wait_event(self._ready)
            for tensor in out.device_tensors():
                tensor.record_stream(consumer)
            self._handed_out = torch.cuda.Event()
            self._handed_out.record(consumer)
        self.step += 1
        return out

    def close(self) -> None:
        """Abandon the batch prepared ahead. The consumer stream waits for its work, so nothing the next prefetcher
        queues (e.g. into a CUDA graph's static buffers) can overtake it, and the host waits too (once per epoch):
        on an error path the loader (DALI's buffers) may be released right after this."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            self.stream.synchronize()
        self._next = None
        self._pending = False
