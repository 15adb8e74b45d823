"""The TrackMAE training loop.

Host syncs happen only at log intervals, at checkpoints and at the end: losses, the non-finite flag and the timing are
accumulated on the device between them. Resume restores model, optimizer, scaler, step, data position and RNG
states; masks and augmentations are keyed by (seed, epoch/step, index), so a resumed run repeats the uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from . import __version__, kernels
from .checkpoint import CheckpointManager, capture_rng_state, load_checkpoint, restore_rng_state
from .config import ConfigError, TrainConfig, config_from_dict, save_config, to_dict, tracker_grid_size
from .data_setup import DataSetup, build_data
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, init_distributed, shutdown
from .errors import UserError
from .masking import LearnedMaskPolicy, MaskInputs
from .metrics import IntervalTimer, MetricLogger, format_record, memory_gib, peak_tflops
from .model import HeadSpec, TrackMAE, TrackMAEShape, count_parameters, describe, forward_flops, resolve_backend
from .optim import CosineSchedule, build_optimizer, peak_lr, set_lr
from .pipeline import StreamingPrefetcher, TrainBatch, build_batch_preparer
from .run_folder import (
    RunChoice,
    RunFolderError,
    choose_run,
    config_changes,
    discard_failed_start,
    identity_diff,
    identity_hash,
    remove_stale_temporaries,
    run_identity,
)
from .stop_signal import StopSignal
from .targets import TargetBuilder

if TYPE_CHECKING:
    from .tracks.remote import RemoteBatches

log = logging.getLogger("trackmae_stream")


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; the message names the step. No checkpoint is written after it."""


