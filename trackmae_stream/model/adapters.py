"""State-dict adapters between this project's TrackMAE and the checkpoint formats people already have.

Formats:
  - "native": this project (`encoder.blocks.{i}.attn.qkv.bias` fused; one decoder per group
    `decoders.<group>.{encoder_to_decoder,blocks,norm}` and one head per target `heads.<target>`; no position tables,
    they are fixed sin-cos buffers). Checkpoints of the former native layout (a spatial decoder `decoder.*` with
    `encoder_to_decoder`, a motion decoder `motion_decoder.*` with `motion_encoder_to_decoder`) load too: the
    spatial decoder becomes the model's `pixel` (or `clip`) decoder and head, the motion one `track_motion`'s.
  - "videomae": MCG-NJU/VideoMAE and VideoMAE V2 pretraining checkpoints: `attn.q_bias` + `attn.v_bias` instead of a
    fused bias (the key bias is zero), no motion decoder, no position tables. VideoMAE's fine-tuning code reads this.
  - "trackmae_public": rvandeghen/TrackMAE: fused `attn.qkv.bias`, motion decoder `tracker_decoder.*` with projection
    `encoder_to_tracker`, and saved `encoder.pos_embed` / `decoder_pos_embed` buffers.
A key bias adds the same q·b_k to every logit of a query row, so softmax ignores it: dropping it on export to VideoMAE
is exact. Every load checks that every expected key arrived with its shape (transformers once loaded old q_bias/v_bias
checkpoints with the biases silently zero; that must not happen here).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import UserError

FORMATS = ("native", "videomae", "trackmae_public")
_QKV_BIAS = re.compile(r"^(.*\.attn)\.qkv\.bias$")
_Q_BIAS = re.compile(r"^(.*\.attn)\.q_bias$")
_PUBLIC_RENAMES = (("tracker_decoder.", "motion_decoder."), ("encoder_to_tracker.", "motion_encoder_to_decoder."))
# the target names the former fixed decoders stand for
SPATIAL_NAMES = ("pixel", "clip")
MOTION_NAME = "track_motion"


def _legacy_renames(spatial: str, motion: str) -> tuple[tuple[str, str], ...]:
    """Former single-decoder keys -> per-target keys (longest prefixes first)."""
    return (("motion_decoder.head.", f"heads.{motion}."), ("motion_decoder.", f"decoders.{motion}."),
            ("motion_encoder_to_decoder.", f"decoders.{motion}.encoder_to_decoder."),
            ("decoder.head.", f"heads.{spatial}."), ("decoder.", f"decoders.{spatial}."),
            ("encoder_to_decoder.", f"decoders.{spatial}.encoder_to_decoder."))


def spatial_name_of(names) -> str:
    """Which of a model's targets the former spatial decoder stands for (pixel unless only clip is there)."""
    names = list(names)
    return next((n for n in SPATIAL_NAMES if n in names), SPATIAL_NAMES[0])
_POSITION_TABLES = ("encoder.pos_embed", "decoder_pos_embed", "pos_embed")


class StateDictError(UserError, RuntimeError):
    """A checkpoint does not fit the model; the message lists the keys."""


def unwrap_checkpoint(obj: Mapping) -> dict[str, Tensor]:
    """The state dict inside a checkpoint file: `model`, `module` (DeepSpeed), `state_dict`, or the dict itself."""
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if sd and all(k.startswith("_orig_mod.") for k in sd):  # saved from torch.compile
        sd = {k[len("_orig_mod."):]: v for k, v in sd.items()}
    return sd


def detect_format(sd: Mapping[str, Tensor]) -> str:
    keys = set(sd)
    if any(k.startswith(("tracker_decoder.", "encoder_to_tracker.")) for k in keys) or "decoder_pos_embed" in keys:
        return "trackmae_public"
    if any(_Q_BIAS.match(k) for k in keys):
        return "videomae"
    return "native"


def to_native(sd: Mapping[str, Tensor], fmt: str | None = None, *, spatial: str = "pixel",
              motion: str = MOTION_NAME) -> tuple[dict[str, Tensor], str]:
    """Convert a state dict of any supported format (and the former native layout) to native keys; the former
    spatial and motion decoders become the targets `spatial` and `motion`. Returns (state dict, detected format)."""
    fmt = fmt or detect_format(sd)
    if fmt not in FORMATS:
        raise StateDictError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in _POSITION_TABLES:
            continue  # fixed sin-cos tables are rebuilt by the model
        if key.endswith(".attn.v_bias"):
            continue  # consumed with its q_bias
        if m := _Q_BIAS.match(key):
            prefix = m.group(1)
            v_key = f"{prefix}.v_bias"
            if v_key not in sd:
                raise StateDictError(f"{key} has no matching {v_key}")
            key, value = f"{prefix}.qkv.bias", torch.cat([value, torch.zeros_like(value), sd[v_key]])
        if fmt == "trackmae_public":
            for old, new in _PUBLIC_RENAMES:
                if key.startswith(old):
                    key = new + key[len(old):]
        for old, new in _legacy_renames(spatial, motion):
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out, fmt


