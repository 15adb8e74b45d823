"""The `track_motion` target (TrackMAE): per-token displacements of an upsampled grid of tracked points, from the
fused motion kernel (`kernels.motion`: Triton on CUDA, its torch twin elsewhere), and the binning statistic that
motion-aware masking ranks tokens by (side output `motion_stat`, (B, tokens per frame)).

With `drop_invisible` the tracker's occluded points leave the target, its normalisation and the statistic; the batch
then carries a (B, M, dim) validity and the loss is a mean over valid values (README, target.drop_invisible).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import kernels
from .base import Prepared, Target, TargetContext, TargetInputs, register_target


@dataclass
class TrackMotionOptions:
    upsample: int = 2  # υ: 14 -> 28 query grid, 2x2 points per token
    displacement: str = "frame"  # "frame" (public) | "first" (cumulative from the first frame)
    norm: str = "patch"  # "patch" (public) | "none" | "patch_safe"
    # Drop points the tracker marks invisible (visibility < visibility_threshold at either end of a step) from the
    # target's loss and the binning statistic. Off: the public code trains on every point, occluded or not.
    drop_invisible: bool = False
    visibility_threshold: float = 0.5


@register_target
class TrackMotionTarget(Target):
    name = "track_motion"
    Options = TrackMotionOptions
    needs_tracks = True
    side_outputs = ("motion_stat",)
    picture = "flow"

    def __init__(self, ctx: TargetContext, options: TrackMotionOptions):
        super().__init__(ctx, options)
        side = ctx.grid_size * options.upsample // ctx.tokens_side
        self.dim = 2 * side * side

    @classmethod
    def resolve_weight(cls, options: Any, enabled: dict[str, Any]) -> float:
        return 0.25 if "clip" in enabled else 1.0  # the paper's λ: 1 with pixels, 0.25 with CLIP features

    @classmethod
    def check_options(cls, options: TrackMotionOptions, key: str, fail) -> None:
        if options.upsample < 1:
            fail(f"{key}.upsample", options.upsample, "must be >= 1")
        if options.displacement not in ("frame", "first"):
            fail(f"{key}.displacement", options.displacement, "expected one of ('frame', 'first')")
        if options.norm not in ("patch", "none", "patch_safe"):
            fail(f"{key}.norm", options.norm, "expected one of ('patch', 'none', 'patch_safe')")
        if not 0.0 <= options.visibility_threshold <= 1.0:
            fail(f"{key}.visibility_threshold", options.visibility_threshold, "must lie in [0, 1]")

    @property
    def has_validity(self) -> bool:
        return self.options.drop_invisible

    def _visibility(self, inputs: TargetInputs):
        if not self.options.drop_invisible:
            return None
        if inputs.visibility is None:
            raise ValueError("target.track_motion.drop_invisible=true needs the tracker's visibility (B, T', G²)")
        return inputs.visibility

    def prepare(self, inputs: TargetInputs) -> Prepared:
        o = self.options
        visibility = self._visibility(inputs)
        if self.stat_only:  # motion-aware masking without the motion target: the statistic alone
            stat = kernels.motion_token_stat(inputs.tracks, tokens_side=self.ctx.tokens_side, visibility=visibility,
                                             visibility_threshold=o.visibility_threshold)
            return Prepared(side={"motion_stat": stat})
        kwargs = dict(tokens_side=self.ctx.tokens_side, upsample=o.upsample, displacement=o.displacement,
                      norm=o.norm)
        if visibility is None:
            values, stat = kernels.motion_targets(inputs.tracks, **kwargs)
            valid = None
        else:
            values, stat, valid = kernels.motion_targets_visible(inputs.tracks, visibility,
                                                                 visibility_threshold=o.visibility_threshold, **kwargs)
        return Prepared(values=values, valid=valid, side={"motion_stat": stat})
