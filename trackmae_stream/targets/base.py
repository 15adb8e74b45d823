"""The target plug-in interface and its registry.

A target is one class, registered under a name with `@register_target`:

    @register_target
    class Edges(Target):
        name = "edges"                      # the config key: target.edges.<option>=...
        Options = EdgesOptions              # a dataclass of its own options (validated, named in errors)
        def __init__(self, ctx, options): super().__init__(ctx, options); self.dim = 3 * ctx.tubelet * ctx.patch ** 2
        def prepare(self, inputs): return Prepared(values=...)   # (B, N, dim) for every token, or compute in `at`

Everything else (the decoder head, the loss, the `loss_<name>` / `rel_<name>` log keys, the batch's wire format with
tracker.placement=ranks, the checkpoint keys `heads.<name>.*`) follows from the name. Per target the config holds
the common keys `enabled`, `weight`, `decoder` (targets naming the same decoder share its blocks, each with its own
head), `head` ("linear" | "mlp"), `head_hidden`, `activation` ("none" | "sigmoid" | "tanh"), plus its `Options`.

Computation runs on the preparation stream (a side stream on CUDA), in two phases: `prepare` before the mask is
drawn (it may publish side outputs, e.g. the `motion_stat` that motion-aware masking ranks tokens by), and `at`
after, which returns the values at the masked tokens (the default gathers `prepare`'s all-token values). A target
with a validity tensor marks values (B, M, dim) or whole tokens (B, M) that stay out of the loss.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import kernels

# name -> target class; filled by @register_target (the built-in modules are imported by trackmae_stream.targets)
TARGETS: dict[str, type[Target]] = {}

# Options every target has, with their defaults (None: the target class's default)
COMMON_KEYS: dict[str, Any] = {
    "enabled": True,
    "weight": None,
    "decoder": None,
    "head": None,
    "head_hidden": 512,
    "activation": None,
}
HEADS = ("linear", "mlp")
ACTIVATIONS = ("none", "sigmoid", "tanh")
# side outputs a mask policy may ask for; the target class that can make each one alone (`stat_only`)
SIDE_OUTPUT_PROVIDERS: dict[str, str] = {"motion_stat": "track_motion"}


def register_target(cls: type[Target]) -> type[Target]:
    """Class decorator: make a target available under `cls.name` (the config's `target.<name>`)."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in TARGETS and TARGETS[cls.name] is not cls:
        raise ValueError(f"a target named {cls.name!r} is registered already ({TARGETS[cls.name].__module__})")
    TARGETS[cls.name] = cls
    return cls


def unregister_target(name: str) -> None:
    """Remove a registered target (tests that register toy targets clean up with this)."""
    TARGETS.pop(name, None)


@dataclass
class NoOptions:
    """A target without options of its own."""


@dataclass
class TargetContext:
    """What a target may know of the run when it is built: clip geometry, the tracker's grid, the device."""

    tokens_side: int  # tokens per side of a frame
    num_slots: int  # tubelets per clip
    tubelet: int
    patch: int
    input_size: int
    num_frames: int
    grid_size: int  # tracker query points per side
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def num_tokens(self) -> int:
        return self.num_slots * self.tokens_side ** 2


@dataclass
class TargetInputs:
    """What one batch offers the targets on the preparation stream."""

    frames_u8: Tensor  # (B, T, H, W, 3) uint8 on the device
    tracks: Tensor | None = None  # (B, T', G², 2) clip pixels, tracked from the first frame of every tubelet
    visibility: Tensor | None = None  # (B, T', G²) in [0, 1]
    # per-slot windows (targets with `needs_tracker`): track_windows(grid side G, offsets (o_0, ..., o_K-1)) ->
    # TrackerOutput with tracks (B, T', K, G², 2) and visibility (B, T', K, G²): for every tubelet t, a G x G query
    # grid on clip frame t*tubelet + o_0 followed through frames t*tubelet + o_k, in clip pixels. The preparer
    # answers it with the run's tracker on those frames, or from the clip's source (tracker.backend=synthetic_gt).
    track_windows: Callable[[int, tuple[int, ...]], Any] | None = None
    cache: dict[str, Any] = field(default_factory=dict)  # shared between targets of one batch (e.g. a [0,1] video)


@dataclass
class Prepared:
    """`prepare`'s result: all-token values and validity (or None: computed in `at`), side outputs, anything else."""

    values: Tensor | None = None  # (B, N, dim)
    valid: Tensor | None = None  # (B, N, dim) or (B, N) bool
    side: dict[str, Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TargetLoss:
    loss: Tensor  # scalar, what enters L = Σ weight · loss
    zero: Tensor  # scalar, the loss of predicting zeros (the log's rel_<name> = loss / zero)
    token_error: Tensor  # (B, M) float32 detached per-token error (learned mask policies read it)


class Target(nn.Module):
    """Base class of a target plug-in (see the module doc). Subclasses set `name`, `dim` (in `__init__`) and
    implement `prepare` and/or `at`; the class attributes below are defaults a config may override per run."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    default_weight: ClassVar[float] = 1.0
    default_head: ClassVar[str] = "linear"
    default_activation: ClassVar[str] = "none"
    default_decoder: ClassVar[str | None] = None  # None: a decoder of its own, named like the target
    needs_tracks: ClassVar[bool] = False  # the preparer tracks the clip's grid when an enabled target says so
    needs_tracker: ClassVar[bool] = False  # calls `TargetInputs.track` itself (its own frames and grid)
    side_outputs: ClassVar[tuple[str, ...]] = ()  # names of `Prepared.side` entries it can publish
    picture: ClassVar[str | None] = None  # how visuals draws it: "pixels" | "flow" | None (not drawn)

    def __init__(self, ctx: TargetContext, options: Any):
        super().__init__()
        self.ctx = ctx
        self.options = options
        self.dim: int = 0
        self.stat_only = False  # built only for its side outputs (no loss, no decoder)

    # -- per run -----------------------------------------------------------------------------------------------------
    @property
    def has_validity(self) -> bool:
        """Whether batches carry a validity tensor for this target (fixed per run: the wire format depends on it)."""
        return False

    @property
    def validity_per_token(self) -> bool:
        """True: the validity is (B, M) (whole tokens); False: (B, M, dim)."""
        return False

    @classmethod
    def resolve_weight(cls, options: Any, enabled: dict[str, Any]) -> float:
        """The loss weight when the config gives none; `enabled` maps the run's enabled target names to their
        resolved options (e.g. the TrackMAE motion weight is 0.25 beside a CLIP target)."""
        return cls.default_weight

    @classmethod
    def check_options(cls, options: Any, key: str, fail: Callable[[str, Any, str], None]) -> None:
        """Range checks of the options; call `fail(f"{key}.<option>", value, why)`."""

    # -- per batch ---------------------------------------------------------------------------------------------------
    def prepare(self, inputs: TargetInputs) -> Prepared:
        """Before masking: all-token values (or nothing: `at` computes them) and side outputs."""
        return Prepared()

    def at(self, inputs: TargetInputs, prepared: Prepared, masked_idx: Tensor) -> tuple[Tensor, Tensor | None]:
        """The values (B, M, dim) at `masked_idx` (B, M) and their validity (or None)."""
        if prepared.values is None:
            raise NotImplementedError(f"target {self.name!r} implements neither prepare's values nor at()")
        values = kernels.gather_tokens(prepared.values, masked_idx)
        valid = None
        if prepared.valid is not None:
            if prepared.valid.dim() == 2:
                valid = torch.gather(prepared.valid, 1, masked_idx)
            else:  # bool rows: torch.gather (the Triton gather serves float rows)
                valid = kernels.gather_tokens(prepared.valid, masked_idx, backend="torch")
        return values, valid

    def loss(self, pred: Tensor, target: Tensor, valid: Tensor | None) -> TargetLoss:
        """Mean squared error over the masked tokens (float32); with a validity, over the valid values only (a batch
        with none gives 0: the count is clamped to 1, no host sync). Subclasses may define another form."""
        return mse_loss(pred, target, valid)


def mse_loss(pred: Tensor, target: Tensor, valid: Tensor | None) -> TargetLoss:
    pred, target = pred.float(), target.float()
    error = (pred - target).square()
    if valid is None:
        token_error = error.detach().mean(-1)
        return TargetLoss(error.mean(), target.detach().square().mean(), token_error)
    if valid.dim() == error.dim() - 1:
        valid = valid.unsqueeze(-1).expand_as(error)
    # `where`, not a product: whatever sits at an invalid value contributes neither loss nor gradient
    count = valid.sum().clamp(min=1).float()
    kept = torch.where(valid, error, 0.0)
    per_token_count = valid.sum(-1).clamp(min=1).float()
    token_error = kept.detach().sum(-1) / per_token_count
    return TargetLoss(kept.sum() / count, torch.where(valid, target.detach().square(), 0.0).sum() / count,
                      token_error)


def options_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}
