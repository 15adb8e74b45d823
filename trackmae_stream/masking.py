"""Which tokens the encoder sees: mask policies as plug-ins behind one interface.

A policy is a class registered under a name with `@register_mask_policy` (the config's `mask.type`; its own options
are `mask.options.<key>`, declared by its `Options` dataclass). It receives what a policy may use (`MaskInputs`: the
micro-batch index that keys its draws, the clip count, the device, side outputs of the targets such as the motion
statistic, and for learned policies the patch embeddings of every token) and returns today's fixed-size
`MaskOutput`: exactly `num_visible` visible tokens per clip, in ascending order, so every shape in a step is fixed by
the configuration.

Built in: `tube` (VideoMAE's random tubes) and `motion` (TrackMAE's motion-aware tubes, ranked by `motion_stat`),
both drawn from the counter-based generator keyed by (seed, step, rank, clip): the same masks on CPU and GPU, in any
data-loader configuration, and again after a resume. A learned policy (`LearnedMaskPolicy`) is an nn.Module with its
own optimizer and checkpointed state; the trainer draws its masks in the training step (it needs the current patch
embeddings), adds its `mae_loss` term to the MAE loss, and calls `update` after the MAE optimizer step.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from . import kernels
from .config import MaskConfig
from .kernels import MaskOutput

MASK_POLICIES: dict[str, type[MaskPolicy]] = {}


def register_mask_policy(cls: type[MaskPolicy]) -> type[MaskPolicy]:
    """Class decorator: make a policy available as `mask.type=<cls.name>`."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in MASK_POLICIES and MASK_POLICIES[cls.name] is not cls:
        raise ValueError(f"a mask policy named {cls.name!r} is registered already")
    MASK_POLICIES[cls.name] = cls
    return cls


def unregister_mask_policy(name: str) -> None:
    MASK_POLICIES.pop(name, None)


@dataclass
class NoOptions:
    """A policy without options of its own."""


@dataclass(frozen=True)
class MaskGeometry:
    tokens_per_frame: int
    num_slots: int
    ratio: float

    @property
    def num_tokens(self) -> int:
        return self.tokens_per_frame * self.num_slots

    @property
    def visible_per_frame(self) -> int:
        return kernels.visible_per_frame(self.tokens_per_frame, self.ratio)

    @property
    def num_visible(self) -> int:
        """Visible tokens per clip, the same for every policy (tube masking's count)."""
        return self.visible_per_frame * self.num_slots

    @property
    def num_masked(self) -> int:
        return self.num_tokens - self.num_visible


@dataclass
class MaskInputs:
    """What a policy may use to draw the masks of one micro-batch."""

    step: int  # micro-batch index: keys the draws (the same after a resume)
    batch: int  # clips
    device: torch.device
    side: dict[str, Tensor] = field(default_factory=dict)  # targets' side outputs, e.g. "motion_stat" (B, S)
    tokens: Tensor | None = None  # learned policies: (B, N, D) patch embeddings of every token (carry gradients)