def from_native(sd: Mapping[str, Tensor], fmt: str, num_tokens: int | None = None) -> dict[str, Tensor]:
    """Export native keys to `fmt`. "videomae" keeps the encoder, the pixel (or CLIP) decoder as `decoder.*` and the
    mask token. "trackmae_public" also maps the `track_motion` decoder to `tracker_decoder.*` and stores the fixed
    sin-cos tables (the public model registers them as buffers), so it needs `num_tokens`, the token count of the
    clips the model was trained on. Decoders of other targets have no place in those layouts and are left out."""
    if fmt == "native":
        return dict(sd)
    if fmt not in FORMATS:
        raise StateDictError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    sd, _ = to_native(sd)  # a checkpoint of the former layout exports too
    heads = {k.split(".")[1] for k in sd if k.startswith("heads.")}
    spatial = spatial_name_of(heads)
    renames = [(new, old) for old, new in _legacy_renames(spatial, MOTION_NAME)]
    if fmt == "videomae":
        renames = [(new, old) for new, old in renames if not old.startswith("motion_")]
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith(("decoders.", "heads.")):
            for new, old in renames:
                if key.startswith(new):
                    key = old + key[len(new):]
                    break
            else:
                continue  # a decoder the layout has no place for
        if fmt == "videomae":
            if m := _QKV_BIAS.match(key):
                q, _, v = value.chunk(3)
                out[f"{m.group(1)}.q_bias"] = q.clone()
                out[f"{m.group(1)}.v_bias"] = v.clone()
                continue
        else:
            for new, old in ((n, o) for o, n in _PUBLIC_RENAMES):
                if key.startswith(new):
                    key = old + key[len(new):]
        out[key] = value
    if fmt == "trackmae_public":
        if num_tokens is None:
            raise StateDictError("the public TrackMAE layout stores the position tables: give num_tokens")
        from .vit import sinusoid_table

        out["encoder.pos_embed"] = sinusoid_table(num_tokens, sd["encoder.norm.weight"].shape[0])[None]
        out["decoder_pos_embed"] = sinusoid_table(num_tokens, sd["mask_token"].shape[-1])[None]
    return out


def load_model_state(model: nn.Module, state: Mapping, *, source: str = "checkpoint", fmt: str | None = None,
                     allow_missing_prefixes: tuple[str, ...] = ()) -> str:
    """Load any supported format into `model`, strictly: missing keys, unexpected keys and shape mismatches are an
    error that lists them. `allow_missing_prefixes` admits deliberate gaps (e.g. ("decoders.track_motion.",
    "heads.track_motion.") to start TrackMAE from a VideoMAE checkpoint with a fresh motion decoder). Returns the
    detected format."""
    from ..checkpoint import state_dict_problems

    heads = {k.split(".")[1] for k in model.state_dict() if k.startswith("heads.")}
    sd, fmt = to_native(unwrap_checkpoint(state), fmt, spatial=spatial_name_of(heads))
    problems = state_dict_problems(model.state_dict(), sd, allow_missing_prefixes)
    if problems:
        raise StateDictError(f"{source} ({fmt} format) does not fit the model: " + "; ".join(problems))
    model.load_state_dict(sd, strict=not allow_missing_prefixes)
    return fmt


_FORMER_PREFIXES = ("decoder.", "encoder_to_decoder.", "motion_decoder.", "motion_encoder_to_decoder.")


def is_former_layout(sd: Mapping[str, Tensor]) -> bool:
    """Whether a native state dict has the former fixed decoders (`decoder.*`, `motion_decoder.*`)."""
    return any(k.startswith(_FORMER_PREFIXES) for k in sd)


def _groups_by_rule(names: list[str], shapes: Mapping[str, tuple[int, ...]], skip: set[str]) -> list[list[str]]:
    """`optim.parameter_groups`' split of parameter names: [decayed, not decayed], each in parameter order."""
    decay = [n for n in names if not (len(shapes[n]) <= 1 or n in skip)]
    no_decay = [n for n in names if len(shapes[n]) <= 1 or n in skip]
    return [decay, no_decay]


def former_optimizer_state(optimizer_state: Mapping, saved_model: Mapping[str, Tensor], model: nn.Module) -> dict:
    """The AdamW state of a training checkpoint of the former layout, re-indexed for `model`'s parameters.

    torch numbers an optimizer's parameters by position (decayed group first, then the rest, each in
    `named_parameters` order). The former model registered its decoders in another order, so the saved positions are
    recovered from the saved state dict (its keys are the former parameters in registration order; no buffer is
    persistent) and the grouping rule of `optim.parameter_groups`, then mapped by name."""
    heads = {k.split(".")[1] for k in model.state_dict() if k.startswith("heads.")}
    renames = _legacy_renames(spatial_name_of(heads), MOTION_NAME)

    def native(key: str) -> str:
        for old, new in renames:
            if key.startswith(old):
                return new + key[len(old):]
        return key

    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    old_names = [native(k) for k in saved_model]
    old_shapes = {native(k): tuple(v.shape) for k, v in saved_model.items()}
    old_groups = _groups_by_rule(old_names, old_shapes, skip)
    params = dict(model.named_parameters())
    new_groups = _groups_by_rule(list(params), {n: tuple(p.shape) for n, p in params.items()}, skip)
    saved_groups = optimizer_state["param_groups"]
    if len(saved_groups) != 2 or [len(g["params"]) for g in saved_groups] != [len(g) for g in old_groups]:
        raise StateDictError("the checkpoint's optimizer groups do not match the former layout's parameters")
    old_index = {name: saved_id for names, group in zip(old_groups, saved_groups)
                 for name, saved_id in zip(names, group["params"])}
    state, groups, position = {}, [], 0
    for saved_group, names in zip(saved_groups, new_groups):
        indices = []
        for name in names:
            if name not in old_index:
                raise StateDictError(f"the former checkpoint has no optimizer state for {name}")
            source = old_index[name]
            if source in optimizer_state["state"]:
                state[position] = optimizer_state["state"][source]
            indices.append(position)
            position += 1
        groups.append({**saved_group, "params": indices})
    return {"state": state, "param_groups": groups}
