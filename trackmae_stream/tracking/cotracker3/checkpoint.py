"""Loading CoTracker3 weights: a local file (raw state_dict or `{"model": state_dict}`) or an official URL.

URLs go through torch.hub's download cache (`torch.hub.get_dir()/checkpoints/`), so a file is downloaded once.
Loading is strict: missing keys, unexpected keys and shape mismatches raise `CheckpointError` listing all of them.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

from ...checkpoint import state_dict_problems
from ...errors import UserError
from .model import CoTrackerThreeBase, CoTrackerThreeOffline, CoTrackerThreeOnline

log = logging.getLogger(__name__)

_HF = "https://huggingface.co/facebook/cotracker3/resolve/main/"
#: The released checkpoints (facebookresearch/co-tracker hubconf.py / README).
OFFICIAL_CHECKPOINT_URLS = {
    "scaled_offline": _HF + "scaled_offline.pth",
    "scaled_online": _HF + "scaled_online.pth",
    "baseline_offline": _HF + "baseline_offline.pth",
    "baseline_online": _HF + "baseline_online.pth",
}
VARIANTS = ("offline", "online")
_MODEL_CLASSES = {"offline": CoTrackerThreeOffline, "online": CoTrackerThreeOnline}


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: unreadable, wrong hash, or keys/shapes that do not match the model."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_checkpoint_source(source: str | os.PathLike, variant: str = "offline") -> str:
    """"official" -> the scaled checkpoint URL of `variant`; a key of OFFICIAL_CHECKPOINT_URLS -> its URL; else as is.
    """
    text = os.fspath(source)
    if text == "official":
        return OFFICIAL_CHECKPOINT_URLS[f"scaled_{variant}"]
    return OFFICIAL_CHECKPOINT_URLS.get(text, text)


def _download_to_hub_cache(url: str) -> Path:
    filename = Path(urlparse(url).path).name
    if not filename:
        raise CheckpointError(f"cannot derive a file name from the URL {url!r}")
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s to %s", url, target)
        try:
            torch.hub.download_url_to_file(url, str(target), progress=False)
        except Exception as exc:  # network errors come in many types (URLError, HTTPError, socket errors)
            raise CheckpointError(f"could not download {url} into the torch.hub cache {target.parent}: {exc}. "
                                  "Without network access, download it elsewhere and pass the local path.") from exc
    return target


def read_state_dict(source: str | os.PathLike, *, sha256: str | None = None, variant: str = "offline",
                    ) -> tuple[dict[str, Tensor], str]:
    """Read a state_dict from a local path or URL (see `resolve_checkpoint_source`); returns (state_dict, file path).

    `sha256`, if given, must equal the file's hex SHA-256 (case-insensitive). A `{"model": state_dict}` wrapper is
    unwrapped, as the official `build_cotracker` does.
    """
    resolved = resolve_checkpoint_source(source, variant)
    if urlparse(resolved).scheme in ("http", "https"):
        path = _download_to_hub_cache(resolved)
    else:
        path = Path(resolved).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"CoTracker3 checkpoint {path} does not exist (or is not a file)")
    if sha256 is not None:
        actual = file_sha256(path)
        if actual.lower() != sha256.strip().lower():
            raise CheckpointError(f"checkpoint {path}: SHA-256 mismatch: expected {sha256.strip().lower()}, "
                                  f"file has {actual}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} could not be read by torch.load: {exc}") from exc
    if isinstance(payload, Mapping) and "model" in payload and isinstance(payload["model"], Mapping):
        payload = payload["model"]
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"checkpoint {path}: expected a state_dict (a mapping of names to tensors), "
                              f"got {type(payload).__name__}")
    not_tensors = sorted(str(k) for k, v in payload.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise CheckpointError(f"checkpoint {path}: entries that are not tensors: {not_tensors}")
    return dict(payload), str(path)


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, Tensor], source: str = "state_dict") -> None:
    """Raise CheckpointError listing every missing key, unexpected key and shape mismatch (names `source`)."""
    problems = state_dict_problems(model.state_dict(), state_dict)
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match {type(model).__name__}: " + "; ".join(problems))


def load_checkpoint(model: CoTrackerThreeBase, source: str | os.PathLike, *, sha256: str | None = None,
                    variant: str | None = None) -> CoTrackerThreeBase:
    """Load weights strictly into `model` from a file/URL (see `read_state_dict`); returns the model."""
    if variant is None:
        variant = "online" if isinstance(model, CoTrackerThreeOnline) else "offline"
    state_dict, path = read_state_dict(source, sha256=sha256, variant=variant)
    check_state_dict(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)
    return model


def build_cotracker3(variant: str = "offline", checkpoint: str | os.PathLike | None = None, *,
                     sha256: str | None = None) -> CoTrackerThreeBase:
    """The released configuration of `variant` ("offline" or "online"), in eval mode.

    checkpoint: a local path, a URL, "official" (the scaled checkpoint of the variant) or a key of
    OFFICIAL_CHECKPOINT_URLS; None keeps the random initialisation (and logs a warning).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown CoTracker3 variant {variant!r}; expected one of {VARIANTS}")
    model = _MODEL_CLASSES[variant]()
    if checkpoint is None:
        log.warning("CoTracker3 (%s) has randomly initialised weights: its tracks are meaningless", variant)
    else:
        load_checkpoint(model, checkpoint, sha256=sha256, variant=variant)
    return model.eval()
