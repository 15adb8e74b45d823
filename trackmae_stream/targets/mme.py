"""MME's two targets (SPEC §2; arithmetic in `trackmae_stream.methods.mme`), on one shared decoder `mme` with MLP
heads (Linear -> GELU -> Linear(nc) -> Sigmoid for HOG, Tanh for the trajectory), each weighted 0.5 so that the sum
is MME's L = (ℓ_traj + ℓ_hog) / 2 with both terms sums over channels divided by every masked token |M|.

- `mme_hog` (108 values per token): 9 unsigned-orientation bins per 8x8 cell per colour channel of the
  ImageNet-normalised second frame of each tubelet (official code bit for bit; bug B2, the random Sobel bias, fixed).
- `mme_traj` (8L = 32 values per token): the trajectory target from the project's point trackers (SPEC §2.6's
  substitute, "MME-track"): per slot, a grid of 2x2 points per token queried on the tubelet's first frame and tracked
  to its second (`window: slot`, the default: MME's interval, re-queried every slot), or the pipeline's one grid
  queried at frame 0 (`window: clip`); the windows come from the run's tracker, or exactly from the synthetic set's
  stored motion with tracker.backend=synthetic_gt (`BatchPreparer.track_windows`); cut into L equal steps, PatchStd
  over the 4 points per coordinate and step, MME's validity rule; invalid tokens stay out of the loss (a (B, M) token
  validity). Official MME tracks dense Farneback flow over raw-rate frames with integer steps: `methods.mme` has that
  path (offline, per video) and bench/results/mme_trajectories.json measures how far tracker targets land from it
  (|Δz| ≈ 0.45 for per-slot sampled frames with an ideal tracker, 0.94 = chance for the single-query clip layout).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..methods import mme
from .base import Prepared, Target, TargetContext, TargetInputs, TargetLoss, register_target


@dataclass
class MMEHogOptions:
    pass


@register_target
class MMEHogTarget(Target):
    name = "mme_hog"
    Options = MMEHogOptions
    default_weight = 0.5
    default_head = "mlp"
    default_activation = "sigmoid"
    default_decoder = "mme"

    def __init__(self, ctx: TargetContext, options: MMEHogOptions):
        super().__init__(ctx, options)
        if ctx.patch % mme.CELL:
            raise ValueError(f"mme_hog needs model.patch_size divisible by {mme.CELL}, got {ctx.patch}")
        self.dim = 3 * mme.NBINS * (ctx.patch // mme.CELL) ** 2

    def prepare(self, inputs: TargetInputs) -> Prepared:
        hog = mme.mme_hog(inputs.frames_u8, layout="BTHWC", tubelet=self.ctx.tubelet)
        return Prepared(values=mme.mme_hog_target(hog, patch=self.ctx.patch))

    def loss(self, pred: Tensor, target: Tensor, valid: Tensor | None) -> TargetLoss:
        error = (pred.float() - target.float()).square().sum(-1)  # a sum over channels, per masked token
        return TargetLoss(error.mean(), target.detach().float().square().sum(-1).mean(), error.detach())


@dataclass
class MMETrajOptions:
    window: str = "slot"  # "slot": re-queried per tubelet (first -> second frame) | "clip": the pipeline's tracks
    traj_len: int = 4  # L steps per slot (32 values per token at L = 4)
    use_visibility: bool = False  # MME ignores occlusion; true drops points the tracker marks invisible
    visibility_threshold: float = 0.5


@register_target
class MMETrajTarget(Target):
    name = "mme_traj"
    Options = MMETrajOptions
    default_weight = 0.5
    default_head = "mlp"
    default_activation = "tanh"
    default_decoder = "mme"

    def __init__(self, ctx: TargetContext, options: MMETrajOptions):
        super().__init__(ctx, options)
        self.dim = 8 * options.traj_len

    @classmethod
    def check_options(cls, options: MMETrajOptions, key: str, fail) -> None:
        if options.window not in ("slot", "clip"):
            fail(f"{key}.window", options.window, "expected one of ('slot', 'clip')")
        if options.traj_len < 1:
            fail(f"{key}.traj_len", options.traj_len, "must be >= 1")
        if not 0.0 <= options.visibility_threshold <= 1.0:
            fail(f"{key}.visibility_threshold", options.visibility_threshold, "must lie in [0, 1]")

    @property
    def needs_tracks(self) -> bool:  # type: ignore[override]
        return self.options.window == "clip"

    needs_tracker = True

    @property
    def has_validity(self) -> bool:
        return True

    @property
    def validity_per_token(self) -> bool:
        return True

    def prepare(self, inputs: TargetInputs) -> Prepared:
        o, c = self.options, self.ctx
        frame_size = tuple(inputs.frames_u8.shape[2:4])
        if o.window == "slot":  # every tubelet: its first frame -> its second (MME's interval)
            if inputs.track_windows is None:
                raise ValueError("target mme_traj (window=slot) needs a tracker")
            out = inputs.track_windows(2 * c.tokens_side, (0, 1))
            tracks, visibility = out.tracks, out.visibility
            upsample = 1
        else:
            tracks, visibility = inputs.tracks, inputs.visibility
            grid = int(round(tracks.shape[2] ** 0.5))
            upsample = 2 * c.tokens_side // grid
        values, valid = mme.mme_trajectory_from_tracks(
            tracks, visibility if o.use_visibility else None, tokens_side=c.tokens_side, frame_size=frame_size,
            traj_len=o.traj_len, upsample=upsample, use_visibility=o.use_visibility,
            visibility_threshold=o.visibility_threshold)
        return Prepared(values=values, valid=valid)

    def loss(self, pred: Tensor, target: Tensor, valid: Tensor | None) -> TargetLoss:
        # MME's ℓ_traj: valid · Σ_j (ŷ - z)² · 32/(8L), divided by every masked token (valid or not)
        scale = 32.0 / target.shape[-1]
        keep = valid.float() if valid is not None else torch.ones(target.shape[:2], device=target.device)
        error = (pred.float() - target.float()).square().sum(-1) * keep * scale
        zero = target.detach().float().square().sum(-1) * keep * scale
        return TargetLoss(error.mean(), zero.mean(), error.detach())
