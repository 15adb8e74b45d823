"""Typed run configuration: dataclasses, YAML presets and `section.key=value` command-line overrides.

A run is fully described by one `TrainConfig`. Presets live in `trackmae_stream/configs/*.yaml`; a preset may name a
`base:` preset that it extends. Overrides are parsed as YAML scalars (`optim.lr=1e-4`, `data.scales=[1,0.875]`,
`tracker.checkpoint=null`). `validate()` checks every value that could fail late and names the offending key.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from .constants import IMAGENET_MEAN, IMAGENET_STD
from .errors import UserError

PRESET_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


@dataclass
class DataConfig:
    source: str = "synthetic"  # "synthetic" (embedded, generated on first use) | "list" (VideoMAE-format list file)
    list_file: str | None = None  # `path label` or `path 0 -1` lines
    root: str | None = None  # relative list paths resolve against this (default: the list file's folder)
    # folder holding the synthetic sets, one `synthetic-v<version>-<hash>` folder per parameter set (default:
    # $TRACKMAE_CACHE_DIR or ~/.cache/trackmae_stream)
    synthetic_dir: str | None = None
    synthetic_videos: int = 48
    synthetic_size: int = 128
    synthetic_frames: int = 40
    # what decides the class: "motion" (direction of travel alone, 8 classes) | "legacy" (set version 2: direction x
    # rotation sense, frame-0 positions leak the direction); data/synthetic.py
    synthetic_task: str = "motion"
    loader: str = "cpu"  # "cpu" (DataLoader workers) | "dali" (DALI pipeline; GPU decode with device=cuda)
    decoder: str = "opencv"  # CPU decoder: "opencv" | "pyav"
    num_frames: int = 16
    sampling_rate: int = 4
    input_size: int = 224
    scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)  # VideoMAE's GroupMultiScaleCrop
    flip: bool = False  # VideoMAE pretraining does not flip
    num_sample: int = 1  # VideoMAE V2 repeated sampling: clips cut from one decode
    num_workers: int = 8
    prefetch_batches: int = 2  # per CPU worker; each holds a uint8 batch in shared memory (/dev/shm)
    probe_cache: str | None = None  # DALI: JSON cache of the up-front list probe (default: in the cache folder)
    max_skip_fraction: float = 0.1  # abort when more than this share of visited videos failed to decode
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class TrackerConfig:
    # "auto": cotracker3 when a checkpoint is set, else synthetic_gt on the synthetic set tracked inline, else
    # lucas-kanade (`resolve_tracker`) | "cotracker3" | "lucas-kanade" | "synthetic_gt" (exact tracks of the synthetic
    # set, read from its files: separates tracker quality from the method)
    backend: str = "auto"
    checkpoint: str | None = None  # local CoTracker3 file (scaled_offline.pth) or "official" (hub download)
    sha256: str | None = None
    variant: str = "offline"  # "offline" | "online"
    grid_size: int = 14  # query points per side; 0 means "one per token" (= input_size / patch_size)
    grid_rule: str = "cotracker"  # "cotracker" (public TrackMAE) | "naive" | "patch_centred"
    iters: int = 6
    resolution: str = "official"  # "official" (resize to 384x512) | "native" (track at the clip's size)
    precision: str = "fp32"  # "fp32" | "bf16" (autocast)
    compile: bool = False
    cuda_graph: bool = False  # CoTracker3 on CUDA: capture the network once per shape and replay it
    overlap: bool = True  # CUDA: prepare batch i+1 (decode copy, tracking, targets) on a side stream during step i
    # Where tracks come from (README, "Tracker placement"): "inline" tracks every clip in the training process;
    # "store" reads tracks of K fixed windows per video from a track store (filled on a miss, or ahead of time by
    # `python -m trackmae_stream.tracks precompute`) and remaps them to each clip's crop; "ranks" leaves decoding
    # and tracking to `tracking_ranks` ranks of the torchrun world, which send prepared batches to the others.
    placement: str = "inline"
    windows_per_video: int = 4  # K: clip windows per video the store holds (placement=store); the clip start is
    #                             drawn among them
    store_path: str | None = None  # default: <cache folder>/tracks
    store_grid: int = 28  # query points per side over the whole stored frame (denser than the clip's grid)
    store_size: int = 256  # the whole frame is tracked at store_size x store_size
    tracking_ranks: int = 1  # placement=ranks: how many of the world's ranks track (the last ones)


class TargetSet(dict):
    """The `target` section: target name -> its resolved options (`enabled`, `weight`, `type`, `decoder`, `head`,
    `head_hidden`, `activation` and the target's own; `trackmae_stream.targets`), in decoder order.

    Written in YAML or as overrides like any section (`target.track_motion.weight=0.5`, `target.pixel=false` to drop
    a default target, `target.mme_hog={}` to add one). The default set is TrackMAE's: `pixel` and `track_motion`.
    The keys of the former flat layout (`target.spatial`, `target.motion`, `target.motion_weight`, ...) are read as
    aliases of the new ones, so old presets and the configs stored in old checkpoints still load."""

    def enabled(self) -> dict[str, dict[str, Any]]:
        """The targets that train (name -> options), in order."""
        return {name: entry for name, entry in self.items() if entry["enabled"]}

    @property
    def spatial(self) -> str:
        """Read-only alias of the former `target.spatial` for code not yet moved to the target set: "clip" when a
        CLIP target trains, else "pixel" when a pixel one does, else "none". New code reads `enabled()`."""
        on = self.enabled()
        return "clip" if "clip" in on else "pixel" if "pixel" in on else "none"


DEFAULT_TARGETS: dict[str, Any] = {"pixel": {}, "clip": False, "track_motion": {}}
# former flat keys -> (target, option); `spatial` is handled on its own
LEGACY_TARGET_KEYS: dict[str, tuple[str, str]] = {
    "normalize_pixels": ("pixel", "normalize"),
    "clip_model": ("clip", "model"),
    "clip_checkpoint": ("clip", "checkpoint"),
    "motion": ("track_motion", "enabled"),
    "upsample": ("track_motion", "upsample"),
    "displacement": ("track_motion", "displacement"),
    "motion_norm": ("track_motion", "norm"),
    "motion_weight": ("track_motion", "weight"),
    "drop_invisible": ("track_motion", "drop_invisible"),
    "visibility_threshold": ("track_motion", "visibility_threshold"),
}


def _entry_dict(key: str, value: Any) -> dict[str, Any]:
    if value is None or value is False:
        return {"enabled": False}
    if value is True:
        return {"enabled": True}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r}: expected a mapping of the target's options, true or false")
    return dict(value)


def normalise_target_section(given: Any) -> Any:
    """The former flat keys of one `target` mapping (a preset file, an override set, a stored config) rewritten as
    entries of the new layout, so that merging presets and overrides keeps their precedence. An option given through
    a former key does not switch its target on (`target.upsample=2` leaves a disabled motion target disabled)."""
    if not isinstance(given, dict) or not any(k in LEGACY_TARGET_KEYS or k == "spatial" for k in given):
        return given
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key == "spatial":
            if value not in ("pixel", "clip", "none"):
                _fail("target.spatial", value, "expected one of ('pixel', 'clip', 'none')")
            for name in ("pixel", "clip"):
                out.setdefault(name, {})["enabled"] = value == name
        elif key in LEGACY_TARGET_KEYS:
            name, option = LEGACY_TARGET_KEYS[key]
            entry = out.setdefault(name, {})
            entry[option] = value
            if option != "enabled":
                entry.setdefault(_ALIAS, True)
        else:
            out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) \
                else value
    return out


_ALIAS = "__alias__"


def resolve_targets(given: dict[str, Any] | None) -> TargetSet:
    """The default target set updated by `given` (new or former layout), every option filled and checked; raises
    ConfigError naming the key (`target.<name>.<option>`). Naming a target enables it unless `enabled: false`."""
    from . import targets as registry  # registers the built-in targets

    if given is not None and not isinstance(given, dict):
        raise ConfigError(f"target={given!r}: a section; give its targets (e.g. target.pixel.normalize=false)")
    given = normalise_target_section(given or {})
    entries = {name: _entry_dict(f"target.{name}", v) for name, v in DEFAULT_TARGETS.items()}
    for name, value in given.items():
        update = _entry_dict(f"target.{name}", value)
        if update.pop(_ALIAS, False) and name in entries:  # options through former keys: keep the on/off state
            entries[name] = {**entries[name], **update}
        else:
            entries[name] = {**entries.get(name, {}), "enabled": True, **update}
    resolved: dict[str, dict[str, Any]] = {}
    classes = {}
    for name, entry in entries.items():
        key = f"target.{name}"
        entry = dict(entry)
        kind = entry.pop("type", name)
        if kind not in registry.TARGETS:
            _fail(key if kind == name else f"{key}.type", kind,
                  f"unknown target; registered: {sorted(registry.TARGETS)}")
        cls = registry.TARGETS[kind]
        common = {k: entry.pop(k, v) for k, v in registry.COMMON_KEYS.items()}
        options = _apply(cls.Options(), entry, f"{key}.")  # unknown keys and wrong types fail naming the key
        cls.check_options(options, key, _fail)
        enabled = _coerce(f"{key}.enabled", common["enabled"], bool)
        head = common["head"] if common["head"] is not None else cls.default_head
        if head not in registry.HEADS:
            _fail(f"{key}.head", head, f"expected one of {registry.HEADS}")
        activation = common["activation"] if common["activation"] is not None else cls.default_activation
        if activation not in registry.ACTIVATIONS:
            _fail(f"{key}.activation", activation, f"expected one of {registry.ACTIVATIONS}")
        hidden = _coerce(f"{key}.head_hidden", common["head_hidden"], int)
        if hidden < 1:
            _fail(f"{key}.head_hidden", hidden, "must be >= 1")
        decoder = common["decoder"] if common["decoder"] is not None else (cls.default_decoder or name)
        if not isinstance(decoder, str) or not decoder.isidentifier():
            _fail(f"{key}.decoder", decoder, "must be a name (letters, digits, underscores)")
        weight = common["weight"]
        if weight is not None:
            weight = _coerce(f"{key}.weight", weight, float)
            if weight < 0:
                _fail(f"{key}.weight", weight, "must be >= 0")
        classes[name] = (cls, options)
        resolved[name] = {"type": kind, "enabled": enabled, "weight": weight, "decoder": decoder, "head": head,
                          "head_hidden": hidden, "activation": activation, **registry.options_dict(options)}
    enabled_set = {n: e for n, e in resolved.items() if e["enabled"]}
    if not enabled_set:
        _fail("target", sorted(resolved), "no target is enabled (at least one must train)")
    for name, entry in resolved.items():
        if entry["weight"] is None:
            cls, options = classes[name]
            entry["weight"] = float(cls.resolve_weight(options, enabled_set))
    return TargetSet(resolved)


@dataclass
class MaskConfig:
    type: str = "motion"  # a registered mask policy: "motion" (TrackMAE) | "tube" (VideoMAE) | learned ones
    ratio: float = 0.9  # VideoMAE's 0.9; the public TrackMAE script uses 0.8
    rho: float = 0.5  # share of visible tubes drawn from the high-motion bin (paper default; type=motion)
    options: dict[str, Any] = field(default_factory=dict)  # the policy's own options (`trackmae_stream.masking`)


@dataclass
class ModelConfig:
    arch: str = "vit_tiny"  # vit_tiny | vit_small | vit_base | vit_large: fills the None fields below
    patch_size: int = 16
    tubelet_size: int = 2
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    drop_path: float = 0.0
    attention: str = "auto"  # "auto" (xformers on CUDA when installed, else SDPA) | "xformers" | "sdpa"
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class OptimConfig:
    epochs: int = 800
    max_steps: int | None = None  # stop early (counts optimizer steps); None = epochs * steps_per_epoch
    base_lr: float = 1.5e-4  # per 256 clips per optimizer step (scaled by the global batch)
    lr: float | None = None  # absolute peak lr; when set it replaces the scaled base_lr
    min_lr: float = 1e-5
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = None
    accum_steps: int = 1


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    target: TargetSet = field(default_factory=lambda: resolve_targets(None))
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 32  # clips per rank per micro-step (before num_sample)
    seed: int = 0
    device: str = "auto"  # "auto" | "cuda" | "cpu"
    precision: str = "bf16"  # "bf16" | "fp16" (GradScaler) | "fp32"; autocast applies on CUDA only
    tf32: bool = True  # CUDA: TF32 tensor cores for the fp32 matmuls outside autocast (tracker, teacher)
    output_dir: str = "runs"
    run_name: str | None = None  # default: <preset>-<timestamp>
    resume: str | None = None  # "auto" (newest valid checkpoint in the run folder) | a checkpoint path
    log_every: int = 20
    ckpt_every: int = 1000  # optimizer steps; a final checkpoint is always written
    keep_checkpoints: int = 3
    visualize_every: int = 0  # steps between pictures (frames, mask, reconstruction, motion) in TensorBoard and
    #                           <run>/pictures/; 0 = only at the end of the run
    peak_tflops: float | None = None  # for MFU; None = looked up from the device name
    # after training on the synthetic set (ignored with a list: it has no fixed labelled split here; use python -m
    # trackmae_stream.probe CKPT --train-list ... --val-list ...): linear probe and k-NN of the final encoder against
    # the random-init one drawn from `seed`, on the set's fixed validation split, printed after the `done:` line
    probe_at_end: bool = False
    progress: bool = True
    tensorboard: bool = True
    preset: str = "default"  # informational: the preset this config came from


ARCHS: dict[str, dict[str, int]] = {
    # VideoMAE's encoder/decoder shapes for small/base/large; tiny is this project's CPU default.
    "vit_tiny": dict(embed_dim=192, depth=4, num_heads=3, decoder_dim=128, decoder_depth=2, decoder_heads=4),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, decoder_dim=192, decoder_depth=4, decoder_heads=3),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, decoder_dim=384, decoder_depth=4, decoder_heads=6),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_dim=512, decoder_depth=4, decoder_heads=8),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("synthetic", "list"),
    "data.synthetic_task": ("motion", "legacy"),
    "data.loader": ("cpu", "dali"),
    "data.decoder": ("opencv", "pyav"),
    "tracker.backend": ("auto", "cotracker3", "lucas-kanade", "synthetic_gt"),
    "tracker.variant": ("offline", "online"),
    "tracker.grid_rule": ("cotracker", "naive", "patch_centred"),
    "tracker.resolution": ("official", "native"),
    "tracker.precision": ("fp32", "bf16"),
    "tracker.placement": ("inline", "store", "ranks"),
    "model.arch": tuple(ARCHS),
    "model.attention": ("auto", "xformers", "sdpa"),
    "device": ("auto", "cuda", "cpu"),
    "precision": ("bf16", "fp16", "fp32"),
}


# ----------------------------------------------------------------------------------------------------------------------
# Resolution of derived values


def resolve_model(cfg: ModelConfig) -> ModelConfig:
    """Fill the None shape fields from the named architecture."""
    if cfg.arch not in ARCHS:
        raise ConfigError(f"model.arch={cfg.arch!r} is unknown; expected one of {tuple(ARCHS)}")
    values = {k: (getattr(cfg, k) if getattr(cfg, k) is not None else v) for k, v in ARCHS[cfg.arch].items()}
    return dataclasses.replace(cfg, **values)


def target_weights(cfg: TrainConfig) -> dict[str, float]:
    """Loss weight of every enabled target."""
    return {name: entry["weight"] for name, entry in cfg.target.enabled().items()}


def needs_tracks(cfg: TrainConfig) -> bool:
    """Whether a run tracks its clips: an enabled target needs tracks, or the mask policy needs a side output that
    only a tracking target makes (the motion statistic)."""
    from . import masking, targets

    for entry in cfg.target.enabled().values():
        cls = targets.TARGETS[entry["type"]]
        if cls.needs_tracker or cls.needs_tracks is True:
            return True
    policy = masking.MASK_POLICIES[cfg.mask.type]
    return any(targets.TARGETS[targets.SIDE_OUTPUT_PROVIDERS[s]].needs_tracks for s in policy.needs
               if s in targets.SIDE_OUTPUT_PROVIDERS)


def is_learned_policy(name: str) -> bool:
    from . import masking

    return name in masking.MASK_POLICIES and masking.MASK_POLICIES[name].learned


def resolve_mask(cfg: MaskConfig) -> MaskConfig:
    """Fill the policy's options (`mask.options.<key>`) from its declared defaults; ConfigError names the key."""
    from . import masking

    if cfg.type not in masking.MASK_POLICIES:
        _fail("mask.type", cfg.type, f"expected one of {tuple(masking.MASK_POLICIES)}")
    policy = masking.MASK_POLICIES[cfg.type]
    if not isinstance(cfg.options, dict):
        _fail("mask.options", cfg.options, "a mapping of the policy's options")
    options = _apply(policy.Options(), cfg.options, "mask.options.")
    policy.check_options(options, "mask.options", _fail)
    return dataclasses.replace(cfg, options=dataclasses.asdict(options))


def tokens_per_side(cfg: TrainConfig) -> int:
    return cfg.data.input_size // cfg.model.patch_size


def tracker_grid_size(cfg: TrainConfig) -> int:
    return cfg.tracker.grid_size or tokens_per_side(cfg)


# ----------------------------------------------------------------------------------------------------------------------
# Validation


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{key}={value!r}: {why}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check the values that would otherwise fail deep inside a run; raise ConfigError naming the key."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            _fail(key, value, f"expected one of {choices}")
    d, m, o = cfg.data, cfg.model, cfg.optim
    if not isinstance(cfg.target, TargetSet):
        _fail("target", cfg.target, "not a resolved target section (build configs with load_config)")
    resolve_mask(cfg.mask)
    if not 0.0 < cfg.mask.ratio < 1.0:
        _fail("mask.ratio", cfg.mask.ratio, "must lie strictly between 0 and 1")
    if not 0.0 <= cfg.mask.rho <= 1.0:
        _fail("mask.rho", cfg.mask.rho, "must lie in [0, 1]")
    for key in ("data.num_frames", "data.sampling_rate", "data.input_size", "data.num_sample", "model.patch_size",
                "model.tubelet_size", "batch_size", "optim.accum_steps", "log_every", "ckpt_every", "optim.epochs"):
        value = _get(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            _fail(key, value, "must be a positive integer")
    if d.num_workers < 0:
        _fail("data.num_workers", d.num_workers, "must be >= 0")
    if d.prefetch_batches < 1:
        _fail("data.prefetch_batches", d.prefetch_batches, "must be >= 1")
    if d.input_size % m.patch_size:
        _fail("data.input_size", d.input_size, f"must be divisible by model.patch_size={m.patch_size}")
    if d.num_frames % m.tubelet_size:
        _fail("data.num_frames", d.num_frames, f"must be divisible by model.tubelet_size={m.tubelet_size}")
    if d.num_frames // m.tubelet_size < 2 and needs_tracks(cfg):
        _fail("data.num_frames", d.num_frames, "motion targets need at least 2 tubelets (2 tracked frames)")
    if not 0.0 <= d.max_skip_fraction <= 1.0:
        _fail("data.max_skip_fraction", d.max_skip_fraction, "must lie in [0, 1]")
    if not d.scales or any(not 0.0 < s <= 1.0 for s in d.scales):
        _fail("data.scales", d.scales, "must be a non-empty list of crop scales in (0, 1]")
    if len(d.mean) != 3:
        _fail("data.mean", d.mean, "needs 3 values (R, G, B)")
    if len(d.std) != 3 or any(s <= 0 for s in d.std):
        _fail("data.std", d.std, "needs 3 positive values (R, G, B)")
    if d.source == "list":
        if not d.list_file:
            _fail("data.list_file", d.list_file, "is required when data.source='list'")
        list_path = Path(d.list_file).expanduser()
        if list_path.is_dir():
            _fail("data.list_file", d.list_file, "is a directory, not a list file (give the list inside it)")
        if not list_path.is_file():
            _fail("data.list_file", d.list_file, "file not found")
        if d.root is not None and not Path(d.root).expanduser().is_dir():
            why = "is a file, not a folder" if Path(d.root).expanduser().exists() else "folder not found"
            _fail("data.root", d.root, why)
    else:  # refused rather than ignored: a run that silently trains on the synthetic set looks like a working one
        for key, value in (("data.list_file", d.list_file), ("data.root", d.root)):
            if value is not None:
                _fail(key, value, f"is only read with data.source='list' (data.source={d.source!r}); add "
                                  "data.source=list to train on the list")
    t = cfg.tracker
    if needs_tracks(cfg):
        if t.backend == "cotracker3" and not t.checkpoint:
            _fail("tracker.checkpoint", t.checkpoint,
                  "tracker.backend='cotracker3' needs a checkpoint path (or 'official')")
        if t.checkpoint and t.checkpoint != "official" and not Path(t.checkpoint).expanduser().is_file():
            _fail("tracker.checkpoint", t.checkpoint, "file not found")
        side = tokens_per_side(cfg)
        grid = tracker_grid_size(cfg)
        if grid < 2:
            _fail("tracker.grid_size", t.grid_size, "must be >= 2 (or 0: one point per token)")
        if t.iters < 1:
            _fail("tracker.iters", t.iters, "must be >= 1")
        if grid % side:  # the binning statistic pools whole groups of grid points per token
            _fail("tracker.grid_size", t.grid_size, f"must be a multiple of the token grid {side} (or 0)")
    if o.base_lr <= 0 or o.min_lr < 0:
        _fail("optim.base_lr", o.base_lr, "learning rates must be positive (min_lr >= 0)")
    if o.lr is not None and o.lr <= 0:
        _fail("optim.lr", o.lr, "must be positive or null")
    if o.max_steps is not None and o.max_steps < 1:
        _fail("optim.max_steps", o.max_steps, "must be >= 1 or null")
    if o.warmup_epochs < 0 or (o.warmup_steps is not None and o.warmup_steps < 0):
        _fail("optim.warmup_epochs", o.warmup_epochs, "warm-up must be >= 0")
    if o.weight_decay < 0:
        _fail("optim.weight_decay", o.weight_decay, "must be >= 0")
    if len(o.betas) != 2 or any(not 0.0 <= b < 1.0 for b in o.betas):
        _fail("optim.betas", o.betas, "need two values in [0, 1)")
    if o.clip_grad is not None and o.clip_grad <= 0:
        _fail("optim.clip_grad", o.clip_grad, "must be positive or null")
    if not 0.0 <= m.drop_path < 1.0:
        _fail("model.drop_path", m.drop_path, "must lie in [0, 1)")
    rm = resolve_model(m)
    for prefix, dim, heads in (("model.embed_dim", rm.embed_dim, rm.num_heads),
                               ("model.decoder_dim", rm.decoder_dim, rm.decoder_heads)):
        if dim % heads:
            _fail(prefix, dim, f"must be divisible by its head count {heads}")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).expanduser().is_file():
        _fail("resume", cfg.resume, "checkpoint file not found (use 'auto' to pick the newest in the run folder)")
    if t.windows_per_video < 1:
        _fail("tracker.windows_per_video", t.windows_per_video, "must be >= 1")
    if t.store_grid < 2:
        _fail("tracker.store_grid", t.store_grid, "must be >= 2")
    if t.store_size < 16:
        _fail("tracker.store_size", t.store_size, "must be >= 16 pixels")
    if t.placement == "store" and cfg.data.loader != "cpu":
        _fail("tracker.placement", t.placement, "the track store reads through the CPU loader: set data.loader=cpu")
    if t.placement == "ranks" and is_learned_policy(cfg.mask.type):
        _fail("mask.type", cfg.mask.type, "a learned mask policy draws its masks in the training step; it cannot "
                                          "run with tracker.placement='ranks' (use inline or store)")
    if t.placement == "ranks" and t.tracking_ranks < 1:
        _fail("tracker.tracking_ranks", t.tracking_ranks, "must be >= 1 with tracker.placement='ranks'")
    if cfg.visualize_every < 0:
        _fail("visualize_every", cfg.visualize_every, "must be >= 0 (0: pictures only at the end of the run)")
    if cfg.keep_checkpoints < 1:
        _fail("keep_checkpoints", cfg.keep_checkpoints, "must be >= 1")
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Dict <-> dataclass, presets and overrides


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML value to the dataclass field's declared type, or raise ConfigError naming the key."""
    origin = get_origin(hint)
    args = get_args(hint)
    if value is None:
        if hint is type(None) or type(None) in args:
            return None
        raise ConfigError(f"{key}: null is not allowed here (expected {hint})")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        inner = args[0] if args else Any
        return tuple(_coerce(key, v, inner) for v in value)
    if args and type(None) in args:  # Optional[X] / X | None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r}: expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        if math.isnan(float(value)):
            raise ConfigError(f"{key}: NaN is not a valid value")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    return value


def _apply(obj: Any, values: dict[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    changes = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; known keys here: {sorted(names)}")
        current = getattr(obj, key)
        if isinstance(current, TargetSet):  # the target section: name -> options (and the former flat keys)
            changes[key] = resolve_targets(value)
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} is a section; give its keys (e.g. {full}.<key>=...)")
            changes[key] = _apply(current, value, f"{full}.")
        else:
            changes[key] = _coerce(full, value, hints[key])
    return dataclasses.replace(obj, **changes)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    def convert(v: Any) -> Any:
        if isinstance(v, tuple):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(dataclasses.asdict(cfg))


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and v.get(_ALIAS) and k in out and out[k] in (False, None):
            v = {**v, "enabled": False}  # a former-layout option of a target switched off below: it stays off
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of sections and keys")
    return data


def preset_path(name: str) -> Path:
    """A preset name (`vit_b_k400`) or a path to a YAML file."""
    candidate = Path(name).expanduser()
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"config preset {name!r} not found (neither a YAML file nor one of {known})")
    return path


def _load_preset_dict(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = preset_path(name)
    if str(path) in seen:
        raise ConfigError(f"{path}: circular 'base:' chain {' -> '.join(seen)}")
    data = _read_yaml(path)
    if "target" in data:
        data["target"] = normalise_target_section(data["target"])
    base = data.pop("base", None)
    if base is not None:
        data = _merge(_load_preset_dict(base, seen + (str(path),)), data)
    return data


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["optim.lr=1e-4", "data.flip=true"]` -> nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    if "target" in nested:
        nested["target"] = normalise_target_section(nested["target"])
    return nested


def load_config(preset: str = "default", overrides: list[str] | None = None, *, check: bool = True) -> TrainConfig:
    """Build a config from a preset (name or YAML path) plus `section.key=value` overrides, then validate it."""
    data = _merge(_load_preset_dict(preset), parse_overrides(overrides or []))
    data.setdefault("preset", Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset)
    cfg = _apply(TrainConfig(), data)
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model), mask=resolve_mask(cfg.mask))
    cfg = dataclasses.replace(cfg, tracker=resolve_tracker(cfg))
    return validate(cfg) if check else cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def resolve_tracker(cfg: TrainConfig) -> TrackerConfig:
    """tracker.backend=auto made concrete: cotracker3 when a checkpoint is set; on the synthetic set tracked inline,
    its exact tracks (synthetic_gt: the only tracker whose motion target is right there, bench/results/
    lk_accuracy_cpu.json); otherwise the weight-free lucas-kanade."""
    t = cfg.tracker
    if t.backend != "auto":
        return t
    if t.checkpoint:
        backend = "cotracker3"
    elif cfg.data.source == "synthetic" and t.placement == "inline":
        backend = "synthetic_gt"
    else:
        backend = "lucas-kanade"
    return dataclasses.replace(t, backend=backend)


def config_from_dict(data: dict[str, Any], *, check: bool = True) -> TrainConfig:
    cfg = _apply(TrainConfig(), data)
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model), mask=resolve_mask(cfg.mask))
    cfg = dataclasses.replace(cfg, tracker=resolve_tracker(cfg))
    return validate(cfg) if check else cfg