class MaskPolicy:
    """Base class of a mask policy. `needs` names the side outputs it reads (e.g. ("motion_stat",): the preparer
    then makes them even when no enabled target does)."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    needs: ClassVar[tuple[str, ...]] = ()
    learned: ClassVar[bool] = False

    def __init__(self, cfg: MaskConfig, geometry: MaskGeometry, *, seed: int, rank: int, options: Any):
        self.cfg = cfg
        self.geometry = geometry
        self.seed = seed
        self.rank = rank
        self.options = options

    @classmethod
    def check_options(cls, options: Any, key: str, fail: Callable[[str, Any, str], None]) -> None:
        """Range checks; call `fail(f"{key}.<option>", value, why)`."""

    def __call__(self, inputs: MaskInputs) -> MaskOutput:
        raise NotImplementedError


@register_mask_policy
class TubePolicy(MaskPolicy):
    """VideoMAE: K visible tokens per frame drawn uniformly (counter-based), repeated over time."""

    name = "tube"

    def __call__(self, inputs: MaskInputs) -> MaskOutput:
        g = self.geometry
        return kernels.tube_mask(inputs.batch, tokens_per_frame=g.tokens_per_frame, num_frames=g.num_slots,
                                 mask_ratio=g.ratio, seed=self.seed, step=inputs.step, rank=self.rank,
                                 device=inputs.device)


@register_mask_policy
class MotionAwarePolicy(MaskPolicy):
    """TrackMAE: tubes, a share `mask.rho` of the visible ones from the high-motion half of `motion_stat`."""

    name = "motion"
    needs = ("motion_stat",)

    def __call__(self, inputs: MaskInputs) -> MaskOutput:
        stat = inputs.side.get("motion_stat")
        if stat is None:
            raise ValueError("motion-aware masking needs the per-token motion statistic")
        return kernels.motion_aware_mask(stat, num_frames=self.geometry.num_slots, mask_ratio=self.geometry.ratio,
                                         rho=self.cfg.rho, seed=self.seed, step=inputs.step, rank=self.rank)


# ----------------------------------------------------------------------------------------------------------------------
# Learned policies


def step_generator(seed: int, step: int, rank: int, device: torch.device, stream: int = 0) -> torch.Generator:
    """A generator keyed by (seed, step, rank, stream): a learned policy's draws repeat after a resume. Seeding is a
    host operation (no device sync)."""
    key = ((seed * 1_000_003 + step) * 1_000_033 + rank) * 97 + stream
    return torch.Generator(device=device).manual_seed(key % (2 ** 63))


def sample_visible(logits: Tensor, num_visible: int, generator: torch.Generator) -> MaskOutput:
    """Draw `num_visible` distinct tokens per row from softmax(logits) without replacement (Gumbel top-k: the same
    distribution as sequential multinomial draws), returned in ascending token order as a MaskOutput."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    keys = logits.detach().float() + gumbel
    chosen = keys.topk(num_visible, dim=1).indices
    return mask_from_visible(chosen, logits.shape[1])


def mask_from_visible(visible: Tensor, num_tokens: int) -> MaskOutput:
    """(B, V) distinct visible token indices (any order) -> MaskOutput with both index lists ascending."""
    batch = visible.shape[0]
    mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=visible.device)
    mask.scatter_(1, visible, False)
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices  # visible (0) first, each part ascending
    v = visible.shape[1]
    return MaskOutput(mask, order[:, :v].contiguous(), order[:, v:].contiguous())


class LearnedMaskPolicy(MaskPolicy, nn.Module):
    """A policy with parameters and its own optimizer.

    Per micro-batch the trainer calls `sample(inputs)` -> (MaskOutput, aux) in the training step (inputs.tokens: the
    model's patch embeddings of every token, with gradients into the patch embedding: detach them for a stop-gradient
    policy), then `mae_loss(aux, token_error, mask)` (a term added to the MAE loss before its backward, e.g. AdaMAE's
    sampling loss, or None), and once per optimizer step, after the MAE optimizer step, `update(aux, token_error,
    mask, step)` (steps its own optimizer on what `mae_loss` left in its gradients, then anything else, e.g. PPO
    epochs). `token_error` (B, M) is the weighted sum over targets of each masked token's error, detached.
    Everything stays on the device (no host syncs); `update` returns device scalars for the log (`mask_<key>`).
    Its parameters, its optimizer's state and `extra_state()` go into the checkpoint (`mask_policy`)."""

    learned = True

    def __init__(self, cfg: MaskConfig, geometry: MaskGeometry, *, seed: int, rank: int, options: Any,
                 embed_dim: int):
        nn.Module.__init__(self)
        MaskPolicy.__init__(self, cfg, geometry, seed=seed, rank=rank, options=options)
        self.embed_dim = embed_dim
        self.optimizer: torch.optim.Optimizer | None = None

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Its own optimizer (called once the policy sits on its device)."""
        return torch.optim.AdamW(self.parameters(), lr=getattr(self.options, "lr", 1e-4), weight_decay=0.0)

    def setup(self, device: torch.device) -> None:
        """Move to the device and build the optimizer. Under torch.distributed rank 0's initial parameters are
        broadcast, and every gradient of the policy is averaged over the ranks as it is accumulated (a hook per
        parameter), so every rank keeps the same policy whichever optimizer steps it (`step_optimizer`, or PPO
        epochs of its own)."""
        self.to(device)
        self.optimizer = self.build_optimizer()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            with torch.no_grad():
                for tensor in list(self.parameters()) + list(self.buffers()):
                    dist.broadcast(tensor, src=0)

            def average(param: Tensor) -> None:
                dist.all_reduce(param.grad)
                param.grad.div_(world)

            for param in self.parameters():
                param.register_post_accumulate_grad_hook(average)

    def sample(self, inputs: MaskInputs) -> tuple[MaskOutput, Any]:
        raise NotImplementedError

    def __call__(self, inputs: MaskInputs) -> MaskOutput:  # type: ignore[override]
        return self.sample(inputs)[0]

    def mae_loss(self, aux: Any, token_error: Tensor, mask: MaskOutput) -> Tensor | None:
        return None

    def update(self, aux: Any, token_error: Tensor, mask: MaskOutput, step: int) -> dict[str, Tensor]:
        """Default: step the optimizer on the gradients `mae_loss` left (averaged over ranks), then clear them."""
        self.step_optimizer()
        return {}

    def step_optimizer(self) -> None:
        """Step the own optimizer on the gradients accumulated so far (already averaged over ranks), then clear
        them."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter state to checkpoint (e.g. running reward statistics as tensors)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def policy_state(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "extra": self.extra_state()}

    def load_policy_state(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"the checkpoint's mask policy is {state.get('name')!r}, this run's {self.name!r}")
        self.load_state_dict(state["model"])
        if state.get("optimizer") is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.load_extra_state(state.get("extra", {}))


