"""Supervised upper bound: the pretraining encoder trained end to end on the labels, evaluated like the probe.

  python -m trackmae_stream.supervised --config default --set data.synthetic_videos=5000 --out sup.json

  # the CPU-sized bound measured for the motion task (5000 clips at 64 px, 8 frames; ~8 min on one free core):
  python -m trackmae_stream.supervised --set data.synthetic_videos=5000 --set data.synthetic_size=64 \
      --set data.synthetic_frames=24 --set data.input_size=64 --set data.num_frames=8 --threads 1 --out sup64.json

The encoder is the one the trainer builds for the config (`engine.build_model`'s initialisation, drawn from
`--seed`), followed by a linear head on its token-averaged output (the probe's features). It is trained with the
trainer's optimiser (AdamW with VideoMAE's parameter groups, `optim.weight_decay`, `optim.betas`) and schedule
(linear warm-up, cosine to `optim.min_lr`) for a fixed number of steps, on the trainer's clips (`VideoClipDataset`:
random temporal window, multi-scale crop) of the training split. Flipping stays off whatever `data.flip` says: on
the synthetic set a mirror turns one class (direction of travel) into another.

Evaluation is the probe's protocol (`trackmae_stream.probe`): each clip's fixed evaluation window, the set's own
validation split, 95% Wilson intervals over clips. Reported: the trained head on the validation and training clips,
and the linear probe and k-NN on the trained encoder's frozen features. If this bound is not clearly above chance on
the held-out clips, the task (or the budget) cannot rank pretraining methods.

The defaults (2000 steps of 16 clips, peak lr 5e-4 with 10% warm-up) are the budget measured on the motion task: the
ViT sits at chance for a few hundred steps before it finds the motion (at lr 1e-3 it stayed there longer). On a CPU
shared with other processes, `--threads 1` avoids thread oversubscription (7x faster per step on a loaded 2-core
machine).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TrainConfig
from .data import VideoClipDataset, build_pretrain_loader, normalize_clip
from .errors import UserError
from .optim import CosineSchedule, build_optimizer, peak_lr, set_lr
from .probe import (
    INTERVAL_NOTE,
    Accuracy,
    ProbeError,
    build_encoder,
    check_classes,
    eval_lists,
    evaluate_features,
    resolve_config,
    split_features,
)

log = logging.getLogger(__name__)


class Classifier(nn.Module):
    """Encoder + linear head on the token average (the features the probe reads)."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.norm.normalized_shape[0], num_classes)
        nn.init.zeros_(self.head.weight)  # a zero head: every class starts equally likely
        nn.init.zeros_(self.head.bias)

    def forward(self, clip: Tensor) -> Tensor:
        return self.head(self.encoder.forward_video(clip).mean(dim=1))


@dataclass
class SupervisedResult:
    steps: int
    batch_size: int
    lr: float
    seconds: float
    final_loss: float  # mean training loss over the last 10% of the steps
    num_classes: int
    num_train: int
    num_val: int
    val: Accuracy  # the trained head on the validation split's fixed clips
    train: Accuracy  # the trained head on the training split's fixed clips
    probe: dict  # linear probe and k-NN on the trained encoder's frozen features (ProbeResult.summary())
    model: Classifier | None = field(default=None, repr=False)  # the trained encoder + head

    def summary(self) -> dict:
        return {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "seconds": self.seconds,
                "final_loss": self.final_loss, "num_classes": self.num_classes, "num_train": self.num_train,
                "num_val": self.num_val, "val": self.val.summary(), "train": self.train.summary(),
                "probe": self.probe, "intervals": INTERVAL_NOTE}


