"""Tracking on other ranks (tracker.placement=ranks): the last `tracker.tracking_ranks` ranks of the torchrun world
decode and track, and send prepared batches to the training ranks with torch.distributed point-to-point.

Roles. With W ranks of which n track, ranks 0..W-n-1 train: DDP and every training-side collective run over their
own group, so the global batch, steps per epoch, logs, `done:` and checkpoints count them only. Rank W-n+j tracks for
the training ranks r with r % n == j. For each of them it builds exactly what that rank would build inline: its data
shard (rank r of W-n), a preparer whose masks are keyed by r, and the same sequence of micro-batch positions (the
engine's epoch / accumulation / epoch-tail rule, from the position the training rank starts or resumes at), so the
batches equal those of tracker.placement=inline bit for bit on the same hardware.

Wire. Per batch: a header on a gloo group (control word, index, position, the host-side `source_index` and
`skipped`, whether the picture frames follow) and one message per device tensor on the default group (NCCL on CUDA,
gloo on CPU), in the fixed order of the `BatchSchema`, whose shapes and dtypes both sides derive from the config.
One message per tensor rather than one packed buffer: no pack or unpack copy on either side (a ViT-B batch is about
300 MB), and a handful of messages per batch costs nothing next to their size.

Flow. A training rank posts its receives for a batch, then asks for it with a REQUEST word, keeping AHEAD batches
asked for beyond the one in use (they arrive while its steps run). The tracking rank prepares PREPARE_AHEAD batches
beyond those asked for and sends a batch only when asked, so every send meets a posted receive and every posted
receive gets its batch, also when the run stops early: the training rank then sends STOP (carrying the signal, so
that the tracking rank exits like the training ranks) after its last request, and drains what it asked for. START
carries the training rank's position (fresh or resumed) and its total steps.

Failures. gloo reports a peer that died as soon as its connection closes; a peer that hangs is caught by the
timeouts below. Either way the training ranks stop with one `error:` line naming the tracking rank. An error on a
tracking rank (a video, a decoder worker, the tracker) is sent in place of the next batch, so the training ranks
print its message too. Waiting happens on helper threads (gloo's `is_completed()` stays false until someone waits,
and a `wait(timeout)` that times out leaves the handle unusable): the main thread waits in short slices, so signal
handlers (a second Ctrl-C) still run.
"""
from __future__ import annotations

import atexit
import copy
import datetime
import json
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import ConfigError, TrainConfig, tokens_per_side, tracker_grid_size
from ..data import SkipCounter
from ..data_setup import DataSetup, SkipReport, build_data, video_records
from ..distributed import DistInfo, init_distributed, shutdown
from ..errors import UserError
from ..masking import MaskGenerator
from ..metrics import IntervalTimer
from ..pipeline import BatchPreparer, TrainBatch, build_batch_preparer
from ..stop_signal import StopSignal
from ..targets import TargetBuilder

if TYPE_CHECKING:
    from ..engine import RunSummary

log = logging.getLogger(__name__)

AHEAD = 2  # batches a training rank has asked for beyond the one in use: they arrive while its steps run
PREPARE_AHEAD = 1  # batches a tracking rank prepares beyond those asked for
# A tracking rank that delivers no batch within this is stuck (a batch takes seconds; the slowest honest case is
# a pathological video). The first batch also covers the tracking rank's start: loaders, the DALI probe of the
# list, loading and compiling the tracker.
BATCH_TIMEOUT_S = 600.0
FIRST_BATCH_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "TRACKMAE_TRACKING_TIMEOUT_S"  # overrides both (the tests; tracking that is known to be slower)
DUMP_ENV = "TRACKMAE_REMOTE_DUMP"  # debugging: training ranks save every batch they receive into this folder
# Test hook for failures of a tracking rank: "exit:N" (os._exit after N batches sent), "hang:N" (stop answering
# after N batches, as a stuck process would) or "error:N" (a UserError after N batches).
FAIL_HOOK_ENV = "TRACKMAE_TEST_TRACKING_FAIL"
ERROR_GRACE_S = 10.0  # how long a failing tracking rank waits for the training ranks to read its error
# The control group's timeout: how long a tracking rank waits for the next word of a training rank, which may be
# busy for a while (a checkpoint write, the first step's compilation). The same as the world's.
CONTROL_TIMEOUT = datetime.timedelta(minutes=30)

MAGIC = 0x54524D4B  # "TRMK": a word from anything else (another protocol, a mismatched peer) fails loudly
CONTROL_WORDS = 8
_FIXED = 16  # fixed words at the head of a header
MAX_SKIP_WIDTH = 16  # widest `skipped` a header carries (the loaders use 4)
TEXT_BYTES = 1024
TAG_CONTROL, TAG_HEADER, TAG_FRAMES, TAG_TENSORS = 1, 2, 3, 16
_HOST_FIELDS = ("skipped", "source_index")  # host tensors from the loader: they travel in the header
_FLAG_FRAMES, _FLAG_SOURCE, _FLAG_SKIPPED = 1, 2, 4


class Word(IntEnum):
    HELLO = 1  # tracking -> training, once: the shard's size and what the schema needs
    BATCH = 2  # tracking -> training: a header; the tensors follow
    ERROR = 3  # tracking -> training: in place of a batch; the text says what failed
    START = 4  # training -> tracking: position and total steps
    REQUEST = 5  # training -> tracking: send batch k (at position ...), with or without picture frames
    STOP = 6  # training -> tracking: no more requests (signal number, 0 = end of training or an error)


class TrackingRankError(UserError, RuntimeError):
    """A tracking rank died, hung or failed (tracker.placement=ranks); the message names it and where to look."""