# ----------------------------------------------------------------------------------------------------------------------


class MaskGenerator:
    """The run's mask policy, built from `mask.type` and `mask.options`; what the preparer and the trainer call."""

    def __init__(self, cfg: MaskConfig, *, tokens_per_frame: int, num_slots: int, seed: int, rank: int,
                 embed_dim: int | None = None):
        if cfg.type not in MASK_POLICIES:
            raise ValueError(f"mask.type={cfg.type!r}: expected one of {tuple(MASK_POLICIES)}")
        self.cfg = cfg
        self.geometry = MaskGeometry(tokens_per_frame, num_slots, cfg.ratio)
        cls = MASK_POLICIES[cfg.type]
        options = cls.Options(**{k: v for k, v in cfg.options.items()
                                 if k in {f.name for f in dataclasses.fields(cls.Options)}})
        kwargs = dict(seed=seed, rank=rank, options=options)
        if cls.learned:
            kwargs["embed_dim"] = embed_dim if embed_dim is not None else 0
        self.policy: MaskPolicy = cls(cfg, self.geometry, **kwargs)
        self.tokens_per_frame = tokens_per_frame
        self.num_slots = num_slots
        self.seed = seed

    @property
    def rank(self) -> int:
        """The rank that keys the draws."""
        return self.policy.rank

    @rank.setter
    def rank(self, value: int) -> None:
        # a copy of the policy: a shallow copy of this generator (tracker.placement=ranks keys one per training
        # rank) must not re-key the original's draws
        self.policy = copy.copy(self.policy)
        self.policy.rank = value

    @property
    def visible_per_frame(self) -> int:
        return self.geometry.visible_per_frame

    @property
    def num_visible(self) -> int:
        return self.geometry.num_visible

    @property
    def needs(self) -> tuple[str, ...]:
        return self.policy.needs

    @property
    def needs_motion(self) -> bool:
        return "motion_stat" in self.policy.needs

    @property
    def learned(self) -> bool:
        return self.policy.learned

    def __call__(self, step: int, batch: int, device: torch.device, token_stat: Tensor | None = None, *,
                 side: dict[str, Tensor] | None = None) -> MaskOutput:
        """Masks for micro-batch `step` of a non-learned policy; `side` holds the targets' side outputs
        (`token_stat` is the former name of side["motion_stat"])."""
        side = dict(side or {})
        if token_stat is not None:
            side["motion_stat"] = token_stat
        return self.policy(MaskInputs(step=step, batch=batch, device=device, side=side))


# The built-in learned policies register themselves on import (one line per module).
BUILTIN_MODULES = ("trackmae_stream.mask_policies.adamae", "trackmae_stream.mask_policies.tats_ref")
for _module in BUILTIN_MODULES:
    importlib.import_module(_module)

__all__ = ["MASK_POLICIES", "register_mask_policy", "unregister_mask_policy", "MaskPolicy", "LearnedMaskPolicy",
           "MaskInputs", "MaskGeometry", "MaskGenerator", "MaskOutput", "TubePolicy", "MotionAwarePolicy",
           "sample_visible", "mask_from_visible", "step_generator"]
