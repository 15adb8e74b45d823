"""What the decoders learn to predict at the masked tokens: motion targets from tracks, per-patch-normalised pixels,
or CLIP features.

The arithmetic lives in `trackmae_stream.kernels` (Triton on CUDA, the torch reference twin elsewhere); this module
binds it to the run configuration and owns the CLIP teacher.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import TrainConfig, tokens_per_side, tracker_grid_size

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


class TargetBuilder(nn.Module):
    """Per-batch targets at the masked tokens, in the same ascending token order as `masked_idx`."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        t = cfg.target
        self.tokens_side = tokens_per_side(cfg)
        self.tubelet = cfg.model.tubelet_size
        self.patch = cfg.model.patch_size
        self.teacher = ClipTeacher(t.clip_model, t.clip_checkpoint, self.tokens_side) if t.spatial == "clip" else None

    @property
    def spatial_dim(self) -> int | None:
        if self.cfg.target.spatial == "pixel":
            return 3 * self.tubelet * self.patch ** 2
        if self.cfg.target.spatial == "clip":
            return self.teacher.dim
        return None

    @property
    def motion_dim(self) -> int | None:
        if not self.cfg.target.motion:
            return None
        side = tracker_grid_size(self.cfg) * self.cfg.target.upsample // self.tokens_side
        return 2 * side * side

    def _visibility(self, visibility: Tensor | None) -> Tensor | None:
        """The visibility to use: None unless target.drop_invisible (then it is required)."""
        if not self.cfg.target.drop_invisible:
            return None
        if visibility is None:
            raise ValueError("target.drop_invisible=true needs the tracker's visibility (B, T', G²)")
        return visibility

    def motion(self, tracks: Tensor, visibility: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """tracks (B, T', G², 2), visibility (B, T', G²) -> (targets for all tokens (B, N, motion_dim), binning
        statistic (B, side²), validity (B, N, motion_dim) bool). With target.drop_invisible off the visibility is
        ignored and the validity is None (every value counts: the official definition); on, invalid values are 0
        and False (definition: `kernels.motion`)."""
        t = self.cfg.target
        kwargs = dict(tokens_side=self.tokens_side, upsample=t.upsample, displacement=t.displacement,
                      norm=t.motion_norm)
        visibility = self._visibility(visibility)
        if visibility is None:
            targets, token_stat = kernels.motion_targets(tracks, **kwargs)
            return targets, token_stat, None
        return kernels.motion_targets_visible(tracks, visibility, visibility_threshold=t.visibility_threshold,
                                              **kwargs)

    def motion_stat(self, tracks: Tensor, visibility: Tensor | None = None) -> Tensor:
        """tracks (B, T', G², 2) -> the binning statistic (B, side²) alone (motion-aware masking, no motion target);
        over visible steps only when target.drop_invisible."""
        return kernels.motion_token_stat(tracks, tokens_side=self.tokens_side, visibility=self._visibility(visibility),
                                         visibility_threshold=self.cfg.target.visibility_threshold)

    def spatial(self, frames_u8: Tensor, masked_idx: Tensor) -> Tensor | None:
        """frames_u8 (B, T, H, W, 3) -> (B, M, spatial_dim) at `masked_idx`."""
        if self.cfg.target.spatial == "pixel":
            return kernels.pixel_targets(frames_u8, masked_idx, tubelet=self.tubelet, patch=self.patch,
                                         layout="BTHWC", normalize=self.cfg.target.normalize_pixels)
        if self.cfg.target.spatial == "clip":
            features = self.teacher(frames_u8[:, :: self.tubelet])
            return kernels.gather_tokens(features, masked_idx)
        return None
