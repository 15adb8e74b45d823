"""`mask.type=tats_ref`: the TATS-style token sampler trained by PPO (`methods/tats.py`, `methods/ppo.py`; SPEC §3.4).
A reference design, not the authors' code (unavailable): label results "TATS-ref".

Per micro-batch the actor (Motionformer trajectory attention on the detached patch embeddings) draws the visible
tokens without replacement (keyed by (seed, micro-batch, rank)); the MAE trains on that mask; the reward is each
clip's mean per-token error over its masked tokens (the weighted sum over the run's targets, detached); then K PPO
epochs (clipped objective, value head, entropy bonus) step the sampler's own AdamW. For the first `warmup_steps`
micro-batches the mask is drawn from the uniform policy and PPO waits (SPEC: 1-5% of training). With
`group_size` G > 1 every clip gets G masks per step (the MAE trains on the B·G copies) and rewards are compared among a
clip's own copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..kernels import MaskOutput
from ..masking import LearnedMaskPolicy, MaskGeometry, MaskInputs, register_mask_policy
from ..methods import ppo, tats


@dataclass
class TATSOptions:
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 0  # micro-batches of uniform (random) masking before PPO starts
    width: int | None = None  # sampler width (None: the encoder's)
    num_heads: int = 8
    temperature: float = 1.0
    clip_eps: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    epochs: int = 4
    log_prob: str = "independent"  # "independent" | "plackett_luce"
    reduce: str = "sum"  # "sum" | "mean" (log-probability per token)
    # G > 1: every clip is trained G times per step with G different masks (the MAE batch becomes B*G copies) and each
    # reward is normalised among its clip's copies (ours; methods/ppo.py measured it sharper), at G times the MAE cost
    group_size: int = 1


@register_mask_policy
class TATSPolicy(LearnedMaskPolicy):
    name = "tats_ref"
    Options = TATSOptions
    log_keys = ("reward", "entropy", "clip_fraction", "approx_kl", "value_loss")

    def __init__(self, cfg, geometry: MaskGeometry, *, seed: int, rank: int, options: TATSOptions, embed_dim: int):
        super().__init__(cfg, geometry, seed=seed, rank=rank, options=options, embed_dim=embed_dim)
        self.ppo = ppo.PPOConfig(clip_eps=options.clip_eps, value_coef=options.value_coef,
                                 entropy_coef=options.entropy_coef, epochs=options.epochs,
                                 log_prob=options.log_prob, reduce=options.reduce, group_size=options.group_size)
        self.sampler = tats.TATSSampler(tokens_per_frame=geometry.tokens_per_frame, num_frames=geometry.num_slots,
                                        embed_dim=embed_dim, width=options.width, num_heads=options.num_heads,
                                        temperature=options.temperature)

    @classmethod
    def check_options(cls, options: TATSOptions, key: str, fail) -> None:
        for name in ("lr", "temperature", "clip_eps"):
            if getattr(options, name) <= 0:
                fail(f"{key}.{name}", getattr(options, name), "must be > 0")
        if options.epochs < 1:
            fail(f"{key}.epochs", options.epochs, "must be >= 1")
        if options.group_size < 1:
            fail(f"{key}.group_size", options.group_size, "must be >= 1")
        if options.warmup_steps < 0:
            fail(f"{key}.warmup_steps", options.warmup_steps, "must be >= 0")
        if options.log_prob not in ("independent", "plackett_luce"):
            fail(f"{key}.log_prob", options.log_prob, "expected one of ('independent', 'plackett_luce')")
        if options.reduce not in ("sum", "mean"):
            fail(f"{key}.reduce", options.reduce, "expected one of ('sum', 'mean')")
        if options.width is not None and options.width % options.num_heads:
            fail(f"{key}.width", options.width, f"must be divisible by num_heads={options.num_heads}")

    def build_optimizer(self) -> torch.optim.Optimizer:
        return tats.build_tats_optimizer(self.sampler, lr=self.options.lr, weight_decay=self.options.weight_decay)

    def sample(self, inputs: MaskInputs) -> tuple[MaskOutput, Any]:
        if inputs.tokens is None:
            raise ValueError("mask.type=tats_ref needs the patch embeddings of every token")
        uniform = inputs.step < self.options.warmup_steps  # host integers: no sync
        tokens = inputs.tokens.float()
        if self.options.group_size > 1:  # G copies of every clip in a row; the draws are keyed by row: G masks
            tokens = tokens.repeat_interleave(self.options.group_size, 0)
        rollout = self.sampler.sample(tokens, self.geometry.num_visible, seed=self.seed,
                                      step=inputs.step, rank=self.rank, cfg=self.ppo, uniform=uniform)
        return rollout.mask, (rollout, uniform)

    def update(self, aux: Any, token_error: Tensor, mask: MaskOutput, step: int) -> dict[str, Tensor]:
        rollout, uniform = aux
        reward = tats.tats_reward(token_error)
        if uniform:
            zero = torch.zeros((), device=reward.device)
            return {"reward": reward.mean(), "entropy": zero, "clip_fraction": zero, "approx_kl": zero,
                    "value_loss": zero}
        stats = tats.ppo_update(self.sampler, self.optimizer, rollout, reward, self.ppo)
        return {"reward": stats.reward_mean, "entropy": stats.entropy, "clip_fraction": stats.clip_fraction,
                "approx_kl": stats.approx_kl, "value_loss": stats.value}


__all__ = ["TATSPolicy", "TATSOptions"]
