"""The TrackMAE training loop.

Host syncs happen only at log intervals, at checkpoints and at the end: losses, the non-finite flag and the timing are
accumulated on the device between them. Resume restores model, optimizer, scaler, step, data position and RNG
states; masks and augmentations are keyed by (seed, epoch/step, index), so a resumed run repeats the uninterrupted one.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import __version__
from .checkpoint import CheckpointManager, capture_rng_state, load_checkpoint, restore_rng_state
from .config import TrainConfig, motion_weight, save_config, to_dict, tokens_per_side, tracker_grid_size
from .data_setup import DataSetup, build_data
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, init_distributed, shutdown
from .masking import MaskGenerator
from .metrics import IntervalTimer, MetricLogger, format_record, memory_gib, peak_tflops
from .model import TrackMAE, TrackMAEShape, count_parameters, describe, forward_flops, resolve_backend
from .optim import CosineSchedule, build_optimizer, peak_lr, set_lr
from .pipeline import BatchPreparer, StreamingPrefetcher, TrainBatch
from .targets import TargetBuilder
from .tracking import build_tracker

log = logging.getLogger("trackmae_stream")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step. No checkpoint is written after it."""


@dataclass
class RunSummary:
    run_dir: Path
    step: int
    epoch: int
    losses: list[float]
    last_checkpoint: Path | None
    skipped_videos: int


def setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    root = logging.getLogger()
    if not any(getattr(h, "_trackmae", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._trackmae = True
        root.addHandler(handler)
    root.setLevel(level)


def build_model(cfg: TrainConfig, targets: TargetBuilder) -> TrackMAE:
    m = cfg.model
    shape = TrackMAEShape(num_frames=cfg.data.num_frames, input_size=cfg.data.input_size, patch_size=m.patch_size,
                          tubelet_size=m.tubelet_size, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                          decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
                          mlp_ratio=m.mlp_ratio, spatial_dim=targets.spatial_dim, motion_dim=targets.motion_dim,
                          drop_path=m.drop_path)
    return TrackMAE(shape)


def compute_losses(pred: dict[str, Tensor], batch: TrainBatch, lam: float) -> dict[str, Tensor]:
    """MSE over the masked tokens: L = L_spatial + λ · L_motion (computed in float32).

    Also returns each target's mean square (`zero_*`): the loss of predicting zeros. Normalised targets make that
    trivial solution sit near 1 (pixels) or 0.75 (motion, 4 points with unbiased std), so a falling loss only shows
    learning once it drops below it; the log reports the ratio.
    """
    losses: dict[str, Tensor] = {}
    total = None
    for name, target, weight in (("spatial", batch.spatial_target, 1.0), ("motion", batch.motion_target, lam)):
        if target is None:
            continue
        target = target.float()
        losses[f"loss_{name}"] = F.mse_loss(pred[name].float(), target)
        losses[f"zero_{name}"] = target.detach().square().mean()
        term = weight * losses[f"loss_{name}"]
        total = term if total is None else total + term
    losses["loss"] = total
    return losses


def _unwrap(model: nn.Module) -> TrackMAE:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.device)
        setup_logging(self.dist.is_main)
        self.device = self.dist.device
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.run_dir = self._resolve_run_dir()
        self.logger = MetricLogger(self.run_dir, self.dist.is_main, cfg.tensorboard)
        self.ckpt = CheckpointManager(self.run_dir, keep=cfg.keep_checkpoints)
        if self.dist.is_main:
            save_config(cfg, self.run_dir / "config.yaml")

        # data
        self.data: DataSetup = build_data(cfg, self.dist, self.device)
        self.steps_per_epoch = max(1, self.data.batches_per_epoch // cfg.optim.accum_steps)
        self.total_steps = cfg.optim.max_steps or cfg.optim.epochs * self.steps_per_epoch

        # tracking, targets, masks
        self.targets = TargetBuilder(cfg).to(self.device)
        side = tokens_per_side(cfg)
        self.masks = MaskGenerator(cfg.mask, tokens_per_frame=side * side,
                                   num_slots=cfg.data.num_frames // cfg.model.tubelet_size, seed=cfg.seed,
                                   rank=self.dist.rank)
        needs_tracks = cfg.target.motion or cfg.mask.type == "motion"
        self.tracker = build_tracker(cfg.tracker, self.device) if needs_tracks else None
        self.preparer = BatchPreparer(cfg, self.tracker, self.targets, self.masks, self.device)

        # model and optimisation
        model = build_model(cfg, self.targets)
        self.shape = model.shape
        self.attention_backend = resolve_backend(cfg.model.attention, self.device)
        model.set_attention_backend(self.attention_backend)
        model.set_activation_checkpointing(cfg.model.activation_checkpointing)
        model.to(self.device)
        self.global_batch = (cfg.batch_size * cfg.data.num_sample * self.dist.world_size * cfg.optim.accum_steps)
        lr = peak_lr(cfg.optim, self.global_batch)
        warmup = (cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None
                  else round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        self.schedule = CosineSchedule(lr, min(cfg.optim.min_lr, lr), min(warmup, self.total_steps), self.total_steps)
        self.optimizer = build_optimizer(model, cfg.optim, lr)
        cuda = self.device.type == "cuda"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) if cuda else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and cfg.precision == "fp16")
        self.raw_model = model
        if self.dist.world_size > 1:
            model = DistributedDataParallel(model, device_ids=[self.device.index] if cuda else None)
        if cfg.model.compile:
            model = torch.compile(model)
        self.model = model

        # progress
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches consumed in the current epoch
        self.last_checkpoint: Path | None = None
        self.loss_history: list[float] = []
        self._resume()
        self.flops_per_clip = 3.0 * forward_flops(self.shape, self.masks.num_visible)
        self.peak = peak_tflops(self.device, cfg.peak_tflops)

    # ------------------------------------------------------------------------------------------------------------
    def _resolve_run_dir(self) -> Path:
        cfg = self.cfg
        out = Path(cfg.output_dir).expanduser()
        run_dir = None
        if self.dist.is_main:
            if cfg.run_name:
                run_dir = out / cfg.run_name
            elif cfg.resume == "auto":
                run_dir = _newest_run(out, cfg.preset)
            if run_dir is None:
                stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
                run_dir = out / f"{cfg.preset}-{stamp}"
            run_dir.mkdir(parents=True, exist_ok=True)
            run_dir = str(run_dir)
        return Path(broadcast_object(run_dir, self.dist))

    def _resume(self) -> None:
        cfg = self.cfg
        if cfg.resume is None:
            return
        if cfg.resume == "auto":
            found = self.ckpt.newest_valid(map_location="cpu")
            if found is None:
                log.info("resume=auto: no checkpoint in %s, starting fresh", self.ckpt.dir)
                return
            path, state = found
        else:
            path, state = Path(cfg.resume), load_checkpoint(cfg.resume, map_location="cpu")
        self.load_state(state, path)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)
        self.logger.event({"event": "resume", "checkpoint": str(path), "step": self.step})

    def load_state(self, state: dict[str, Any], path: Path) -> None:
        from .model.adapters import load_model_state

        load_model_state(self.raw_model, state["model"], source=str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = int(state["step"]), int(state["epoch"]), int(
            state["batch_in_epoch"])
        self.loss_history = list(state.get("loss_history", []))
        if "skips" in state and self.dist.world_size == 1:
            self.data.skips.load_state_dict(state["skips"])
        rng = state["rng"]
        per_rank = rng.get("per_rank")
        if per_rank is not None:
            if len(per_rank) != self.dist.world_size:
                log.warning("checkpoint has RNG states for %d ranks, this run has %d: RNG streams restart",
                            len(per_rank), self.dist.world_size)
            else:
                restore_rng_state(per_rank[self.dist.rank])

    def state_dict(self) -> dict[str, Any]:
        rng = capture_rng_state()
        if self.dist.world_size > 1:
            gathered = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "config": to_dict(self.cfg),
            "rng": {"per_rank": gathered},
            "loss_history": self.loss_history,
            "skips": self.data.skips.state_dict(),
            "format": "trackmae_stream",
            "version": __version__,
        }

    def save_checkpoint(self) -> Path | None:
        state = self.state_dict()  # collective on all ranks (RNG gather)
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
            "kernels": _kernel_backend(self.device), "model": describe(self.shape),
            "parameters": count_parameters(self.raw_model), "global_batch": self.global_batch,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "peak_lr": self.schedule.peak_lr,
            "visible_tokens": self.masks.num_visible, "train_gflop_per_clip": self.flops_per_clip / 1e9,
            "data": self.data.description, "videos": self.data.num_videos,
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
        lam = motion_weight(cfg.target)
        accum = cfg.optim.accum_steps
        timer = IntervalTimer()
        loss_keys = ["loss"]
        for name, on in (("spatial", cfg.target.spatial != "none"), ("motion", cfg.target.motion)):
            if on:
                loss_keys += [f"loss_{name}", f"zero_{name}"]
        loss_sum = torch.zeros(len(loss_keys), device=self.device, dtype=torch.float64)
        first_bad_step = torch.full((), -1, device=self.device, dtype=torch.long)
        interval_steps = 0
        progress = None
        if cfg.progress and self.dist.is_main:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)
        try:
            while self.step < self.total_steps:
                if self.batch_in_epoch >= self.data.batches_per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                self.data.set_position(self.epoch, self.batch_in_epoch)
                micro_step = self.step * accum
                batches = StreamingPrefetcher(self.data.loader, self.preparer, start_step=micro_step, timer=timer,
                                              overlap=cfg.tracker.overlap)
                self.model.train()
                while self.step < self.total_steps and self.batch_in_epoch + accum <= self.data.batches_per_epoch:
                    set_lr(self.optimizer, self.schedule(self.step))
                    t_step = time.perf_counter()
                    for micro in range(accum):
                        batch = next(batches)
                        self.data.skips.update(batch.skipped, batch.source_index)
                        sync_ctx = (self.model.no_sync() if micro < accum - 1 and hasattr(self.model, "no_sync")
                                    else contextlib.nullcontext())
                        t_fwd = time.perf_counter()
                        with sync_ctx:
                            with self._autocast():
                                pred = self.model(batch.patches, batch.visible_idx, batch.masked_idx)
                                losses = compute_losses(pred, batch, lam)
                            self.scaler.scale(losses["loss"] / accum).backward()
                        loss_sum += torch.stack([losses[k].detach() for k in loss_keys]).double() / accum
                        bad = ~torch.isfinite(losses["loss"].detach())
                        first_bad_step = torch.where(bad & (first_bad_step < 0),
                                                     torch.full_like(first_bad_step, self.step), first_bad_step)
                        timer.clips += batch.num_clips
                        timer.add("compute", time.perf_counter() - t_fwd)
                        self.batch_in_epoch += 1
                    grad_norm = None
                    log_now = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == self.total_steps
                    if cfg.optim.clip_grad is not None or log_now:
                        self.scaler.unscale_(self.optimizer)
                        grad_norm = torch.nn.utils.clip_grad_norm_(
                            self.raw_model.parameters(), cfg.optim.clip_grad if cfg.optim.clip_grad else math.inf,
                            foreach=True)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    timer.steps += 1
                    interval_steps += 1
                    timer.add("step", time.perf_counter() - t_step)
                    if progress is not None:
                        progress.update(1)
                    if log_now:
                        record = self._log_interval(timer, loss_sum, loss_keys, interval_steps, grad_norm,
                                                    first_bad_step)
                        if progress is not None:
                            progress.set_postfix(loss=f"{record['loss']:.4f}", clips_s=f"{record['clips_per_s']:.1f}")
                        loss_sum.zero_()
                        interval_steps = 0
                        timer.reset()
                    if self.step % cfg.ckpt_every == 0 and self.step < self.total_steps:
                        self._check_finite(first_bad_step)
                        self.save_checkpoint()
                if self.batch_in_epoch + accum > self.data.batches_per_epoch:
                    self.batch_in_epoch = self.data.batches_per_epoch  # the epoch's tail (< accum batches) is dropped
            self._check_finite(first_bad_step)
            self.save_checkpoint()
        finally:
            if progress is not None:
                progress.close()
        summary = self._summary()
        self.logger.event({"event": "end", "step": self.step, "epoch": self.epoch,
                           "checkpoint": str(summary.last_checkpoint), "skipped_videos": summary.skipped_videos})
        return summary

    def _check_finite(self, first_bad_step: Tensor) -> None:
        bad = int(first_bad_step.item())
        if bad >= 0:
            raise NonFiniteLossError(
                f"non-finite loss at step {bad + 1}: stopping without writing a checkpoint (the last good one is "
                f"{self.last_checkpoint or 'none'}); lower optim.lr or enable optim.clip_grad")

    def _log_interval(self, timer: IntervalTimer, loss_sum: Tensor, loss_keys: list[str], steps: int,
                      grad_norm: Tensor | None, first_bad_step: Tensor) -> dict[str, Any]:
        """The one host sync of an interval: wall time, reduced losses, skips, memory."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = timer.elapsed()
        self._check_finite(first_bad_step)
        totals = all_reduce_sum(loss_sum.clone(), self.dist) / (steps * self.dist.world_size)
        values = dict(zip(loss_keys, totals.tolist()))
        for name in ("spatial", "motion"):  # loss relative to predicting zeros: < 1 means the model learned something
            if f"zero_{name}" in values:
                values[f"rel_{name}"] = values[f"loss_{name}"] / max(values.pop(f"zero_{name}"), 1e-12)
        skips = self.data.skips.reduce(self.dist)
        clips = timer.clips * self.dist.world_size
        clips_per_s = clips / wall if wall > 0 else float("nan")
        record: dict[str, Any] = {
            "step": self.step, "epoch": self.epoch, **values, "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "clips_per_s": clips_per_s, "step_time_s": wall / max(1, timer.steps),
            "data_wait": timer.buckets.get("data", 0.0) / wall if wall > 0 else 0.0,
            "prepare_share": timer.buckets.get("prepare", 0.0) / wall if wall > 0 else 0.0,
            "skipped_videos": skips["videos"], "skip_events": skips["events"], "mem_gib": memory_gib(self.device),
        }
        if self.peak is not None:
            record["mfu"] = self.flops_per_clip * clips_per_s / self.dist.world_size / (self.peak * 1e12)
        self.loss_history.append(values["loss"])
        self.logger.log(record)
        if self.dist.is_main:
            log.info(format_record(record))
        self.data.skips.check()
        return record

    def _summary(self) -> RunSummary:
        return RunSummary(run_dir=self.run_dir, step=self.step, epoch=self.epoch, losses=list(self.loss_history),
                          last_checkpoint=self.last_checkpoint, skipped_videos=self.data.skips.total_videos)

    def close(self) -> None:
        self.data.close()
        self.logger.close()
        shutdown(self.dist)


def _kernel_backend(device: torch.device) -> str:
    """What the kernel dispatch will pick, for the run log (the dispatch layer itself decides per call)."""
    forced = os.environ.get("TRACKMAE_KERNEL_BACKEND")
    if forced:
        return forced
    if device.type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


def _newest_run(output_dir: Path, preset: str) -> Path | None:
    if not output_dir.is_dir():
        return None
    candidates = [p for p in output_dir.glob(f"{preset}-*") if (p / "checkpoints").is_dir()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def train(cfg: TrainConfig) -> RunSummary:
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.close()


__all__ = ["Trainer", "train", "RunSummary", "NonFiniteLossError", "compute_losses", "build_model"]