def train_supervised(cfg: TrainConfig, train_records, val_records, *, steps: int, batch_size: int,
                     lr: float | None = None, warmup_steps: int | None = None, seed: int = 0, workers: int = 1,
                     log_every: int = 25, device: torch.device | str = "cpu") -> SupervisedResult:
    """Train encoder + head for `steps` AdamW steps on `train_records`, then evaluate on the fixed clips."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    device = torch.device(device)
    num_classes = max(r.label for r in list(train_records) + list(val_records)) + 1
    if min(r.label for r in train_records) < 0:
        raise ProbeError("the training list has unlabelled videos (label -1): a supervised bound needs labels")
    d = cfg.data
    if d.flip:
        log.warning("supervised: data.flip=true ignored (a mirror changes the class of a direction-of-travel task)")
    dataset = VideoClipDataset(train_records, num_frames=d.num_frames, sampling_rate=d.sampling_rate,
                               input_size=d.input_size, scales=d.scales, flip=False, decoder=d.decoder, seed=seed)
    loader = build_pretrain_loader(dataset, batch_size=batch_size, num_workers=workers, seed=seed,
                                   prefetch_factor=2)
    if loader.batches_per_epoch < 1:
        raise ProbeError(f"{len(train_records)} training videos give no batch of {batch_size}")

    model = Classifier(build_encoder(cfg, seed=seed), num_classes).to(device)
    lr = peak_lr(cfg.optim, batch_size) if lr is None else lr
    warmup = max(1, steps // 10) if warmup_steps is None else warmup_steps
    schedule = CosineSchedule(lr, min(cfg.optim.min_lr, lr), min(warmup, steps), steps)
    optimizer = build_optimizer(model, cfg.optim, lr)
    mean, std = tuple(d.mean), tuple(d.std)

    losses: list[float] = []
    step, epoch, start = 0, 0, time.perf_counter()
    model.train()
    with loader:
        while step < steps:
            loader.set_epoch(epoch)
            for batch in loader:
                set_lr(optimizer, schedule(step))
                clip = normalize_clip(batch["frames"].to(device), mean, std)
                logits = model(clip)
                loss = F.cross_entropy(logits, batch["label"].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                optimizer.step()
                losses.append(loss.item())  # one host sync per step: this loop runs on CPUs or briefly
                step += 1
                if step % log_every == 0 or step == steps:
                    recent = losses[-log_every:]
                    log.info("supervised: step %d/%d loss %.3f lr %.2e %.0f s", step, steps,
                             sum(recent) / len(recent), schedule(step - 1), time.perf_counter() - start)
                if step == steps:
                    break
            epoch += 1
    seconds = time.perf_counter() - start

    common = dict(batch_size=8, workers=workers, device=device)
    encoder = model.encoder
    val_x, val_y, _ = split_features(encoder, val_records, cfg, "val", **common)
    train_x, train_y, _ = split_features(encoder, train_records, cfg, "train", **common)
    check_classes(train_y, val_y)
    with torch.no_grad():
        model.head.cpu()
        val_acc = Accuracy.of(model.head(val_x).argmax(1), val_y)
        train_acc = Accuracy.of(model.head(train_x).argmax(1), train_y)
    probe = evaluate_features(train_x, train_y, val_x, val_y).summary()
    tail = losses[-max(1, steps // 10):]
    return SupervisedResult(steps=steps, batch_size=batch_size, lr=lr, seconds=seconds,
                            final_loss=sum(tail) / len(tail), num_classes=num_classes, num_train=len(train_y),
                            num_val=len(val_y), val=val_acc, train=train_acc, probe=probe, model=model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trackmae_stream.supervised", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", help="preset or YAML (default: default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set data.synthetic_videos=2000")
    parser.add_argument("--task", help="synthetic task (default: the config's data.synthetic_task, else motion)")
    parser.add_argument("--train-list")
    parser.add_argument("--val-list")
    parser.add_argument("--root")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (the budget)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4,
                        help="peak learning rate (0: the config's optim.lr / base_lr rule)")
    parser.add_argument("--warmup-steps", type=int, help="default: 10%% of the steps")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    try:
        cfg, _ = resolve_config(None, args.config, args.overrides)
        train_records, val_records, source = eval_lists(cfg, train_list=args.train_list, val_list=args.val_list,
                                                        root=args.root, task=args.task)
        result = train_supervised(cfg, train_records, val_records, steps=args.steps, batch_size=args.batch_size,
                                  lr=args.lr or None, warmup_steps=args.warmup_steps, seed=args.seed,
                                  workers=args.workers, device=device)
    except (UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    chance = 1 / result.num_classes
    probe = result.probe
    print(f"supervised bound ({result.steps} steps x {result.batch_size} clips, {result.seconds:.0f} s; {source}):\n"
          f"  head: validation {result.val} on {result.num_val} clips, train {result.train} on {result.num_train} "
          f"(chance {chance:.1%})\n"
          f"  frozen features: linear probe {Accuracy(probe['val_correct'], probe['num_val'])}, k-NN "
          f"{Accuracy(probe['knn_correct'], probe['num_val'])}\n"
          f"[intervals: {INTERVAL_NOTE}]")
    if args.out:
        d = cfg.data
        about = {"config": args.config, "overrides": args.overrides, "data": source, "seed": args.seed,
                 "clip": {"num_frames": d.num_frames, "sampling_rate": d.sampling_rate, "input_size": d.input_size},
                 "model": {"arch": cfg.model.arch, "embed_dim": cfg.model.embed_dim, "depth": cfg.model.depth}}
        Path(args.out).write_text(json.dumps({**about, **result.summary()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
