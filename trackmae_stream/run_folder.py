"""Which folder a run writes to, and whether a checkpoint there belongs to it.

A run folder belongs to one run. Its identity is the part of the config that changes what the weights mean (data,
input geometry, model shape, targets, masking, tracker settings that change the targets), hashed; everything else
(learning rate, steps, batch size, logging, speed options) may change across a resume and is logged when it does.

- A fresh start never writes into a folder that holds checkpoints: with `run_name` it refuses, naming `--resume`;
  without, it makes a new `<preset>-<time>` folder.
- `--resume auto` with `run_name` continues that folder only when its identity matches, else refuses naming the keys
  that differ; without `run_name` it takes the newest `<preset>-*` run whose identity matches and says why it skipped
  the others. Damaged checkpoints are renamed `*.damaged` (never deleted, never listed again).
- Temporary files left by a killed checkpoint write are removed at start.

Rank 0 decides; the trainer broadcasts the decision (or the error) so that every rank agrees.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointManager
from .config import TrainConfig, config_from_dict, resolve_model, to_dict
from .errors import UserError

log = logging.getLogger(__name__)

# Dotted config keys (or whole sections) that change what the weights mean. The rest of the config is free to change
# across a resume (lr, steps, batch, logging, loader, precision and speed options).
IDENTITY_SECTIONS = ("target", "mask")
IDENTITY_KEYS = (
    "data.source", "data.list_file", "data.root", "data.synthetic_videos", "data.synthetic_size",
    "data.synthetic_frames", "data.num_frames", "data.sampling_rate", "data.input_size", "data.scales", "data.flip",
    "data.mean", "data.std",
    "tracker.backend", "tracker.checkpoint", "tracker.variant", "tracker.grid_size", "tracker.grid_rule",
    "tracker.iters", "tracker.resolution",
    "model.arch", "model.patch_size", "model.tubelet_size", "model.embed_dim", "model.depth", "model.num_heads",
    "model.mlp_ratio", "model.decoder_dim", "model.decoder_depth", "model.decoder_heads",
)
STALE_TEMP_GLOB = ".checkpoint-*.pt.*.tmp"


class RunFolderError(UserError):
    """The run folder cannot be used as asked (another run's checkpoints, a different identity, not writable)."""


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The identity-bearing config values, with paths made absolute and the model shape resolved."""
    flat = _flatten(to_dict(cfg))
    flat.update({f"model.{k}": v for k, v in dataclasses.asdict(resolve_model(cfg.model)).items()})
    for key in ("data.list_file", "data.root", "tracker.checkpoint"):
        if flat.get(key) not in (None, "official"):
            flat[key] = str(Path(flat[key]).expanduser().resolve())
    keep = {k: v for k, v in flat.items() if k in IDENTITY_KEYS or k.split(".")[0] in IDENTITY_SECTIONS}
    return dict(sorted(keep.items()))


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every identity key that differs."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every config key that differs (both as nested dicts from to_dict)."""
    a, b = _flatten(old), _flatten(new)
    ignore = {"resume"}
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]


def saved_identity(run_dir: Path) -> dict[str, Any] | None:
    """The identity of the run whose config.yaml is in `run_dir` (None when it has none or it cannot be read)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        return run_identity(config_from_dict(yaml.safe_load(path.read_text()), check=False))
    except Exception as exc:  # an unreadable or foreign config: not this run's
        log.warning("%s: cannot read the saved config (%s)", path, exc)
        return None


@dataclass
class RunChoice:
    """Rank 0's decision: the folder, the checkpoint to resume (None: fresh), whether the folder is new."""

    run_dir: Path
    checkpoint: Path | None = None
    created: bool = False
    notes: list[str] = field(default_factory=list)