# ----------------------------------------------------------------------------------------------------------------------
# Roles


@dataclass(frozen=True)
class TrackingWorld:
    """Who trains and who tracks, and the process groups of tracker.placement=ranks."""

    info: DistInfo  # the whole world: rank is the global rank
    n_train: int
    n_track: int
    train_group: Any  # DDP and every training-side collective
    agree_group: Any  # gloo over the training ranks: do all of them have their batch?
    track_group: Any  # orders the DALI list probe among tracking ranks
    control_group: Any  # gloo over the world: control words and batch headers (CPU tensors also under NCCL)

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def is_tracking(self) -> bool:
        return self.rank >= self.n_train

    def peer_of(self, train_rank: int) -> int:
        """The tracking rank that serves `train_rank`."""
        return self.n_train + train_rank % self.n_track

    def served(self) -> list[int]:
        """The training ranks this tracking rank serves, ascending."""
        return list(range(self.rank - self.n_train, self.n_train, self.n_track))

    def train_info(self) -> DistInfo:
        return DistInfo(rank=self.rank, world_size=self.n_train, local_rank=self.info.local_rank,
                        device=self.device, group=self.train_group)


def join_world(cfg: TrainConfig) -> TrackingWorld:
    """Join torchrun's world and split it into training and tracking ranks (every rank calls this)."""
    info = init_distributed(cfg.device)
    n_track = cfg.tracker.tracking_ranks
    n_train = info.world_size - n_track
    if n_train < n_track:
        # Each training rank is served by one tracking rank: a tracking rank without a training rank would idle.
        raise ConfigError(f"tracker.tracking_ranks={n_track}: tracker.placement='ranks' needs at least as many "
                          f"training ranks as tracking ranks, and this run has {info.world_size} rank(s) in all; "
                          f"start more ranks (torchrun --nproc_per_node / --nnodes) or lower tracker.tracking_ranks")
    # new_group is collective over the world: every rank creates every group, in this order.
    train_group = dist.new_group(list(range(n_train)))
    # longer than any wait for a batch: a rank waits here while another still waits for its batch
    agree_group = dist.new_group(list(range(n_train)), backend="gloo",
                                 timeout=datetime.timedelta(seconds=FIRST_BATCH_TIMEOUT_S + 600))
    track_group = dist.new_group(list(range(n_train, info.world_size)), backend="gloo")
    control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return TrackingWorld(info=info, n_train=n_train, n_track=n_track, train_group=train_group,
                         agree_group=agree_group, track_group=track_group, control_group=control_group)


# ----------------------------------------------------------------------------------------------------------------------
# The batch schema and the position schedule


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class BatchSchema:
    """What one prepared batch holds on the wire. `tensors`: the device tensors of a `TrainBatch`, in wire order
    (fields that are None in every batch of the config are absent); `samples`: rows of the host fields
    `source_index` (B,) and `skipped` (B, width), which travel in the header; `frames`: `frames_u8`, sent only for a
    batch the training rank will picture."""

    tensors: tuple[TensorSpec, ...]
    samples: int
    frames: TensorSpec

    @property
    def header_words(self) -> int:
        return header_words(self.samples)


def header_words(samples: int) -> int:
    return _FIXED + samples + samples * MAX_SKIP_WIDTH + TEXT_BYTES // 8


def batch_schema(cfg: TrainConfig, *, dims: dict[str, int], validity: dict[str, str],
                 device: torch.device) -> BatchSchema:
    """The schema of a config's batches. The target widths (`dims`, name -> values per token) and which targets carry
    a validity (`validity`, name -> "value" | "token") come from the tracking rank's `TargetBuilder`; everything
    else follows from the config."""
    side = tokens_per_side(cfg)
    slots = cfg.data.num_frames // cfg.model.tubelet_size
    masks = MaskGenerator(cfg.mask, tokens_per_frame=side * side, num_slots=slots, seed=cfg.seed, rank=0)
    visible = masks.num_visible
    masked = side * side * slots - visible
    clips = cfg.batch_size * cfg.data.num_sample
    patch_dim = 3 * cfg.model.tubelet_size * cfg.model.patch_size ** 2
    # BatchPreparer's rule: bf16 patches on CUDA under bf16 autocast
    patch_dtype = torch.bfloat16 if (device.type == "cuda" and cfg.precision == "bf16") else torch.float32
    specs = [TensorSpec("patches", (clips, visible, patch_dim), patch_dtype),
             TensorSpec("visible_idx", (clips, visible), torch.int64),
             TensorSpec("masked_idx", (clips, masked), torch.int64)]
    for name, dim in dims.items():
        specs.append(TensorSpec(f"target.{name}", (clips, masked, dim), torch.float32))
    for name, kind in validity.items():
        shape = (clips, masked) if kind == "token" else (clips, masked, dims[name])
        specs.append(TensorSpec(f"valid.{name}", shape, torch.bool))
    size = cfg.data.input_size
    frames = TensorSpec("frames_u8", (1, cfg.data.num_frames, size, size, 3), torch.uint8)
    return BatchSchema(tensors=tuple(specs), samples=cfg.batch_size, frames=frames)


Position = tuple[int, int, int]  # (epoch, batch in epoch, micro-batch index: keys the masks)


