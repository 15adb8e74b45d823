"""`mask.type=adamae`: AdaMAE's learned token sampler (`methods/adamae.py`; SPEC §3.3).

The sampler reads the MAE's own patch embeddings of every token with their gradients (AdaMAE does not detach them),
draws the visible tokens without replacement (Gumbel top-k on the counter generator keyed by (seed, micro-batch,
rank): a resumed run draws the same), and is trained by AdaMAE's sampling loss, added to the MAE loss:
L = L_MAE + weight · mean_b[-mean_{i masked} log p_i · sg(e_i)], e_i the per-token error (the weighted sum over the
run's targets). Its parameters step with their own AdamW (AdaMAE's betas and weight decay; a constant lr); the
gradient the sampling loss sends into the patch embedding steps with the MAE's optimizer, as in AdaMAE.

Differences from AdaMAE, deliberate: the visible count is the project's fixed tube count T·(S − int(ratio·S)) (the
same for every policy of a comparison) instead of int(N·(1 − ratio)); the sampler has its own optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..kernels import MaskOutput
from ..masking import LearnedMaskPolicy, MaskGeometry, MaskInputs, register_mask_policy
from ..methods import adamae


@dataclass
class AdaMAEOptions:
    lr: float = 1.5e-4  # AdaMAE: the MAE's lr (1.5e-4 per 256 clips); constant here
    weight_decay: float = 0.05
    sampling_weight: float = adamae.ADAMAE_SAMPLING_WEIGHT  # 1e-4
    num_heads: int = 8
    dropout: float = 0.1


@register_mask_policy
class AdaMAEPolicy(LearnedMaskPolicy):
    name = "adamae"
    Options = AdaMAEOptions
    log_keys = ("entropy",)

    def __init__(self, cfg, geometry: MaskGeometry, *, seed: int, rank: int, options: AdaMAEOptions,
                 embed_dim: int):
        super().__init__(cfg, geometry, seed=seed, rank=rank, options=options, embed_dim=embed_dim)
        self.sampler = adamae.AdaMAESampler(geometry.num_tokens, embed_dim, num_heads=options.num_heads,
                                            dropout=options.dropout)

    @classmethod
    def check_options(cls, options: AdaMAEOptions, key: str, fail) -> None:
        if options.lr <= 0:
            fail(f"{key}.lr", options.lr, "must be > 0")
        if options.sampling_weight < 0 or options.weight_decay < 0:
            fail(f"{key}.sampling_weight", options.sampling_weight, "weights must be >= 0")
        if not 0.0 <= options.dropout < 1.0:
            fail(f"{key}.dropout", options.dropout, "must lie in [0, 1)")

    def build_optimizer(self) -> torch.optim.Optimizer:
        groups = adamae.adamae_param_groups(self.sampler, self.options.weight_decay)
        return torch.optim.AdamW(groups, lr=self.options.lr, betas=(0.9, 0.95))

    def sample(self, inputs: MaskInputs) -> tuple[MaskOutput, Any]:
        if inputs.tokens is None:
            raise ValueError("mask.type=adamae needs the patch embeddings of every token")
        draw = self.sampler.sample(inputs.tokens, self.geometry.num_visible, seed=self.seed, step=inputs.step,
                                   rank=self.rank)
        return draw.mask, draw

    def mae_loss(self, aux: adamae.AdaMAESample, token_error: Tensor, mask: MaskOutput) -> Tensor:
        return adamae.adamae_sampling_loss(aux.log_probs, mask.masked_idx, token_error,
                                           weight=self.options.sampling_weight)

    def update(self, aux: adamae.AdaMAESample, token_error: Tensor, mask: MaskOutput, step: int) -> dict[str, Tensor]:
        self.step_optimizer()
        log_p = aux.log_probs.detach()
        return {"entropy": -(log_p.exp() * log_p).sum(1).mean()}