def choose_run(cfg: TrainConfig) -> RunChoice:
    """Decide the run folder and the checkpoint to resume from; raise RunFolderError when the request is unsafe."""
    out = Path(cfg.output_dir).expanduser()
    _check_writable_dir(out, "output_dir")
    identity = run_identity(cfg)
    if cfg.run_name:
        run_dir = out / cfg.run_name
        if run_dir.exists() and not run_dir.is_dir():
            raise RunFolderError(f"run_name={cfg.run_name!r}: {run_dir} exists and is not a folder")
        if cfg.resume is None:
            newest = _checkpoint_files(run_dir)
            if newest:
                raise RunFolderError(
                    f"{run_dir} already holds checkpoints of a run (newest {newest[0].name}); continue it with "
                    f"--resume auto (or resume=PATH), or start a new run with another run_name or output_dir")
            return _make(run_dir, RunChoice(run_dir))
        if cfg.resume == "auto":
            saved = saved_identity(run_dir)
            if saved is not None and saved != identity:
                diff = "; ".join(identity_diff(saved, identity))
                raise RunFolderError(f"--resume auto: {run_dir} is a run with other settings ({diff}); resume it "
                                     f"with its own settings, or start a new run with another run_name")
            return _make(run_dir, RunChoice(run_dir, checkpoint=_newest_valid(run_dir)))
        return _make(run_dir, RunChoice(run_dir, checkpoint=Path(cfg.resume)))
    notes: list[str] = []
    if cfg.resume == "auto":
        for candidate in _runs_of_preset(out, cfg.preset):
            saved = saved_identity(candidate)
            if saved is None:
                notes.append(f"skipped {candidate}: no readable config.yaml")
                continue
            if saved != identity:
                notes.append(f"skipped {candidate}: other settings ({'; '.join(identity_diff(saved, identity))})")
                continue
            found = _newest_valid(candidate)
            if found is None:
                notes.append(f"skipped {candidate}: no readable checkpoint")
                continue
            return RunChoice(candidate, checkpoint=found, notes=notes)
        notes.append(f"no run of preset {cfg.preset!r} with these settings in {out}: starting a new one")
    run_dir = _fresh_dir(out, cfg.preset)
    choice = RunChoice(run_dir, checkpoint=Path(cfg.resume) if cfg.resume not in (None, "auto") else None,
                       notes=notes)
    return _make(run_dir, choice)


def remove_stale_temporaries(run_dir: Path) -> int:
    """Remove what killed checkpoint writes left behind (`.checkpoint-*.pt.*.tmp`); returns how many."""
    folder = run_dir / "checkpoints"
    removed = 0
    if folder.is_dir():
        for tmp in folder.glob(STALE_TEMP_GLOB):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def discard_failed_start(choice: RunChoice) -> None:
    """A start that failed before its first checkpoint leaves no folder behind (only a folder it created)."""
    if choice.created and choice.run_dir.is_dir() and not _checkpoint_files(choice.run_dir):
        shutil.rmtree(choice.run_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def _check_writable_dir(path: Path, key: str) -> None:
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{key}={str(path)!r}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"{key}={str(path)!r}: cannot create the folder ({exc.strerror or exc})") from exc
    probe = path / f".write-test-{datetime.now().strftime('%H%M%S%f')}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise RunFolderError(f"{key}={str(path)!r}: the folder is not writable ({exc.strerror or exc})") from exc


def _make(run_dir: Path, choice: RunChoice) -> RunChoice:
    if not run_dir.is_dir():
        try:
            run_dir.mkdir(parents=True)
        except OSError as exc:
            raise RunFolderError(f"{run_dir}: cannot create the run folder ({exc.strerror or exc})") from exc
        choice.created = True
    return choice


def _fresh_dir(out: Path, preset: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, n = out / f"{preset}-{stamp}", 1
    while run_dir.exists():  # two starts in the same second
        n += 1
        run_dir = out / f"{preset}-{stamp}-{n}"
    return run_dir


def _checkpoint_files(run_dir: Path) -> list[Path]:
    return CheckpointManager(run_dir).list()


def _runs_of_preset(out: Path, preset: str) -> list[Path]:
    """Run folders of `preset` with a checkpoints folder, newest first."""
    candidates = [p for p in out.glob(f"{preset}-*") if (p / "checkpoints").is_dir()]
    return sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True)


def _newest_valid(run_dir: Path) -> Path | None:
    """The newest checkpoint of `run_dir` that loads; damaged ones are renamed `*.damaged` so no later listing (or
    rotation) takes them for this run's progress."""
    manager = CheckpointManager(run_dir)
    found = manager.newest_valid(map_location="cpu", on_damaged=_quarantine)
    return found[0] if found is not None else None


def _quarantine(path: Path) -> None:
    target = path.with_name(path.name + ".damaged")
    path.replace(target)
    log.warning("renamed the damaged checkpoint %s to %s", path, target.name)


__all__ = ["RunChoice", "RunFolderError", "choose_run", "run_identity", "identity_hash", "identity_diff",
           "config_changes", "saved_identity", "remove_stale_temporaries", "discard_failed_start"]
