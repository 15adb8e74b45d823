"""Learning-rate schedule and parameter groups; atomic checkpoints, damaged-file fallback, RNG state round trip."""
from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from trackmae_stream.checkpoint import (
    CheckpointError,
    CheckpointManager,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from trackmae_stream.config import OptimConfig
from trackmae_stream.model import TrackMAE, TrackMAEShape
from trackmae_stream.optim import CosineSchedule, parameter_groups, peak_lr


def test_schedule_matches_videomae_cosine_formula():
    sched = CosineSchedule(peak_lr=3e-3, min_lr=1e-5, warmup_steps=7, total_steps=53)
    for step in range(53):
        if step < 7:
            ref = 3e-3 * (step + 1) / 7
        else:  # VideoMAE: final + 0.5 (base - final)(1 + cos(pi i / len(iters)))
            i = step - 7
            ref = 1e-5 + 0.5 * (3e-3 - 1e-5) * (1 + math.cos(math.pi * i / (53 - 7)))
        assert sched(step) == pytest.approx(ref, rel=1e-12)
    assert sched(53) == pytest.approx(1e-5)


def test_lr_scaling_rule_and_absolute_override():
    assert peak_lr(OptimConfig(base_lr=1.5e-4), 512) == pytest.approx(3e-4)
    assert peak_lr(OptimConfig(base_lr=1.5e-4, lr=7e-4), 512) == pytest.approx(7e-4)


def test_weight_decay_skips_biases_norms_and_mask_token():
    model = TrackMAE(TrackMAEShape(4, 16, 4, 2, 12, 1, 2, 8, 1, 2))
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "mask_token" in no_decay_names
    assert all(n.endswith("bias") or ".norm" in n or n == "mask_token" for n in no_decay_names)
    assert all(model.get_parameter(n).ndim >= 2 for n in decay_names)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_rng_state_round_trip_and_weights_only_load(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(5), torch.rand(4))
    atomic_save({"rng": state}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(loaded)
    got = (random.random(), np.random.rand(5), torch.rand(4))
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    torch.testing.assert_close(got[2], expected[2], atol=0, rtol=0)


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "step": step, "epoch": 0,
            "batch_in_epoch": step, "config": {}, "rng": capture_rng_state()}


def test_manager_keeps_newest_and_skips_damaged(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (5, 10, 15):
        manager.save(step, _state(step))
    assert [p.name for p in manager.list()] == ["checkpoint-00000015.pt", "checkpoint-00000010.pt"]
    newest = manager.list()[0]
    newest.write_bytes(newest.read_bytes()[: 100])  # damage the newest (e.g. a disk error)
    path, state = manager.newest_valid()
    assert path.name == "checkpoint-00000010.pt" and state["step"] == 10
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(newest)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    atomic_save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="missing sections"):
        load_checkpoint(tmp_path / "partial.pt")


def test_kill_during_save_leaves_previous_checkpoint_intact(tmp_path):
    """A process killed while writing a large checkpoint must leave the old file complete and no stray final file."""
    target = tmp_path / "checkpoints" / "checkpoint-00000001.pt"
    atomic_save(_state(1), target)
    before = target.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, torch
        import trackmae_stream.checkpoint as ck
        real_save = torch.save
        def slow_save(obj, fh):
            fh.write(b"x" * 4096); fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # die in the middle of writing
        torch.save = slow_save
        ck.atomic_save({{"model": {{}}}}, {str(target)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == before
    assert load_checkpoint(target)["step"] == 1
    leftovers = [p.name for p in target.parent.iterdir() if p.name != target.name]
    assert all(name.endswith(".tmp") for name in leftovers)  # only an orphaned temp file, never a half checkpoint
    manager = CheckpointManager(tmp_path)
    assert [p.name for p in manager.list()] == [target.name]
    assert os.path.getsize(target) == len(before)
