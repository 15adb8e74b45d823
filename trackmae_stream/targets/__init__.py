"""What the decoders learn to predict at the masked tokens: target plug-ins and their registry.

Built in: `pixel` (VideoMAE's per-patch normalised pixels), `clip` (CLIP ViT features), `track_motion` (TrackMAE's
motion from tracks, kernel-fused), and the other seed methods' targets (`mme_traj`, `mme_hog`, `motionmae_ref`) where
their arithmetic is installed. A new target is one module defining a `Target` subclass plus one line in
`BUILTIN_MODULES` below (or `@register_target` in your own module, imported before the config is loaded); the
interface is in `trackmae_stream.targets.base`.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig, tokens_per_side, tracker_grid_size
from .base import (
    ACTIVATIONS,
    COMMON_KEYS,
    HEADS,
    SIDE_OUTPUT_PROVIDERS,
    TARGETS,
    NoOptions,
    Prepared,
    Target,
    TargetContext,
    TargetInputs,
    TargetLoss,
    mse_loss,
    options_dict,
    register_target,
    unregister_target,
)
from .clip import ClipTarget, ClipTeacher

log = logging.getLogger(__name__)

# The registry: one line per built-in target module (each registers its classes on import).
BUILTIN_MODULES = (
    "trackmae_stream.targets.pixel",
    "trackmae_stream.targets.clip",
    "trackmae_stream.targets.track_motion",
    "trackmae_stream.targets.mme",
    "trackmae_stream.targets.motionmae_ref",
)
for _module in BUILTIN_MODULES:
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as exc:  # a target whose arithmetic module is not installed yet
        if not (exc.name or "").startswith("trackmae_stream"):
            raise
        log.debug("target module %s not available: %s", _module, exc)


def target_context(cfg: TrainConfig, device: torch.device | None = None) -> TargetContext:
    return TargetContext(tokens_side=tokens_per_side(cfg), num_slots=cfg.data.num_frames // cfg.model.tubelet_size,
                         tubelet=cfg.model.tubelet_size, patch=cfg.model.patch_size, input_size=cfg.data.input_size,
                         num_frames=cfg.data.num_frames, grid_size=tracker_grid_size(cfg), mean=tuple(cfg.data.mean),
                         std=tuple(cfg.data.std), device=device or torch.device("cpu"))


def build_target(name: str, entry: dict[str, Any], ctx: TargetContext, *, load: bool = True) -> Target:
    cls = TARGETS[entry["type"]]
    fields = {k: v for k, v in entry.items() if k not in COMMON_KEYS and k != "type"}
    options = cls.Options(**fields)
    if cls is ClipTarget:
        return cls(ctx, options, load=load)
    return cls(ctx, options)


class TargetBuilder(nn.Module):
    """The run's enabled targets (in decoder order) plus the providers of side outputs the mask policy needs when no
    enabled target publishes them (e.g. `motion_stat` from tracks for motion-aware masking of a pixel-only run).

    `load=False` builds shapes only (a CLIP target's width without its weights)."""

    def __init__(self, cfg: TrainConfig, device: torch.device | None = None, *, needs: tuple[str, ...] | None = None,
                 load: bool = True):
        super().__init__()
        self.cfg = cfg
        self.ctx = target_context(cfg, device)
        enabled = cfg.target.enabled()
        self.targets = nn.ModuleDict({name: build_target(name, entry, self.ctx, load=load)
                                      for name, entry in enabled.items()})
        self.weights = {name: float(entry["weight"]) for name, entry in enabled.items()}
        if needs is None:
            from ..masking import MASK_POLICIES

            needs = MASK_POLICIES[cfg.mask.type].needs
        self.providers = nn.ModuleDict()
        for side in needs:
            if any(side in t.side_outputs for t in self.targets.values()):
                continue
            if side not in SIDE_OUTPUT_PROVIDERS:
                raise ValueError(f"no target can provide the side output {side!r} the mask policy needs")
            kind = SIDE_OUTPUT_PROVIDERS[side]
            name, entry = next(((n, e) for n, e in cfg.target.items() if e["type"] == kind), (kind, None))
            if entry is None:
                from ..config import resolve_targets

                entry = resolve_targets({kind: {}})[kind]
            provider = build_target(name, entry, self.ctx, load=load)
            provider.stat_only = True
            self.providers[side] = provider

    # -- shapes ------------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.targets)

    @property
    def dims(self) -> dict[str, int]:
        return {name: t.dim for name, t in self.targets.items()}

    @property
    def needs_tracks(self) -> bool:
        """Whether the preparer tracks the clip's query grid (the pipeline's tracks)."""
        return any(t.needs_tracks for t in list(self.targets.values()) + list(self.providers.values()))

    @property
    def needs_tracker(self) -> bool:
        """Whether the run needs a tracker at all (the pipeline's tracks, or a target that tracks on its own)."""
        return self.needs_tracks or any(t.needs_tracker for t in self.targets.values())

    def validity_shapes(self) -> dict[str, str]:
        """name -> "value" | "token" for the targets whose batches carry a validity tensor."""
        return {name: ("token" if t.validity_per_token else "value") for name, t in self.targets.items()
                if t.has_validity}

    # -- per batch ---------------------------------------------------------------------------------------------------
    def prepare(self, inputs: TargetInputs) -> tuple[dict[str, Prepared], dict[str, torch.Tensor]]:
        """Every target's (and provider's) `prepare`; returns (per target, merged side outputs)."""
        prepared = {name: t.prepare(inputs) for name, t in self.targets.items()}
        side: dict[str, torch.Tensor] = {}
        for p in prepared.values():
            side.update(p.side)
        for key, provider in self.providers.items():
            side[key] = provider.prepare(inputs).side[key]
        return prepared, side

    def at(self, inputs: TargetInputs, prepared: dict[str, Prepared], masked_idx: torch.Tensor):
        """(values, valid) per target at `masked_idx`."""
        values, valid = {}, {}
        for name, t in self.targets.items():
            v, ok = t.at(inputs, prepared[name], masked_idx)
            values[name] = v
            if t.has_validity:
                valid[name] = ok
        return values, valid


__all__ = [
    "ACTIVATIONS", "BUILTIN_MODULES", "COMMON_KEYS", "ClipTarget", "ClipTeacher", "HEADS", "NoOptions", "Prepared",
    "SIDE_OUTPUT_PROVIDERS", "TARGETS", "Target", "TargetBuilder", "TargetContext", "TargetInputs", "TargetLoss",
    "build_target", "mse_loss", "options_dict", "register_target", "target_context", "unregister_target",
]
