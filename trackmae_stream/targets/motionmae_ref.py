"""`motionmae_ref`: our reference design of MotionMAE's motion target (SPEC §1.4; arithmetic in
`trackmae_stream.methods.motionmae_ref`). The authors' definition is unreleased: name results "MotionMAE-ref".

D_t = x_t - x_{t-1} on the sampled [0, 1] clip (D_0 := D_1), patchified like VideoMAE's pixels, raw (`normalize:
false`, the reference's primary choice) or per-patch normalised. By default a second linear head on the pixel
target's decoder (`decoder: pixel`; the reference's "second linear head on the same decoder output"), weight 1.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..methods import motionmae_ref
from .base import Prepared, Target, TargetContext, TargetInputs, register_target


@dataclass
class MotionMAERefOptions:
    normalize: bool = False


@register_target
class MotionMAERefTarget(Target):
    name = "motionmae_ref"
    Options = MotionMAERefOptions
    default_decoder = "pixel"

    def __init__(self, ctx: TargetContext, options: MotionMAERefOptions):
        super().__init__(ctx, options)
        self.dim = 3 * ctx.tubelet * ctx.patch ** 2

    def at(self, inputs: TargetInputs, prepared: Prepared, masked_idx: Tensor) -> tuple[Tensor, None]:
        return motionmae_ref.motionmae_ref_target(inputs.frames_u8, masked_idx, tubelet=self.ctx.tubelet,
                                                  patch=self.ctx.patch, layout="BTHWC",
                                                  normalize=self.options.normalize, mean=self.ctx.mean,
                                                  std=self.ctx.std), None
