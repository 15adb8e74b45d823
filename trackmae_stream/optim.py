"""AdamW with VideoMAE's parameter groups and a per-step warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; exempt biases, norm weights (all 1-D tensors) and the names a model lists in
    `no_weight_decay()` (mask token), as VideoMAE and timm do."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """`optim.lr` when given, else the linear scaling rule: base_lr is per 256 clips per optimizer step."""
    return cfg.lr if cfg.lr is not None else cfg.base_lr * global_batch / 256


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up to `peak_lr` (step 0 already moves: (step + 1) / warmup), then cosine decay to `min_lr`,
    evaluated per optimizer step."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    # fused AdamW keeps the update on the device without host syncs; foreach is the CPU path.
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    kwargs = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
