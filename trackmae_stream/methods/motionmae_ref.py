"""`motionmae_ref`: our reference design of MotionMAE's frame-difference target (SPEC §1.4), NOT the authors' one.

MotionMAE (arXiv 2210.04154) reconstructs masked patches and "additionally predict[s] the corresponding motion
structure information over time ... available at the temporal difference of nearby frames". Its code is unreleased
(happy-hsy/MotionMAE holds only a README and GIFs) and the paper body was not reachable, so the exact definition is
unknown: the frame interval, grey or RGB, normalisation, the head and the weight. This module pins one reference
design (../shared/reference/seed_methods/SPEC.md §1.4; vectors `motionmae_reference_vectors.npz`); name results
"MotionMAE-ref" / `motionmae_ref`, never "MotionMAE".

Reference definition:
- appearance: the official VideoMAE target (per patch and channel (v - mean) / (std_unbiased + 1e-6) of the [0, 1]
  frames, values in (p0 p1 p2) c order), i.e. the project's `kernels.pixel_targets`;
- motion: D_t = x_t - x_{t-1} on the un-normalised [0, 1] SAMPLED frames for t >= 1 and D_0 := D_1 (so slot 0 is not
  half empty), patchified exactly like the appearance target, used raw (values in [-1, 1]; `normalize=False`, the
  primary choice) or per-patch normalised (`normalize=True`, a variant that turns near-static patches into amplified
  noise);
- loss: L = MSE_app + weight * MSE_mot, each the mean over masked tokens and values (weight 1).

Token order: n = (t*h + hp)*w + wp (VideoMAE's Conv3d order); values per token kt*p*p*3 = 1536 at kt = 2, p = 16,
index ((f*p + r)*p + col)*3 + c for frame f of the tubelet, pixel row r, column col, channel c.
Torch, batch-first, device-agnostic, no host syncs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import kernels
from ..constants import IMAGENET_MEAN, IMAGENET_STD
from .mme import device_constant

NAME = "motionmae_ref"
LAYOUTS = ("BTHWC", "BCTHW")


def _unit_frames(video: Tensor, layout: str, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """The [0, 1] frames as (B, 3, T, H, W) float32, recovered as the pixel targets do (u8 / 255, or x*std + mean)."""
    if layout not in LAYOUTS:
        raise ValueError(f"motionmae_ref: layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(video, Tensor) or video.ndim != 5:
        raise ValueError(f"motionmae_ref: video must be a 5-d tensor ({layout}), got "
                         f"{tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__}")
    if layout == "BTHWC":
        if video.dtype != torch.uint8 or video.shape[-1] != 3:
            raise ValueError(f"motionmae_ref: layout BTHWC expects uint8 (B, T, H, W, 3), got {video.dtype} "
                             f"{tuple(video.shape)}")
        return video.permute(0, 4, 1, 2, 3).float() / 255.0
    if not video.is_floating_point() or video.shape[1] != 3:
        raise ValueError(f"motionmae_ref: layout BCTHW expects a float (B, 3, T, H, W) ImageNet-normalised video, "
                         f"got {video.dtype} {tuple(video.shape)}")
    m = device_constant(tuple(float(v) for v in mean), video.device).view(1, 3, 1, 1, 1)
    s = device_constant(tuple(float(v) for v in std), video.device).view(1, 3, 1, 1, 1)
    return video.float() * s + m


def motionmae_ref_differences(video: Tensor, *, layout: str = "BTHWC", mean: tuple[float, ...] = IMAGENET_MEAN,
                              std: tuple[float, ...] = IMAGENET_STD) -> Tensor:
    """Frame differences of the sampled clip: (B, 3, T, H, W) float32, D_t = x_t - x_{t-1} (t >= 1), D_0 = D_1.

    video: "BTHWC" uint8 (B, T, H, W, 3) raw frames (the trainer's layout) or "BCTHW" float (B, 3, T, H, W)
    ImageNet-normalised (un-normalised with mean/std first). Needs T >= 2."""
    unit = _unit_frames(video, layout, mean, std)
    if unit.shape[2] < 2:
        raise ValueError(f"motionmae_ref: need T >= 2 frames for a difference, got T={unit.shape[2]}")
    diff = unit[:, :, 1:] - unit[:, :, :-1]
    return torch.cat([diff[:, :, :1], diff], dim=2)


def motionmae_ref_target(video: Tensor, idx: Tensor | None = None, *, tubelet: int = 2, patch: int = 16,
                         layout: str = "BTHWC", normalize: bool = False, eps: float = 1e-6,
                         mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                         backend: str | None = None) -> Tensor:
    """The motion target: (B, M, tubelet*patch*patch*3) float32 at tokens `idx` (B, M) (None: all N tokens).

    video as `motionmae_ref_differences`. Raw differences in [-1, 1] (normalize=False, the reference's primary
    choice) or standardised per patch and channel like VideoMAE's pixels (normalize=True). Patchified by the project's
    pixel-target kernel, so the layout equals `kernels.pixel_targets`' ((p0 p1 p2) c; see the module doc)."""
    diff = motionmae_ref_differences(video, layout=layout, mean=mean, std=std)
    return kernels.pixel_targets(diff, idx, tubelet=tubelet, patch=patch, layout="BCTHW", mean=(0.0, 0.0, 0.0),
                                 std=(1.0, 1.0, 1.0), normalize=normalize, eps=eps, backend=backend)


def motionmae_ref_appearance_target(video: Tensor, idx: Tensor | None = None, *, tubelet: int = 2, patch: int = 16,
                                    layout: str = "BTHWC", backend: str | None = None) -> Tensor:
    """The appearance target: VideoMAE's per-patch-normalised pixels, (B, M, tubelet*patch*patch*3) float32 at
    tokens `idx` (None: all). Exactly `kernels.pixel_targets(..., normalize=True)` (ImageNet mean/std for BCTHW)."""
    return kernels.pixel_targets(video, idx, tubelet=tubelet, patch=patch, layout=layout, normalize=True,
                                 backend=backend)


class MotionMAERefLoss(NamedTuple):
    loss: Tensor  # scalar app + weight * mot
    app: Tensor  # scalar
    mot: Tensor  # scalar
    per_token: Tensor  # (B, M): app_err + weight * mot_err per token; its mean is `loss`


def motionmae_ref_token_losses(pred_app: Tensor, target_app: Tensor, pred_mot: Tensor,
                               target_mot: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token mean squared errors (B, M) of the appearance and motion predictions, each (B, M, D), float32."""
    if pred_app.shape != target_app.shape or pred_mot.shape != target_mot.shape or pred_app.ndim != 3 \
            or pred_app.shape[:2] != pred_mot.shape[:2]:
        raise ValueError(f"motionmae_ref: need (B, M, D) predictions shaped like their targets, got "
                         f"{tuple(pred_app.shape)} vs {tuple(target_app.shape)}, {tuple(pred_mot.shape)} vs "
                         f"{tuple(target_mot.shape)}")
    app = (pred_app.float() - target_app.float()).square().mean(-1)
    mot = (pred_mot.float() - target_mot.float()).square().mean(-1)
    return app, mot


def motionmae_ref_loss(pred_app: Tensor, target_app: Tensor, pred_mot: Tensor, target_mot: Tensor, *,
                       weight: float = 1.0) -> MotionMAERefLoss:
    """L = MSE_app + weight * MSE_mot over the masked tokens given (VideoMAE's nn.MSELoss: mean over tokens and
    values); shapes as `motionmae_ref_token_losses`."""
    app, mot = motionmae_ref_token_losses(pred_app, target_app, pred_mot, target_mot)
    loss_app, loss_mot = app.mean(), mot.mean()
    return MotionMAERefLoss(loss_app + weight * loss_mot, loss_app, loss_mot, app + weight * mot)