class Schedule:
    """The positions of the micro-batches the training loop consumes from a (resumed) position on, by the engine's
    rule: an optimizer step takes `accum` consecutive batches of one epoch, an epoch's tail of fewer than `accum`
    batches is skipped. Both ends of a link follow it, so neither needs to be told each position."""

    def __init__(self, step: int, epoch: int, batch_in_epoch: int, total_steps: int, batches_per_epoch: int,
                 accum: int):
        self.step, self.epoch, self.batch = step, epoch, batch_in_epoch
        self.micro = 0  # micro-batch within the current optimizer step
        self.total_steps, self.batches_per_epoch, self.accum = total_steps, batches_per_epoch, accum

    def __len__(self) -> int:
        return max(0, (self.total_steps - self.step) * self.accum - self.micro)

    def _position(self) -> tuple[int, int]:
        if self.micro == 0 and self.batch + self.accum > self.batches_per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.batch

    def peek(self) -> Position | None:
        if not len(self):
            return None
        epoch, batch = self._position()
        return epoch, batch, self.step * self.accum + self.micro

    def pop(self) -> Position:
        position = self.peek()
        if position is None:
            raise IndexError("the schedule is exhausted")
        self.epoch, self.batch = position[0], position[1] + 1
        self.micro += 1
        if self.micro == self.accum:
            self.step, self.micro = self.step + 1, 0
        return position


# ----------------------------------------------------------------------------------------------------------------------
# Transport


class _Pending:
    """Completion of a group of c10d work handles, set by a `_Waiter` thread; `keep` holds the tensors that must
    outlive the transfer."""

    __slots__ = ("done", "error", "keep")

    def __init__(self, keep: Any = None):
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.keep = keep


class _Waiter:
    """Waits on work handles on a daemon thread, in the order given. gloo completes a handle inside `wait()`;
    NCCL's `wait()` only orders streams, so its handles are polled with `is_completed()` instead."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.busy = 0  # handles given and not yet completed (or failed)
        _WAITERS.add(self)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, works: list[tuple[Any, bool]], keep: Any = None) -> _Pending:
        """Completion of `works`, pairs of (handle, poll): poll for NCCL's handles, wait for gloo's."""
        pending = _Pending(keep)
        self.busy += 1
        self._queue.put((works, pending))
        return pending

    def close(self) -> None:
        # Let the thread leave c10d before the process groups are destroyed (a thread inside gloo's wait() while the
        # group goes away aborts the process); one stuck on a handle that never completes stays behind (a daemon,
        # and the atexit guard below ends the process).
        self._queue.put(None)
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            works, pending = item
            try:
                for work, poll in works:
                    if poll:
                        while not work.is_completed():
                            time.sleep(0.0005)
                    else:
                        work.wait()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                pending.error = exc
            self.busy -= 1
            pending.done.set()


# After a failure a waiter thread can stay inside gloo's `wait()` (a hung peer, a batch that will never come). If
# that wait returns while the interpreter finalises (the peer exits at the same moment), the thread's attempt to
# retake the GIL unwinds through a noexcept C++ frame and aborts the process ("terminate called without an active
# exception"). So a process whose waiters are still busy at exit ends with os._exit, after its output: only failed
# runs get here (a clean stop or end leaves nothing in flight), with this exit code (a stop's 128 + signal).
_WAITERS: weakref.WeakSet[_Waiter] = weakref.WeakSet()
_EXIT_CODE = [1]


@atexit.register
def _exit_if_waiting() -> None:
    if any(waiter.busy for waiter in list(_WAITERS)):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_CODE[0])


class _Timeout(Exception):
    pass


def _await(pending: _Pending, deadline: float) -> None:
    """Wait in short slices (signal handlers run between them) until done or `deadline` (time.monotonic())."""
    while not pending.done.wait(0.05):
        if time.monotonic() >= deadline:
            raise _Timeout
    if pending.error is not None:
        raise pending.error


def _timeout(default: float) -> float:
    value = os.environ.get(TIMEOUT_ENV)
    return float(value) if value else default


def _reason(exc: BaseException) -> str:
    """The first sentence of a transport error, without gloo's source location and advice."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text
    return text.split(". ", 1)[0].rstrip(".")


@dataclass
class Incoming:
    """A batch whose receives are posted: the header, then the tensors."""

    k: int
    position: Position
    with_frames: bool
    header: Tensor
    header_done: _Pending
    tensors: dict[str, Tensor]
    tensors_done: _Pending


