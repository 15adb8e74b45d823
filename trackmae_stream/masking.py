"""Which tubes the encoder sees: motion-aware tube masking (TrackMAE) or random tube masking (VideoMAE).

Both give exactly K = S - int(ratio * S) visible tokens per time slot for every clip, so every shape in a step is fixed
by the configuration. The draws come from a counter-based generator keyed by (seed, step, rank, clip): the same masks
on CPU and GPU, in any data-loader configuration, and again after a resume.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .config import MaskConfig


class MaskGenerator:
    def __init__(self, cfg: MaskConfig, *, tokens_per_frame: int, num_slots: int, seed: int, rank: int):
        self.cfg = cfg
        self.tokens_per_frame = tokens_per_frame
        self.num_slots = num_slots
        self.seed = seed
        self.rank = rank

    @property
    def visible_per_frame(self) -> int:
        return kernels.visible_per_frame(self.tokens_per_frame, self.cfg.ratio)

    @property
    def num_visible(self) -> int:
        return self.visible_per_frame * self.num_slots

    @property
    def needs_motion(self) -> bool:
        return self.cfg.type == "motion"

    def __call__(self, step: int, batch: int, device: torch.device, token_stat: Tensor | None = None):
        """Masks for micro-batch `step`; `token_stat` (B, S) is the motion statistic (motion-aware masking only)."""
        if self.cfg.type == "motion":
            if token_stat is None:
                raise ValueError("motion-aware masking needs the per-token motion statistic")
            return kernels.motion_aware_mask(token_stat, num_frames=self.num_slots, mask_ratio=self.cfg.ratio,
                                             rho=self.cfg.rho, seed=self.seed, step=step, rank=self.rank)
        return kernels.tube_mask(batch, tokens_per_frame=self.tokens_per_frame, num_frames=self.num_slots,
                                 mask_ratio=self.cfg.ratio, seed=self.seed, step=step, rank=self.rank, device=device)
