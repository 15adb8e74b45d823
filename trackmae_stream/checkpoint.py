"""Atomic checkpoints and resume.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over its final name, so a
kill at any moment leaves either the previous complete file or the new complete file, never a half one. `--resume auto`
takes the newest checkpoint that loads and has every section; a damaged one is reported and skipped.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{8})\.pt$")
REQUIRED_SECTIONS = ("model", "optimizer", "step", "epoch", "batch_in_epoch", "config", "rng")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unreadable or lacks a section; the message names the file."""


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, fsync, rename: a kill leaves the old or the new file.

    The file gets the permissions of a plain `open()` under the user's umask (mkstemp alone would make it 0600).
    A failed write (disk full, quota, permissions) raises CheckpointError naming the file and the OS's reason.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError | RuntimeError):
            raise CheckpointError(f"{path}: cannot write ({_write_failure(exc, path.parent)})") from exc
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _write_failure(exc: BaseException, folder: Path) -> str:
    """The OS's reason for a failed write, dug out of torch's wrapping (its own RuntimeError may hide an ENOSPC)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            reason = seen.strerror or str(seen)
            if seen.errno == errno.ENOSPC:
                free = shutil.disk_usage(folder).free / 2**20
                reason += f": {free:.1f} MiB free in {folder}"
            return reason
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {exc}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, corrupt, or not a torch file
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of sections, found {type(state).__name__}")
    missing = [k for k in REQUIRED_SECTIONS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: missing sections {missing}")
    return state


def state_dict_problems(expected: Mapping[str, Any], given: Mapping[str, Any],
                        allow_missing_prefixes: tuple[str, ...] = ()) -> list[str]:
    """What keeps `given` from loading strictly where `expected` (a model's state_dict) is: missing keys, unexpected
    keys and shape mismatches, each as a message part listing the keys. Empty when it fits."""
    missing = sorted(k for k in expected if k not in given and not k.startswith(allow_missing_prefixes))
    unexpected = sorted(k for k in given if k not in expected)
    mismatched = sorted(f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in given if k in expected and tuple(given[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {missing}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {unexpected}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {mismatched}")
    return problems


# ----------------------------------------------------------------------------------------------------------------------
# RNG state, stored as tensors and plain values so that checkpoints load with weights_only=True


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------------


class CheckpointManager:
    """`<run>/checkpoints/checkpoint-<step>.pt`, keeping the newest `keep`."""

    def __init__(self, run_dir: str | Path, keep: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.dir / f"checkpoint-{step:08d}.pt"

    def list(self) -> list[Path]:
        """Checkpoints, newest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write checkpoint `step`, then keep it and the `keep - 1` newest below it. Rotation never deletes the file
        just written, nor a checkpoint of a higher step (only an earlier branch of a resumed run can hold one; the
        run folder refuses fresh starts, so it is this run's own history and not ours to delete)."""
        path = atomic_save(state, self.path_for(step))
        older = [p for p in self.list() if _step_of(p) < step]
        for old in older[self.keep - 1:]:
            old.unlink(missing_ok=True)
        return path

    def newest_valid(self, map_location: str | torch.device = "cpu",
                     on_damaged: Callable[[Path], None] | None = None) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads with every section; each damaged one is reported (and handed to
        `on_damaged`, e.g. to rename it aside) on the way."""
        for path in self.list():
            try:
                return path, load_checkpoint(path, map_location)
            except CheckpointError as exc:
                log.warning("skipping damaged checkpoint: %s", exc)
                if on_damaged is not None:
                    on_damaged(path)
        return None


def _step_of(path: Path) -> int:
    return int(CHECKPOINT_RE.match(path.name).group(1))
