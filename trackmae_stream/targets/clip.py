"""The `clip` target: features of a frozen CLIP image tower at the first frame of every tubelet (TrackMAE's
CLIP variant; the paper's motion weight beside it is 0.25)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Prepared, Target, TargetContext, TargetInputs, register_target

log = logging.getLogger(__name__)


class ClipTeacher(nn.Module):
    """A frozen CLIP image tower (timm) giving one feature per token for the first frame of every tubelet.

    Fixes two flaws of the public code: frames get CLIP's own mean/std (not ImageNet's), and the weights come from a
    pinned local file when one is configured (else timm's hub download, which needs the network).
    Features: the last layer after its final LayerNorm (CLIP's ln_post), patch tokens only, standardised per channel
    across the clip's tokens. The frames are resized so that the teacher's token grid equals the student's.
    """

    def __init__(self, model_name: str, checkpoint: str | None, tokens_side: int):
        super().__init__()
        import timm

        kwargs = {"pretrained": True}
        if checkpoint:
            kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint)}
        try:
            self.model = timm.create_model(model_name, num_classes=0, dynamic_img_size=True, **kwargs)
        except Exception as exc:
            where = f"from {checkpoint}" if checkpoint else "from the hub (no target.clip_checkpoint set)"
            raise RuntimeError(f"cannot load the CLIP teacher {model_name!r} {where}: {exc}") from exc
        self.model.eval().requires_grad_(False)
        cfg = self.model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        patch = self.model.patch_embed.patch_size[0]
        self.tokens_side = tokens_side
        self.input_side = tokens_side * patch
        self.dim = self.model.embed_dim

    @torch.no_grad()
    def forward(self, frames_u8: Tensor) -> Tensor:
        """frames_u8 (B, T', H, W, 3) uint8, one frame per tubelet -> (B, T' * side², D) float32."""
        b, t = frames_u8.shape[:2]
        x = frames_u8.flatten(0, 1).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (self.input_side, self.input_side):
            x = F.interpolate(x, size=(self.input_side, self.input_side), mode="bicubic", align_corners=False,
                              antialias=True)
        x = (x - self.mean) / self.std
        feats = self.model.forward_features(x)[:, self.model.num_prefix_tokens:].float()
        feats = feats.reshape(b, t * self.tokens_side ** 2, self.dim)
        mean = feats.mean(dim=1, keepdim=True)
        var = feats.var(dim=1, unbiased=False, keepdim=True)
        return (feats - mean) * torch.rsqrt(var + 1e-6)


@dataclass
class ClipOptions:
    model: str = "vit_base_patch16_clip_224.openai"
    checkpoint: str | None = None  # local weights; None downloads through timm's hub when the network allows


@register_target
class ClipTarget(Target):
    name = "clip"
    Options = ClipOptions
    default_weight = 1.0

    def __init__(self, ctx: TargetContext, options: ClipOptions, *, load: bool = True):
        super().__init__(ctx, options)
        if load:
            self.teacher = ClipTeacher(options.model, options.checkpoint, ctx.tokens_side)
            self.dim = self.teacher.dim
        else:  # shape only: the width from the architecture, no weights
            import timm

            with torch.device("meta"):
                self.dim = timm.create_model(options.model, pretrained=False, num_classes=0).embed_dim
            self.teacher = None

    @classmethod
    def check_options(cls, options: ClipOptions, key: str, fail) -> None:
        from pathlib import Path

        if options.checkpoint and not Path(options.checkpoint).expanduser().is_file():
            fail(f"{key}.checkpoint", options.checkpoint, "file not found")

    def prepare(self, inputs: TargetInputs) -> Prepared:
        return Prepared(values=self.teacher(inputs.frames_u8[:, :: self.ctx.tubelet]))
