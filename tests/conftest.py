"""Shared test fixtures.

The reference vectors are read in place from ../shared/reference (never copied into the repository). Set
TRACKMAE_REFERENCE_DIR to point elsewhere; tests that need them skip with the path they looked for.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

try:  # no tqdm monitor thread in the test process: DataLoader workers fork from it, and forks taken while it lived
    # hung a worker at start-up (py-spy: stuck in torch.manual_seed -> torch.xpu._lazy_call -> traceback.format_stack)
    import tqdm

    tqdm.tqdm.monitor_interval = 0
except ImportError:  # pragma: no cover - tqdm comes with the test extras
    pass

# Triton reads TRITON_INTERPRET when a @triton.jit function is decorated, i.e. at import of the kernel modules, so
# it must be set before any test module imports them. Without a GPU, the Triton kernels run in the interpreter.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("TRACKMAE_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))


def reference_path(relative: str) -> Path:
    """Path of a file under the shared reference folder; skips the calling test when it is absent."""
    path = REFERENCE_DIR / relative
    if not path.exists():
        pytest.skip(f"reference file {path} is absent "
                    "(set TRACKMAE_REFERENCE_DIR or check out ../shared beside the repo)")
    return path


def reference_sets(stem: str) -> list[str]:
    """Letters of the vector sets present for `stem` (e.g. "targets/bins" -> bins_a.npz, bins_b.npz, ...).

    The development set A ships with the reference; a hold-out set (B, ...) dropped beside it with the same key
    layout is picked up by the same tests. With nothing present, ["a"] so that the tests skip via reference_path.
    """
    folder, name = (REFERENCE_DIR / stem).parent, Path(stem).name
    found = sorted(p.stem[len(name) + 1:] for p in folder.glob(f"{name}_*.npz")) if folder.is_dir() else []
    return found or ["a"]


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