class Link:
    """Messages between one tracking rank and one training rank: control words and headers on the gloo control
    group, batch tensors on the data group (None: the default group, NCCL on CUDA)."""

    def __init__(self, peer: int, samples: int, device: torch.device, control_group: Any, data_group: Any = None):
        self.peer = peer
        self.samples = samples
        self.device = device
        self.control_group = control_group
        self.data_group = data_group
        self._poll = dist.get_backend(data_group) != "gloo"
        self._recv = _Waiter(f"trackmae-recv-{peer}")
        self._send = _Waiter(f"trackmae-send-{peer}")

    # control words (training -> tracking)
    def send_control(self, kind: Word, *values: int) -> _Pending:
        words = torch.zeros(CONTROL_WORDS, dtype=torch.int64)
        words[0], words[1] = MAGIC, int(kind)
        words[2:2 + len(values)] = torch.tensor(values, dtype=torch.int64)
        work = dist.isend(words, dst=self.peer, group=self.control_group, tag=TAG_CONTROL)
        return self._send.watch([(work, False)], keep=words)

    def post_control(self) -> tuple[Tensor, _Pending]:
        words = torch.zeros(CONTROL_WORDS, dtype=torch.int64)
        work = dist.irecv(words, src=self.peer, group=self.control_group, tag=TAG_CONTROL)
        return words, self._recv.watch([(work, False)])

    # headers and batches (tracking -> training)
    def new_header(self, kind: Word, text: str = "") -> Tensor:
        header = torch.zeros(header_words(self.samples), dtype=torch.int64)
        header[0], header[1] = MAGIC, int(kind)
        data = text.encode()[:TEXT_BYTES]
        header[8] = len(data)
        if data:
            header[-(TEXT_BYTES // 8):].view(torch.uint8)[: len(data)] = torch.frombuffer(bytearray(data),
                                                                                         dtype=torch.uint8)
        return header

    def send_header(self, header: Tensor) -> _Pending:
        work = dist.isend(header, dst=self.peer, group=self.control_group, tag=TAG_HEADER)
        return self._send.watch([(work, False)], keep=header)

    def post_header(self) -> tuple[Tensor, _Pending]:
        header = torch.zeros(header_words(self.samples), dtype=torch.int64)
        work = dist.irecv(header, src=self.peer, group=self.control_group, tag=TAG_HEADER)
        return header, self._recv.watch([(work, False)])

    def send_batch(self, batch: TrainBatch, schema: BatchSchema, *, k: int, position: Position,
                   with_frames: bool) -> _Pending:
        """Send a prepared batch: its header, then its tensors in schema order."""
        sent = {spec.name for spec in schema.tensors} | set(_HOST_FIELDS) | {schema.frames.name}
        items = batch.tensor_items()
        for name, value in items.items():
            if name not in sent and value is not None:
                raise RuntimeError(f"TrainBatch.{name} does not travel to the training ranks: add it to "
                                   f"trackmae_stream/tracks/remote.py's batch_schema")
        header = self.new_header(Word.BATCH)
        header[2], header[3], header[4], header[5] = k, *position
        flags = 0
        if batch.source_index is not None:
            flags |= _FLAG_SOURCE
            header[_FIXED:_FIXED + self.samples] = batch.source_index.reshape(-1)
        if batch.skipped is not None:
            width = batch.skipped.shape[1]
            if width > MAX_SKIP_WIDTH:
                raise RuntimeError(f"`skipped` is {width} wide; the header carries at most {MAX_SKIP_WIDTH}")
            flags |= _FLAG_SKIPPED
            header[7] = width
            start = _FIXED + self.samples
            header[start:start + self.samples * width] = batch.skipped.reshape(-1)
        tensors = []
        for spec in schema.tensors:
            tensors.append(_checked(items.get(spec.name), spec, self.device))
        if with_frames:
            if batch.frames_u8 is None:
                raise RuntimeError("the training rank asked for the picture frames, but the preparer kept none")
            flags |= _FLAG_FRAMES
            tensors.append(_checked(batch.frames_u8, schema.frames, self.device))
        header[6] = flags
        works = [(dist.isend(header, dst=self.peer, group=self.control_group, tag=TAG_HEADER), False)]
        works += [(dist.isend(t, dst=self.peer, group=self.data_group, tag=TAG_TENSORS + i), self._poll)
                  for i, t in enumerate(tensors[: len(schema.tensors)])]
        if with_frames:
            works.append((dist.isend(tensors[-1], dst=self.peer, group=self.data_group, tag=TAG_FRAMES), self._poll))
        return self._send.watch(works, keep=(header, tensors))

    def post_batch(self, schema: BatchSchema, *, k: int, position: Position, with_frames: bool) -> Incoming:
        """Post the receives of one batch (header first, then its tensors, in the sender's order)."""
        header, header_done = self.post_header()
        tensors = {spec.name: torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
                   for spec in schema.tensors}
        works = [(dist.irecv(t, src=self.peer, group=self.data_group, tag=TAG_TENSORS + i), self._poll)
                 for i, t in enumerate(tensors.values())]
        if with_frames:
            frames = torch.empty(schema.frames.shape, dtype=schema.frames.dtype, device=self.device)
            tensors[schema.frames.name] = frames
            works.append((dist.irecv(frames, src=self.peer, group=self.data_group, tag=TAG_FRAMES), self._poll))
        tensors_done = self._recv.watch(works)
        return Incoming(k=k, position=position, with_frames=with_frames, header=header, header_done=header_done,
                        tensors=tensors, tensors_done=tensors_done)

    def close(self) -> None:
        self._recv.close()
        self._send.close()


def _checked(tensor: Tensor | None, spec: TensorSpec, device: torch.device) -> Tensor:
    if tensor is None or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype or \
            tensor.device.type != device.type:
        got = None if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
        raise RuntimeError(f"TrainBatch.{spec.name} is {got}, the batch schema says {spec.shape} {spec.dtype}: "
                           f"update trackmae_stream/tracks/remote.py's batch_schema")
    return tensor.contiguous()


def header_word(header: Tensor) -> Word:
    if int(header[0]) != MAGIC:
        raise RuntimeError(f"a malformed message (word {int(header[0]):#x}): not a tracker.placement=ranks header")
    return Word(int(header[1]))


def header_text(header: Tensor) -> str:
    n = int(header[8])
    return bytes(header[-(TEXT_BYTES // 8):].view(torch.uint8)[:n].tolist()).decode(errors="replace")


def unpack_batch(incoming: Incoming, schema: BatchSchema) -> TrainBatch:
    """The `TrainBatch` of a received batch (its header checked by the caller)."""
    header = incoming.header
    flags = int(header[6])
    if bool(flags & _FLAG_FRAMES) != incoming.with_frames:
        raise RuntimeError("the picture frames were asked for and not sent, or the reverse")
    source_index = skipped = None
    if flags & _FLAG_SOURCE:
        source_index = header[_FIXED:_FIXED + schema.samples].clone()
    if flags & _FLAG_SKIPPED:
        width = int(header[7])
        start = _FIXED + schema.samples
        skipped = header[start:start + schema.samples * width].clone().view(schema.samples, width)
    values: dict[str, Any] = {spec.name: incoming.tensors[spec.name] for spec in schema.tensors}
    values.update(skipped=skipped, source_index=source_index, frames_u8=incoming.tensors.get(schema.frames.name))
    return TrainBatch.from_tensor_items(values)


# ----------------------------------------------------------------------------------------------------------------------
# Training side


@dataclass(frozen=True)
class _Hello:
    batches_per_epoch: int
    num_videos: int
    dropped: int
    dims: dict[str, int]
    validity: dict[str, str]
    tracker_gflop: float | None
    tracker: str | None
    description: str


class _RemoteTracker:
    """The tracker's name and cost for the run log; the tracker itself runs on a tracking rank."""

    def __init__(self, name: str, gflop_per_clip: float | None):
        self.name = name
        self._gflop = gflop_per_clip

    def gflop(self, *args: Any, explicit_queries: bool = False) -> float | None:
        return None if explicit_queries else self._gflop  # the clip grid is what a tracking rank tracks


@dataclass
class RemotePreparer:
    """Stands in for `BatchPreparer` on a training rank: the targets' widths, the masks' sizes, the tracker's name,
    and the trainer's picture question (asked when a batch is requested)."""

    targets: TargetBuilder  # shapes and losses only (built without weights: no CLIP teacher here)
    masks: MaskGenerator
    tracker: _RemoteTracker | None
    picture_step: Callable[[int], bool] | None = None
    track_source: Any = None


class _NoLoader:
    """The training rank's `DataSetup.loader`: the tracking rank loads; this one only knows the epoch's length."""

    def __init__(self, batches_per_epoch: int):
        self.batches_per_epoch = batches_per_epoch

    def resume(self, epoch: int, batch_index: int) -> None:
        pass

    def close(self) -> None:
        pass


class RemoteBatches:
    """A training rank's end of its link to the tracking rank that serves it, for the whole run."""

    def __init__(self, cfg: TrainConfig, world: TrackingWorld):
        self.cfg = cfg
        self.world = world
        self.dist = world.train_info()
        self.peer = world.peer_of(world.rank)
        self.name = f"tracking rank {self.peer}"
        self.device = world.device
        self._link = Link(self.peer, cfg.batch_size, self.device, world.control_group)
        self._hello_in = self._link.post_header()  # posted now: a failed start can still answer it
        self._hello: _Hello | None = None
        self._schema: BatchSchema | None = None
        self._preparer: RemotePreparer | None = None
        self._schedule: Schedule | None = None
        self._incoming: deque[Incoming] = deque()
        self._requested = 0
        self._received = 0
        self._failed = False
        self._closed = False
        dump = os.environ.get(DUMP_ENV)
        self._dump = Path(dump) if dump else None

    # -- start
    def data_setup(self) -> DataSetup:
        """The training rank's `DataSetup`: its shard's length from the tracking rank, the list for the skip
        accounting (the batches carry which videos were decoded and which failed)."""
        hello = self._receive_hello()
        records, _, _ = video_records(self.cfg)
        counter = SkipCounter(records, max_skip_fraction=self.cfg.data.max_skip_fraction,
                              world_size=self.dist.world_size)
        w = self.world
        tracking = f"rank {w.n_train}" if w.n_track == 1 else f"ranks {w.n_train}-{w.n_train + w.n_track - 1}"
        if self.dist.is_main:
            log.info("tracker.placement=ranks: %d training rank(s); decoding and tracking on %s", w.n_train,
                     tracking)
        return DataSetup(loader=_NoLoader(hello.batches_per_epoch), skips=SkipReport(records, counter, hello.dropped),
                         description=f"{hello.description}, on tracking {tracking}", num_videos=hello.num_videos)

    def preparer(self) -> RemotePreparer:
        hello = self._receive_hello()
        cfg = self.cfg
        side = tokens_per_side(cfg)
        masks = MaskGenerator(cfg.mask, tokens_per_frame=side * side,
                              num_slots=cfg.data.num_frames // cfg.model.tubelet_size, seed=cfg.seed,
                              rank=self.dist.rank)
        tracker = _RemoteTracker(hello.tracker, hello.tracker_gflop) if hello.tracker else None
        targets = TargetBuilder(cfg, self.device, needs=masks.needs, load=False)
        if targets.dims != hello.dims:
            raise RuntimeError(f"the tracking rank's target widths {hello.dims} differ from this rank's {targets.dims}")
        self._preparer = RemotePreparer(targets=targets, masks=masks, tracker=tracker)
        return self._preparer

    def _receive_hello(self) -> _Hello:
        if self._hello is not None:
            return self._hello
        header, pending = self._hello_in
        self._wait(pending, _timeout(FIRST_BATCH_TIMEOUT_S), "no word since the start")
        self._check(header, Word.HELLO)
        h = header[9:15].tolist()
        info = json.loads(header_text(header))
        gflop = float(header[14:15].view(torch.float64)[0])
        self._hello = _Hello(batches_per_epoch=h[0], num_videos=h[1], dropped=h[2],
                             dims=info["dims"], validity=info["validity"],
                             tracker_gflop=None if math.isnan(gflop) else gflop, tracker=info["tracker"],
                             description=info["description"])
        self._schema = batch_schema(self.cfg, dims=self._hello.dims, validity=self._hello.validity,
                                    device=self.device)
        return self._hello

    # -- batches
    def prefetcher(self, epoch: int, batch_in_epoch: int, *, step: int, total_steps: int,
                   timer: IntervalTimer) -> RemotePrefetcher:
        """The batches of one epoch of the training loop (the first call sends START)."""
        accum = self.cfg.optim.accum_steps
        if self._schedule is None:
            hello = self._receive_hello()
            self._schedule = Schedule(step, epoch, batch_in_epoch, total_steps, hello.batches_per_epoch, accum)
            self._link.send_control(Word.START, step, epoch, batch_in_epoch, total_steps)
        expected = (epoch, batch_in_epoch, step * accum)
        upcoming = self._incoming[0].position if self._incoming else self._schedule.peek()
        if upcoming is not None and upcoming != expected:
            raise RuntimeError(f"the training loop is at {expected}, the batch schedule at {upcoming}")
        return RemotePrefetcher(self, timer)

    def request_ahead(self) -> None:
        """Post the receives of the next batches and ask for them, up to AHEAD in flight."""
        while len(self._incoming) < AHEAD and self._schedule is not None and len(self._schedule):
            position = self._schedule.pop()
            picture = self._preparer.picture_step if self._preparer is not None else None
            with_frames = bool(picture and picture(position[2]))
            k = self._requested
            # receives first: the request may be answered at once
            self._incoming.append(self._link.post_batch(self._schema, k=k, position=position,
                                                        with_frames=with_frames))
            self._link.send_control(Word.REQUEST, k, *position, int(with_frames))
            self._requested += 1

    def take(self) -> TrainBatch:
        """The next batch of the schedule, waiting for it with a timeout."""
        if not self._incoming:
            self.request_ahead()
        if not self._incoming:
            raise StopIteration
        incoming = self._incoming.popleft()
        self.request_ahead()  # before waiting: the following batches then travel during this step
        timeout = _timeout(FIRST_BATCH_TIMEOUT_S if self._received == 0 else BATCH_TIMEOUT_S)
        batch = self._receive(incoming, timeout)
        self._received += 1
        if self._dump is not None:
            self._dump.mkdir(parents=True, exist_ok=True)
            torch.save({"position": incoming.position, **{k: _cpu(v) for k, v in batch.tensor_items().items()}},
                       self._dump / f"rank{self.dist.rank}_batch{incoming.k:05d}.pt")
        return batch

    def agree(self, error: TrackingRankError | None) -> None:
        """Every training rank learns of a failed batch at the same micro-batch (one integer all-reduced over a CPU
        group), so all of them stop with the message instead of the others failing inside the step's collectives
        with a traceback."""
        if self.dist.world_size > 1:
            flag = torch.tensor([int(error is not None)], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.world.agree_group)
            if int(flag[0]):
                messages: list[Any] = [None] * self.dist.world_size
                dist.all_gather_object(messages, str(error) if error is not None else None,
                                       group=self.world.agree_group)
                if error is None:
                    error = TrackingRankError(next(m for m in messages if m is not None))
        if error is not None:
            # no STOP word then, not even to a healthy tracking rank: this rank's batches asked for ahead may
            # never come (a hung tracking rank), and the connection closing at exit stops it anyway
            self._failed = True
            raise error

    def _receive(self, incoming: Incoming, timeout: float) -> TrainBatch:
        deadline = time.monotonic() + timeout
        self._wait(incoming.header_done, timeout, "no batch", deadline=deadline)
        self._check(incoming.header, Word.BATCH)
        got = (int(incoming.header[2]), *(int(v) for v in incoming.header[3:6]))
        if got != (incoming.k, *incoming.position):
            raise RuntimeError(f"asked {self.name} for batch {incoming.k} at {incoming.position}, got {got}")
        self._wait(incoming.tensors_done, timeout, "a batch's tensors did not arrive", deadline=deadline)
        return unpack_batch(incoming, self._schema)

    def _wait(self, pending: _Pending, timeout: float, what: str, *, deadline: float | None = None) -> None:
        try:
            _await(pending, deadline if deadline is not None else time.monotonic() + timeout)
        except _Timeout:
            self._failed = True
            raise TrackingRankError(f"{self.name} stopped sending batches ({what} within {timeout:.0f} s): check "
                                    f"its log") from None
        except Exception as exc:
            self._failed = True
            raise TrackingRankError(f"{self.name} stopped sending batches ({_reason(exc)}): check its log") from None

    def _check(self, header: Tensor, expected: Word) -> None:
        word = header_word(header)
        if word == Word.ERROR:
            self._failed = True
            raise TrackingRankError(f"{self.name} failed: {header_text(header)}")
        if word != expected:
            raise RuntimeError(f"expected a {expected.name} header from {self.name}, got {word.name}")

    def close(self, stopped_by: str | None = None) -> None:
        """Tell the tracking rank to stop (with the signal's number, 0 for the end of training or an error) and
        receive what was asked for, so no transfer is left half done. Nothing to say to a tracking rank that
        failed."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._failed:
                return
            signum = signal.Signals[stopped_by].value if stopped_by else 0
            if signum:
                _EXIT_CODE[0] = 128 + signum
            stop = self._link.send_control(Word.STOP, signum, self._requested)
            deadline = time.monotonic() + _timeout(BATCH_TIMEOUT_S)
            while self._incoming:
                incoming = self._incoming.popleft()
                _await(incoming.header_done, deadline)
                if header_word(incoming.header) == Word.ERROR:
                    break
                _await(incoming.tensors_done, deadline)
            _await(stop, deadline)
        except (_Timeout, RuntimeError) as exc:
            log.warning("%s did not acknowledge the stop (%s)", self.name, _reason(exc) or "timed out")
        finally:
            self._link.close()


def _cpu(value: Any) -> Any:
    return value.detach().cpu().clone() if isinstance(value, Tensor) else value


class RemotePrefetcher:
    """`StreamingPrefetcher`'s interface over batches prepared on a tracking rank: iteration, `prefetch()` (asks for
    the following batches; `take` has already) and `close()`."""

    def __init__(self, remote: RemoteBatches, timer: IntervalTimer):
        self.remote = remote
        self.timer = timer
        remote.request_ahead()

    def __iter__(self) -> RemotePrefetcher:
        return self

    def __next__(self) -> TrainBatch:
        t0 = time.perf_counter()
        batch = error = None
        try:
            batch = self.remote.take()
        except TrackingRankError as exc:
            error = exc
        self.remote.agree(error)
        self.timer.add("data", time.perf_counter() - t0)
        return batch

    def prefetch(self) -> None:
        self.remote.request_ahead()

    def close(self) -> None:
        # The batches asked for ahead stay in flight: they are the next ones of the schedule (the next epoch's).
        pass


# ----------------------------------------------------------------------------------------------------------------------
# Tracking side


class _Client:
    """A tracking rank's state for one training rank it serves."""

    def __init__(self, cfg: TrainConfig, world: TrackingWorld, train_rank: int):
        self.cfg = cfg
        self.r = train_rank
        self.me = world.rank
        self.link = Link(train_rank, cfg.batch_size, world.device, world.control_group)
        self._control: tuple[Tensor, _Pending] | None = self.link.post_control()  # early: a STOP can come anytime
        self.data: DataSetup | None = None
        self.preparer: BatchPreparer | None = None
        self.schema: BatchSchema | None = None
        self.schedule: Schedule | None = None
        self.ready: deque[tuple[int, Position, TrainBatch]] = deque()
        self.requests: deque[tuple[int, Position, bool]] = deque()
        self.sends: deque[_Pending] = deque()
        self.prepared = 0  # batches prepared so far (the next one's index)
        self.sent = 0
        self.stopping = False
        self.signum = 0
        self._loader_iter: Any = None
        self._loader_at: tuple[int, int] | None = None  # (epoch, batch) the iterator yields next

    @property
    def finished(self) -> bool:
        return self.stopping and not self.requests and not self.sends

    def hello(self) -> None:
        targets, tracker, cfg = self.preparer.targets, self.preparer.tracker, self.cfg
        self.schema = batch_schema(cfg, dims=targets.dims, validity=targets.validity_shapes(),
                                   device=self.link.device)
        gflop = None
        if tracker is not None and hasattr(tracker, "gflop"):
            side = cfg.data.input_size
            gflop = tracker.gflop(cfg.data.num_frames // cfg.model.tubelet_size, tracker_grid_size(cfg) ** 2, side,
                                  side)
        text = json.dumps({"tracker": tracker.name if tracker is not None else None,
                           "description": self.data.description, "dims": targets.dims,
                           "validity": targets.validity_shapes()})
        header = self.link.new_header(Word.HELLO, text)
        header[9:14] = torch.tensor([self.data.batches_per_epoch, self.data.num_videos, self.data.skips.dropped,
                                     -1, -1])  # words 3-4 are unused (the target widths travel in the text)
        header[14:15].view(torch.float64)[0] = math.nan if gflop is None else gflop
        self.sends.append(self.link.send_header(header))

    def error(self, text: str) -> _Pending | None:
        if self.finished:  # the training rank expects nothing more
            return None
        return self.link.send_header(self.link.new_header(Word.ERROR, text))

    def poll(self) -> bool:
        """Read control words, answer requests with prepared batches, release finished sends. True if it did
        anything."""
        busy = False
        while self._control is not None and self._control[1].done.is_set():
            self._on_control()
            busy = True
        while self.requests and self.ready:
            self._send_next()
            busy = True
        while self.sends and self.sends[0].done.is_set():
            pending = self.sends.popleft()
            if pending.error is not None and not self.stopping:
                raise TrackingRankError(f"training rank {self.r} is gone ({_reason(pending.error)}): tracking rank "
                                        f"{self.me} stops")
            busy = True
        return busy

    def _on_control(self) -> None:
        words, pending = self._control
        if pending.error is not None:
            raise TrackingRankError(f"training rank {self.r} is gone ({_reason(pending.error)}): tracking rank "
                                    f"{self.me} stops")
        word = header_word(words)
        values = [int(v) for v in words[2:]]
        if word == Word.START:
            step, epoch, batch, total_steps = values[:4]
            self.schedule = Schedule(step, epoch, batch, total_steps, self.data.batches_per_epoch,
                                     self.cfg.optim.accum_steps)
        elif word == Word.REQUEST:
            k, epoch, batch, micro, with_frames = values[:5]
            if k != self.sent + len(self.requests):
                raise RuntimeError(f"training rank {self.r} asked for batch {k} out of order")
            self.requests.append((k, (epoch, batch, micro), bool(with_frames)))
        elif word == Word.STOP:
            self.stopping, self.signum = True, values[0]
            self._control = None
            return
        else:
            raise RuntimeError(f"unexpected word {word.name} from training rank {self.r}")
        self._control = self.link.post_control()

    @property
    def wants_batch(self) -> bool:
        if self.schedule is None or not len(self.schedule):
            return False
        ahead = 0 if self.stopping else PREPARE_AHEAD
        return len(self.ready) < len(self.requests) + ahead

    def prepare(self) -> None:
        """Prepare the next batch of the schedule, exactly as the training rank would inline."""
        epoch, batch_in_epoch, micro = position = self.schedule.pop()
        if self._loader_at != (epoch, batch_in_epoch):
            self.data.set_position(epoch, batch_in_epoch)
            self._loader_iter = iter(self.data.loader)
        try:
            batch = next(self._loader_iter)
        except StopIteration:
            raise RuntimeError(f"the loader of training rank {self.r} ended before epoch {epoch}, batch "
                               f"{batch_in_epoch}") from None
        self._loader_at = (epoch, batch_in_epoch + 1)
        self.ready.append((self.prepared, position, self.preparer(batch, micro)))
        self.prepared += 1

    def _send_next(self) -> None:
        k, position, with_frames = self.requests.popleft()
        ready_k, ready_position, batch = self.ready.popleft()
        if (k, position) != (ready_k, ready_position):
            raise RuntimeError(f"training rank {self.r} asked for batch {k} at {position}; the schedule has "
                               f"batch {ready_k} at {ready_position}")
        self.sends.append(self.link.send_batch(batch, self.schema, k=k, position=position, with_frames=with_frames))
        self.sent += 1

    def close(self) -> None:
        if self.data is not None:
            self.data.close()
        self.link.close()


def _for_rank(base: BatchPreparer, rank: int) -> BatchPreparer:
    """`base` with masks keyed by `rank`: the tracker and the targets (CoTracker3, a CLIP teacher) are shared."""
    masks = copy.copy(base.masks)
    masks.rank = rank
    preparer = copy.copy(base)
    preparer.masks = masks
    return preparer


def _build(cfg: TrainConfig, world: TrackingWorld, clients: list[_Client]) -> None:
    device = world.device
    for i, client in enumerate(clients):
        # DALI: the tracking rank that serves training rank 0 probes the list first, the others then read its cache;
        # a tracking rank's later loaders read the cache too (no second barrier: ranks may serve unequal counts).
        order = (DistInfo(world.rank - world.n_train, world.n_track, world.info.local_rank, device,
                          group=world.track_group) if i == 0 else DistInfo(0, 1, world.info.local_rank, device))
        client.data = build_data(cfg, order, device, shard=(client.r, world.n_train))
    base = build_batch_preparer(cfg, device, rank=clients[0].r)
    for i, client in enumerate(clients):
        client.preparer = base if i == 0 else _for_rank(base, client.r)
        # Rank 0 pictures some steps: keep the first clip's frames of each of its batches (a small copy) and send
        # them when asked; the other ranks never picture.
        client.preparer.picture_step = (lambda step: True) if client.r == 0 else None


def _fail_hook() -> tuple[str, int] | None:
    value = os.environ.get(FAIL_HOOK_ENV)
    if not value:
        return None
    kind, count = value.split(":")
    return kind, int(count)


def serve_tracking(cfg: TrainConfig, world: TrackingWorld) -> RunSummary:
    """A tracking rank's run: prepare and send the batches of the training ranks it serves until each says stop.
    Returns a RunSummary (not the main rank's: it prints nothing) whose `stopped_by` is the training ranks' signal."""
    from ..engine import RunSummary, setup_logging  # the engine imports this module lazily

    setup_logging(False)
    # Handlers only (no group): the first SIGTERM is the training ranks' to act on; their STOP word ends this loop
    # once they have what they need to finish the step. A second signal exits at once.
    stop = StopSignal(DistInfo(world.rank, 1, world.info.local_rank, world.device))
    clients = [_Client(cfg, world, r) for r in world.served()]
    try:
        try:
            _build(cfg, world, clients)
            for client in clients:
                client.hello()
            _serve(clients, stop)
        except BaseException as exc:
            _report(clients, f"{exc}" if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc} (traceback "
                                                                          "in its log)")
            raise
    finally:
        stop.restore()
        for client in clients:
            client.close()
        shutdown(world.info)
    signum = max((c.signum for c in clients), default=0)
    _EXIT_CODE[0] = 128 + signum if signum else 0
    return RunSummary(run_dir=Path(cfg.output_dir), step=0, epoch=0, losses=[], last_checkpoint=None,
                      skipped_videos=0, is_main=False, stopped_by=signal.Signals(signum).name if signum else None)


def _serve(clients: list[_Client], stop: StopSignal) -> None:
    hook = _fail_hook()
    while not all(c.finished for c in clients):
        busy = False
        for client in clients:
            busy |= client.poll()
        if hook is not None and sum(c.sent for c in clients) >= hook[1]:
            _run_hook(hook[0], stop)
        # whoever waits for a batch first, then whoever has the fewest prepared
        candidates = [c for c in clients if c.wants_batch]
        if candidates:
            min(candidates, key=lambda c: (len(c.ready) >= len(c.requests), len(c.ready))).prepare()
            busy = True
        if not busy:
            time.sleep(0.001)


def _run_hook(kind: str, stop: StopSignal) -> None:
    if kind == "exit":
        print("test hook: the tracking rank exits", flush=True)
        os._exit(1)
    if kind == "error":
        raise UserError("test hook: the tracking rank fails")
    while stop.received is None:  # hang: answer nothing until a signal (torchrun's, when the others have stopped)
        time.sleep(0.05)
    os._exit(128 + stop.received)


def _report(clients: list[_Client], text: str) -> None:
    """Send a failure's message to the training ranks in place of their next batch, and give them a moment to read
    it before this process exits (which closes the connections)."""
    pending = []
    for client in clients:
        try:
            p = client.error(f"{text}")
        except Exception:  # noqa: BLE001 - the link itself may be what failed
            p = None
        if p is not None:
            pending.append(p)
    deadline = time.monotonic() + ERROR_GRACE_S
    for p in pending:
        try:
            _await(p, deadline)
        except Exception:  # noqa: BLE001 - best effort: the training ranks then see the closed connection
            break


__all__ = ["AHEAD", "BATCH_TIMEOUT_S", "FIRST_BATCH_TIMEOUT_S", "BatchSchema", "Link", "RemoteBatches",
           "RemotePrefetcher", "Schedule", "TensorSpec", "TrackingRankError", "TrackingWorld", "Word",
           "batch_schema", "join_world", "serve_tracking", "unpack_batch"]