@dataclass
class RunSummary:
    run_dir: Path
    step: int
    epoch: int
    losses: list[float]
    last_checkpoint: Path | None
    skipped_videos: int
    is_main: bool = True  # rank 0: the one that reports
    stopped_by: str | None = None  # the signal's name when a SIGTERM / SIGINT stopped the run early


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (not the stream of the first call: a caller that
    swaps stderr, as pytest's capture does per test, would leave the handler writing to a closed file)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    root = logging.getLogger()
    if not any(getattr(h, "_trackmae", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._trackmae = True
        root.addHandler(handler)
    root.setLevel(level)


def head_specs(cfg: TrainConfig, dims: dict[str, int]) -> tuple[HeadSpec, ...]:
    """One head per enabled target (`cfg.target`), with the widths `dims` (name -> values per token)."""
    return tuple(HeadSpec(name=name, dim=dims[name], decoder=entry["decoder"], head=entry["head"],
                          hidden=entry["head_hidden"], activation=entry["activation"])
                 for name, entry in cfg.target.enabled().items())


def build_model(cfg: TrainConfig, targets: TargetBuilder) -> TrackMAE:
    """The network of a config; `targets` gives the heads' widths (`targets.dims`, name -> values per token)."""
    m = cfg.model
    shape = TrackMAEShape(num_frames=cfg.data.num_frames, input_size=cfg.data.input_size, patch_size=m.patch_size,
                          tubelet_size=m.tubelet_size, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                          decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
                          mlp_ratio=m.mlp_ratio, heads=head_specs(cfg, targets.dims), drop_path=m.drop_path)
    return TrackMAE(shape)


def compute_losses(pred: dict[str, Tensor], batch: TrainBatch, targets: TargetBuilder) -> dict[str, Tensor]:
    """L = Σ_target weight · L_target over the masked tokens, each target's loss by its own `Target.loss` (mean
    squared error by default, over its valid values when it declares a validity; float32).

    Also returns each target's `zero_<name>`: the loss of predicting zeros. Normalised targets make that trivial
    solution sit near 1 (pixels) or 0.75 (motion, 4 points with unbiased std), so a falling loss only shows learning
    once it drops below it; the log reports the ratio (`rel_<name>`). `token_error` (B, M): the weighted per-token
    error, detached (what a learned mask policy is rewarded or trained with).
    """
    losses: dict[str, Tensor] = {}
    total = token_error = None
    for name, target in targets.targets.items():
        part = target.loss(pred[name], batch.targets[name], batch.valid.get(name))
        weight = targets.weights[name]
        losses[f"loss_{name}"] = part.loss
        losses[f"zero_{name}"] = part.zero
        total = weight * part.loss if total is None else total + weight * part.loss
        token_error = weight * part.token_error if token_error is None else token_error + weight * part.token_error
    losses["loss"] = total
    losses["token_error"] = token_error
    return losses


class Trainer:
    def __init__(self, cfg: TrainConfig, remote: RemoteBatches | None = None):
        self.cfg = cfg
        # tracker.placement=ranks: batches come prepared from a tracking rank; `dist` then counts training ranks only
        self.remote = remote
        self.dist: DistInfo = remote.dist if remote is not None else init_distributed(cfg.device)
        setup_logging(self.dist.is_main)
        self.device = self.dist.device
        cuda = self.device.type == "cuda"
        if cuda and cfg.tf32:  # fp32 matmuls outside autocast (tracker, teacher) on tensor cores
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.run = self._choose_run()
        self.run_dir = self.run.run_dir
        self.logger = MetricLogger(self.run_dir, self.dist.is_main, cfg.tensorboard)
        try:
            self._build()
        except BaseException:
            # A start that fails (bad list, tracker checkpoint, ...) leaves no empty run folder behind.
            self.logger.close()
            if self.dist.is_main:
                discard_failed_start(self.run)
            raise

    def _build(self) -> None:
        cfg = self.cfg
        cuda = self.device.type == "cuda"
        self.ckpt = CheckpointManager(self.run_dir, keep=cfg.keep_checkpoints)
        self.identity = run_identity(cfg)

        # data
        self.data: DataSetup = (self.remote.data_setup() if self.remote is not None
                                else build_data(cfg, self.dist, self.device))
        accum = cfg.optim.accum_steps
        if self.data.batches_per_epoch < accum:
            raise ConfigError(f"optim.accum_steps={accum}: an epoch has only {self.data.batches_per_epoch} batches "
                              f"per rank, so no optimizer step would ever happen; lower it or batch_size")
        self.steps_per_epoch = self.data.batches_per_epoch // accum
        self.total_steps = cfg.optim.max_steps or cfg.optim.epochs * self.steps_per_epoch

        # tracking, targets, masks
        self.preparer = (self.remote.preparer() if self.remote is not None  # no tracker here: shapes and names only
                         else build_batch_preparer(cfg, self.device, rank=self.dist.rank))
        if self.dist.is_main:  # pictures come from rank 0's first clip; other ranks keep no frames
            self.preparer.picture_step = self._pictured_micro_batch
        self._picture: tuple[TrainBatch, dict[str, Tensor]] | None = None
        self._store_seen = (0, 0)  # store hits and misses up to the last log interval
        self.targets, self.masks, self.tracker = self.preparer.targets, self.preparer.masks, self.preparer.tracker
        # One preparation stream for the whole run: the caching allocator keeps a pool per stream.
        self.side_stream = torch.cuda.Stream(self.device) if cuda and cfg.tracker.overlap else None

        # model and optimisation
        model = build_model(cfg, self.targets)
        self.shape = model.shape
        self.attention_backend = resolve_backend(cfg.model.attention, self.device)
        model.set_attention_backend(self.attention_backend)
        model.set_activation_checkpointing(cfg.model.activation_checkpointing)
        model.to(self.device)
        self.global_batch = cfg.batch_size * cfg.data.num_sample * self.dist.world_size * accum
        lr = peak_lr(cfg.optim, self.global_batch)
        warmup = (cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None
                  else round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        self.schedule = CosineSchedule(lr, min(cfg.optim.min_lr, lr), min(warmup, self.total_steps), self.total_steps)
        self.optimizer = build_optimizer(model, cfg.optim, lr)
        if isinstance(self.masks.policy, LearnedMaskPolicy):  # its own parameters and optimizer
            self.masks.policy.setup(self.device)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) if cuda else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and cfg.precision == "fp16")
        self.raw_model = model
        if self.dist.world_size > 1:
            # The only buffers are the fixed sin-cos tables: nothing to broadcast every step.
            model = DistributedDataParallel(model, device_ids=[self.device.index] if cuda else None,
                                            broadcast_buffers=False, process_group=self.dist.group)
            if hasattr(model, "_set_ddp_runtime_logging_sample_rate"):
                # DDP's sampled runtime stats wait on CUDA events (a host sync before forward every 100 steps)
                model._set_ddp_runtime_logging_sample_rate(2 ** 31 - 1)
        if cfg.model.compile:
            model = torch.compile(model)
        self.model = model

        # progress
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches consumed in the current epoch
        self.last_checkpoint: Path | None = None
        self.loss_history: list[float] = []
        self.skipped_videos = 0  # over all ranks, as of the last log interval
        self.stopped_by: str | None = None
        self._resume()
        if self.dist.is_main:  # after the resume check: a refused resume must not overwrite the run's config
            save_config(cfg, self.run_dir / "config.yaml")
        self.flops_per_clip = 3.0 * forward_flops(self.shape, self.masks.num_visible)
        self.peak = peak_tflops(self.device, cfg.peak_tflops)

    # ------------------------------------------------------------------------------------------------------------
    def _choose_run(self) -> RunChoice:
        """Rank 0 decides the run folder and the checkpoint to resume; every rank gets the decision or the error."""
        choice, error = None, None
        if self.dist.is_main:
            try:
                choice = choose_run(self.cfg)
                removed = remove_stale_temporaries(choice.run_dir)
                if removed:
                    log.info("removed %d temporary file(s) left by an interrupted checkpoint write", removed)
            except UserError as exc:
                error = str(exc)
        choice, error = broadcast_object((choice, error), self.dist)
        if error is not None:
            raise RunFolderError(error)
        for note in choice.notes:
            log.info("resume=auto: %s", note)
        return choice

    def _resume(self) -> None:
        cfg, path = self.cfg, self.run.checkpoint
        if path is None:
            if cfg.resume == "auto":
                log.info("resume=auto: no readable checkpoint in %s, starting fresh", self.ckpt.dir)
            return
        state = load_checkpoint(path, map_location="cpu")
        saved_cfg = state["config"]
        saved_identity = run_identity(config_from_dict(saved_cfg, check=False))
        if saved_identity != self.identity:
            diff = "; ".join(identity_diff(saved_identity, self.identity))
            if cfg.resume == "auto":
                raise RunFolderError(f"--resume auto: {path} was trained with other settings ({diff})")
            log.warning("resuming %s under other settings than it was trained with: %s", path, diff)
        changes = config_changes(saved_cfg, to_dict(cfg))
        for change in changes:
            log.info("resume: %s (allowed: does not change what the weights mean)", change)
        self.load_state(state, path)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)
        self.logger.rewind(self.step)  # records past the checkpoint belong to the interrupted attempt
        self.logger.event({"event": "resume", "checkpoint": str(path), "step": self.step, "changes": changes})

    def load_state(self, state: dict[str, Any], path: Path) -> None:
        from .model.adapters import former_optimizer_state, is_former_layout, load_model_state

        load_model_state(self.raw_model, state["model"], source=str(path))
        optimizer_state = state["optimizer"]
        if is_former_layout(state["model"]):  # a checkpoint from before targets were plug-ins: re-index by name
            optimizer_state = former_optimizer_state(optimizer_state, state["model"], self.raw_model)
        self.optimizer.load_state_dict(optimizer_state)
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        saved_schedule = state.get("scheduler")
        if saved_schedule is not None and saved_schedule != dataclasses.asdict(self.schedule):
            log.warning("%s was trained with the schedule %s; continuing with %s (changed epochs, lr or batch?)", path,
                        saved_schedule, dataclasses.asdict(self.schedule))
        if self.masks.learned:
            if "mask_policy" not in state:
                raise ConfigError(f"mask.type={self.cfg.mask.type!r}: {path} holds no learned mask policy state")
            self.masks.policy.load_policy_state(state["mask_policy"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.loss_history = list(state.get("loss_history", []))
        per_rank = state["rng"].get("per_rank", [])
        if len(per_rank) == self.dist.world_size:
            restore_rng_state(per_rank[self.dist.rank]["rng"])
            self.data.skips.load_state_dict(per_rank[self.dist.rank]["skips"])
        else:
            log.warning("%s holds the state of %d ranks, this run has %d: RNG streams and skip counts restart", path,
                        len(per_rank), self.dist.world_size)

    def state_dict(self) -> dict[str, Any]:
        mine = {"rng": capture_rng_state(), "skips": self.data.skips.state_dict()}
        if self.dist.world_size > 1:
            per_rank = [None] * self.dist.world_size
            torch.distributed.all_gather_object(per_rank, mine, group=self.dist.group)
        else:
            per_rank = [mine]
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": dataclasses.asdict(self.schedule),  # stateless (a function of the step); kept to compare
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "config": to_dict(self.cfg),
            "rng": {"per_rank": per_rank},  # RNG states and skip counters, one entry per rank
            "loss_history": self.loss_history,
            # a learned mask policy: its parameters, optimizer and extra state (the same on every rank)
            **({"mask_policy": self.masks.policy.policy_state()} if self.masks.learned else {}),
            "identity": identity_hash(self.identity),
            "format": "trackmae_stream",
            "version": __version__,
        }

    def save_checkpoint(self) -> Path | None:
        state = self.state_dict()  # collective on all ranks (per-rank state gather)
        path = None
        if self.dist.is_main:
            path = self.ckpt.save(self.step, state)
            log.info("checkpoint %s", path)
        barrier(self.dist)
        self.last_checkpoint = path
        return path

    # ------------------------------------------------------------------------------------------------------------
    def _log_header(self) -> None:
        cfg = self.cfg
        tracker = self.tracker.name if self.tracker is not None else "none (tube masking, no motion target)"
        info = {
            "event": "start", "version": __version__, "run_dir": str(self.run_dir), "device": str(self.device),
            "world_size": self.dist.world_size, "tracker": tracker, "attention": self.attention_backend,
            "kernels": kernels.default_backend(self.device), "model": describe(self.shape),
            "parameters": count_parameters(self.raw_model), "global_batch": self.global_batch,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "peak_lr": self.schedule.peak_lr,
            "visible_tokens": self.masks.num_visible, "train_gflop_per_clip": self.flops_per_clip / 1e9,
            "targets": dict(self.targets.weights), "mask_policy": cfg.mask.type,
            "data": self.data.description, "videos": self.data.num_videos, "identity": identity_hash(self.identity),
        }
        if self.tracker is not None:
            info["tracker_grid"] = tracker_grid_size(cfg)
        self.logger.event(info)
        log.info("run folder %s", self.run_dir)
        log.info("tracker: %s | attention: %s | kernels: %s | %s | %.1fM parameters", tracker,
                 self.attention_backend, info["kernels"], info["model"], info["parameters"] / 1e6)
        log.info("data: %s (%d videos), %d steps/epoch, %d steps, global batch %d, peak lr %.3g",
                 self.data.description, self.data.num_videos, self.steps_per_epoch, self.total_steps,
                 self.global_batch, self.schedule.peak_lr)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    def train(self) -> RunSummary:
        cfg = self.cfg
        self._log_header()
        if self.step >= self.total_steps:
            log.info("nothing to do: step %d >= total steps %d", self.step, self.total_steps)
            return self._summary()
        accum = cfg.optim.accum_steps
        # Preemption: SIGTERM / SIGINT finish the step, write a checkpoint and stop; ranks agree over a CPU group.
        self.stop = StopSignal(self.dist)
        policy_keys = [f"mask_{k}" for k in getattr(self.masks.policy, "log_keys", ())]
        state = _IntervalState(self.device, self.targets.names, policy_keys)
        progress = None
        if cfg.progress and self.dist.is_main:
            from tqdm import tqdm

            # no monitor thread: DataLoader workers fork from this process every epoch, and forking a process whose
            # other threads may hold locks is how worker start-up hangs
            tqdm.monitor_interval = 0
            progress = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)
        try:
            while self.step < self.total_steps:
                if self.batch_in_epoch + accum > self.data.batches_per_epoch:  # the tail (< accum batches) is dropped
                    self.epoch += 1
                    self.batch_in_epoch = 0
                self.data.set_position(self.epoch, self.batch_in_epoch)
                if self.remote is not None:  # prepared on a tracking rank, received while the step runs
                    batches = self.remote.prefetcher(self.epoch, self.batch_in_epoch, step=self.step,
                                                     total_steps=self.total_steps, timer=state.timer)
                else:
                    batches = StreamingPrefetcher(self.data.loader, self.preparer, start_step=self.step * accum,
                                                  timer=state.timer, stream=self.side_stream)
                self.model.train()
                try:
                    while self.step < self.total_steps and self.batch_in_epoch + accum <= self.data.batches_per_epoch:
                        self._train_step(batches, state)
                        if self._picture is not None:
                            t0 = time.perf_counter()
                            self._draw_picture()
                            state.timer.exclude(time.perf_counter() - t0)  # a host sync; not training time
                        if progress is not None:
                            progress.update(1)
                        if (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                            record = self._log_interval(state)
                            if progress is not None:
                                progress.set_postfix(loss=f"{record['loss']:.4f}",
                                                     clips_s=f"{record['clips_per_s']:.1f}")
                        if self.step % cfg.ckpt_every == 0 and self.step < self.total_steps:
                            t0 = time.perf_counter()
                            self._check_finite(state.first_bad_step)
                            self.save_checkpoint()
                            state.timer.exclude(time.perf_counter() - t0)  # checkpoint I/O is not training time
                        self.stopped_by = self.stop.agreed()
                        if self.stopped_by is not None:
                            if state.steps:  # the partial interval's record, before the checkpoint below
                                self._log_interval(state)
                            break
                finally:
                    batches.close()
                if self.stopped_by is not None:
                    if self.dist.is_main:
                        log.warning("%s: stopping after step %d with a checkpoint (a second signal exits at once)",
                                    self.stopped_by, self.step)
                    break
            self._check_finite(state.first_bad_step)
            if self.last_checkpoint is None or self.ckpt.path_for(self.step) != self.last_checkpoint:
                self.save_checkpoint()
        finally:
            self.stop.restore()
            if progress is not None:
                progress.close()
        summary = self._summary()
        self.logger.event({"event": "stopped" if self.stopped_by else "end", "signal": self.stopped_by,
                           "step": self.step, "epoch": self.epoch, "checkpoint": str(summary.last_checkpoint),
                           "skipped_videos": summary.skipped_videos})
        return summary

    def _train_step(self, batches: StreamingPrefetcher, state: _IntervalState) -> None:
        """One optimizer step over `accum_steps` micro-batches; no host sync."""
        cfg = self.cfg
        accum = cfg.optim.accum_steps
        policy = self.masks.policy if self.masks.learned else None
        set_lr(self.optimizer, self.schedule(self.step))
        t_step = time.perf_counter()
        loss_nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        for micro in range(accum):
            batch = next(batches)
            self.data.skips.update(batch.skipped, batch.source_index)
            clips = batch.num_clips  # loader clips (a learned policy may train several masked copies of each)
            last = micro == accum - 1
            sync_ctx = self.model.no_sync() if not last and hasattr(self.model, "no_sync") else contextlib.nullcontext()
            with sync_ctx:
                with self._autocast():
                    if policy is not None:  # a learned policy draws the masks here, from the current embeddings
                        tokens = self.raw_model.encoder.patch_embed.embed_patches(batch.patches)
                        mask, aux = policy.sample(MaskInputs(step=self.step * accum + micro, batch=batch.num_clips,
                                                             device=self.device, side=batch.side, tokens=tokens))
                        batch = batch.select(mask)
                    pred = self.model(batch.patches, batch.visible_idx, batch.masked_idx)
                    losses = compute_losses(pred, batch, self.targets)
                    total = losses["loss"]
                    if policy is not None:
                        extra = policy.mae_loss(aux, losses["token_error"], mask)
                        if extra is not None:
                            total = total + extra
                self.scaler.scale(total / accum).backward()
            if policy is not None:  # its own optimizer; no host sync
                losses.update({f"mask_{k}": v for k, v in policy.update(aux, losses["token_error"], mask,
                                                                          self.step).items()})
            state.add_losses(losses, accum)
            loss_nonfinite |= ~torch.isfinite(losses["loss"].detach())
            state.timer.clips += clips
            self.batch_in_epoch += 1
            batches.prefetch()  # this micro-batch's kernels are queued: now fetch and launch the next one's prep
        if batch.frames_u8 is not None:  # a pictured step: keep what the picture needs (drawn after the step)
            self._picture = batch, {k: v.detach() for k, v in pred.items()}
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        self.scaler.unscale_(self.optimizer)  # no-op unless fp16
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if cfg.optim.clip_grad is not None:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.clip_grad, grad_norm, foreach=True)
        # With a GradScaler an inf gradient is routine (the step is skipped); otherwise it poisons the weights.
        bad = loss_nonfinite if self.scaler.is_enabled() else loss_nonfinite | ~torch.isfinite(grad_norm)
        state.flag_nonfinite(bad, self.step)
        state.grad_norm_sum += grad_norm.detach().double()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        state.steps += 1
        state.timer.steps += 1
        state.timer.add("step", time.perf_counter() - t_step)

    def _pictured_step(self, step: int) -> bool:
        """Optimizer step (counted from 1) that gets a picture: every `visualize_every`, and always the last."""
        every = self.cfg.visualize_every
        return step == self.total_steps or (every > 0 and step % every == 0)

    def _pictured_micro_batch(self, index: int) -> bool:
        """The preparer's question for micro-batch `index`: is it the last micro-batch of a pictured step?"""
        accum = self.cfg.optim.accum_steps
        return (index + 1) % accum == 0 and self._pictured_step((index + 1) // accum)

    def _draw_picture(self) -> None:
        """Input frames, mask, pixel reconstruction and motion target vs prediction of one clip, to TensorBoard and
        `<run>/pictures/step_<step>.png` (rank 0)."""
        from .visuals import add_to_tensorboard, render_batch, write_png

        batch, pred = self._picture
        self._picture = None
        image = render_batch(self.cfg, batch.frames_u8, batch, pred, clip=0)
        path = write_png(self.run_dir / "pictures" / f"step_{self.step:07d}.png", image)
        add_to_tensorboard(self.logger.writer, "train/pictures", image, self.step)
        log.info("picture %s", path)

    def _check_finite(self, first_bad_step: Tensor) -> None:
        """Every rank takes the same decision: the earliest non-finite step over all ranks (-1 = none)."""
        flag = first_bad_step.clone()
        flag = torch.where(flag < 0, torch.full_like(flag, torch.iinfo(torch.long).max), flag)
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self.dist.group)
        bad = int(flag.item())
        if bad != torch.iinfo(torch.long).max:
            self.logger.event({"event": "nonfinite", "step": bad + 1, "last_checkpoint": str(self.last_checkpoint)})
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {bad + 1}: stopping without writing a checkpoint (the last "
                f"good one is {self.last_checkpoint or 'none'}); lower optim.lr or enable optim.clip_grad")

    def _log_interval(self, state: _IntervalState) -> dict[str, Any]:
        """The one host sync of an interval: wall time, reduced losses, skips, memory."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timer = state.timer
        wall = timer.elapsed()
        self._check_finite(state.first_bad_step)
        values = state.reduced_losses(self.dist)
        skips = self.data.skips.reduce(self.dist)
        self.skipped_videos = skips.num_skipped_videos + self.data.skips.dropped
        clips_per_s = timer.clips * self.dist.world_size / wall if wall > 0 else float("nan")
        record: dict[str, Any] = {
            "step": self.step, "epoch": self.epoch, **values, "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(state.grad_norm_sum) / max(1, state.steps),
            "clips_per_s": clips_per_s, "step_time_s": wall / max(1, timer.steps),
            "data_wait": timer.buckets.get("data", 0.0) / wall if wall > 0 else 0.0,
            # host time spent issuing the preparation (tracking, targets); on CUDA it runs on the side stream
            "prepare_host_share": timer.buckets.get("prepare", 0.0) / wall if wall > 0 else 0.0,
            "skipped_videos": self.skipped_videos, "skip_events": skips.num_skip_events,
            "mem_gib": memory_gib(self.device),
        }
        if self.peak is not None:
            record["mfu"] = self.flops_per_clip * clips_per_s / self.dist.world_size / (self.peak * 1e12)
        record.update(self._tracking_cost(timer.clips))
        self.loss_history.append(values["loss"])
        self.logger.log(record)
        if self.dist.is_main:
            log.info(format_record(record))
        skips.check()  # the merged counter: every rank raises or none does
        state.reset()
        return record

    def _tracking_cost(self, clips: int) -> dict[str, Any]:
        """What tracking cost this interval, over all ranks: the tracker GFLOP per trained clip (inline: every clip
        is tracked; store: only the misses, on the store grid) and, with the store, its hits and misses."""
        if self.tracker is None:
            return {}
        cfg = self.cfg
        slots = cfg.data.num_frames // cfg.model.tubelet_size
        source = self.preparer.track_source
        if getattr(source, "stats", None) is None:  # tracked inline (or computed: synthetic_gt), not stored
            side = cfg.data.input_size
            gflop = self.tracker.gflop(slots, tracker_grid_size(cfg) ** 2, side, side)
            return {} if gflop is None else {"tracker_gflop_per_clip": gflop}
        hits, misses = source.stats["hits"], source.stats["misses"]
        seen_hits, seen_misses = self._store_seen
        self._store_seen = hits, misses
        counts = torch.tensor([hits - seen_hits, misses - seen_misses, clips], dtype=torch.float64, device=self.device)
        hits, misses, clips = (int(v) for v in all_reduce_sum(counts, self.dist).tolist())
        out: dict[str, Any] = {"store_hits": hits, "store_misses": misses}
        size = cfg.tracker.store_size
        gflop = self.tracker.gflop(slots, cfg.tracker.store_grid ** 2, size, size, explicit_queries=True)
        if gflop is not None:
            out["tracker_gflop_per_clip"] = gflop * misses / max(1, clips)
        return out

    def _summary(self) -> RunSummary:
        return RunSummary(run_dir=self.run_dir, step=self.step, epoch=self.epoch, losses=list(self.loss_history),
                          last_checkpoint=self.last_checkpoint, skipped_videos=self.skipped_videos,
                          is_main=self.dist.is_main, stopped_by=self.stopped_by)

    def close(self) -> None:
        if self.remote is not None:  # tell the tracking rank to stop (and why) before the groups go away
            self.remote.close(self.stopped_by)
        self.data.close()
        self.logger.close()
        shutdown(self.dist)


class _IntervalState:
    """What accumulates on the device between log intervals (losses, grad norms, the first non-finite step) and
    the host timer; nothing here synchronises."""

    def __init__(self, device: torch.device, targets: list[str], extra: list[str] | None = None):
        self.targets = list(targets)
        self.keys = ["loss"] + [f"{kind}_{name}" for name in targets for kind in ("loss", "zero")] + list(extra or [])
        self.loss_sum = torch.zeros(len(self.keys), device=device, dtype=torch.float64)
        self.grad_norm_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
        self.timer = IntervalTimer()
        self.steps = 0

    def add_losses(self, losses: dict[str, Tensor], accum: int) -> None:
        self.loss_sum += torch.stack([losses[k].detach() for k in self.keys]).double() / accum

    def flag_nonfinite(self, bad: Tensor, step: int) -> None:
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), torch.full_like(self.first_bad_step, step),
                                          self.first_bad_step)

    def reduced_losses(self, dist: DistInfo) -> dict[str, float]:
        totals = all_reduce_sum(self.loss_sum.clone(), dist) / (max(1, self.steps) * dist.world_size)
        values = dict(zip(self.keys, totals.tolist()))
        for name in self.targets:  # loss relative to predicting zeros: < 1 means the model learned something
            if f"zero_{name}" in values:
                values[f"rel_{name}"] = values[f"loss_{name}"] / max(values.pop(f"zero_{name}"), 1e-12)
        return values

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self.steps = 0
        self.timer.reset()


def train(cfg: TrainConfig) -> RunSummary:
    remote = None
    if cfg.tracker.placement == "ranks":  # the last tracker.tracking_ranks ranks decode and track for the others
        from .tracks.remote import RemoteBatches, join_world, serve_tracking

        world = join_world(cfg)
        if world.is_tracking:
            return serve_tracking(cfg, world)
        remote = RemoteBatches(cfg, world)
    try:
        trainer = Trainer(cfg, remote=remote)
    except BaseException:
        if remote is not None:  # the tracking rank waits for a start or stop word
            remote.close()
            shutdown(remote.dist)
        raise
    try:
        return trainer.train()
    finally:
        trainer.close()


__all__ = ["Trainer", "train", "RunSummary", "NonFiniteLossError", "compute_losses", "build_model"]
