"""The `pixel` target: VideoMAE's masked-patch pixels, per patch and channel standardised (`normalize`, the default)
or raw in [0, 1]. Computed straight at the masked tokens by the pixel kernel (`kernels.pixels`)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .. import kernels
from .base import Prepared, Target, TargetContext, TargetInputs, register_target


@dataclass
class PixelOptions:
    normalize: bool = True  # VideoMAE's norm-pix target; false: raw pixels in [0, 1]


@register_target
class PixelTarget(Target):
    name = "pixel"
    Options = PixelOptions
    picture = "pixels"

    def __init__(self, ctx: TargetContext, options: PixelOptions):
        super().__init__(ctx, options)
        self.dim = 3 * ctx.tubelet * ctx.patch ** 2

    def at(self, inputs: TargetInputs, prepared: Prepared, masked_idx: Tensor) -> tuple[Tensor, None]:
        return kernels.pixel_targets(inputs.frames_u8, masked_idx, tubelet=self.ctx.tubelet, patch=self.ctx.patch,
                                     layout="BTHWC", normalize=self.options.normalize), None
