"""The trainer end to end on a tiny synthetic set: loss falls, checkpoints, bit-exact resume, two ranks under torchrun,
bad videos skipped and counted, a NaN stops the run naming the step, bad input fails before training."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from trackmae_stream import engine as engine_module
from trackmae_stream.checkpoint import load_checkpoint
from trackmae_stream.config import load_config
from trackmae_stream.data import TooManySkippedVideosError, ensure_synthetic_dataset
from trackmae_stream.engine import NonFiniteLossError, build_model, train
from trackmae_stream.export import main as export_main
from trackmae_stream.model.adapters import load_model_state
from trackmae_stream.targets import TargetBuilder
from trackmae_stream.train import main

SYN = dict(num_videos=16, size=64, num_frames=20)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "set", **SYN)


def tiny(synthetic, tmp_path, **extra) -> list[str]:
    """Overrides for a model and clip small enough that a step takes a fraction of a second on 2 cores."""
    overrides = {
        "data.synthetic_dir": str(synthetic.root), "data.synthetic_videos": SYN["num_videos"],
        "data.synthetic_size": SYN["size"], "data.synthetic_frames": SYN["num_frames"], "data.num_frames": 8,
        "data.sampling_rate": 2, "data.input_size": 64, "data.num_workers": 0, "model.embed_dim": 48,
        "model.num_heads": 3, "model.depth": 2, "model.decoder_dim": 32, "model.decoder_heads": 2,
        "model.decoder_depth": 1, "batch_size": 4, "log_every": 2, "ckpt_every": 2, "keep_checkpoints": 10,
        "progress": False, "output_dir": str(tmp_path / "runs"), "optim.lr": 3e-3, "optim.warmup_steps": 1,
        "probe_at_end": False,  # on for the default; test_cli_ends_with_the_probe_against_random_init checks it
    }
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_default_trains_loss_falls_and_leaves_checkpoint(synthetic, tmp_path):
    cfg = load_config("default", tiny(synthetic, tmp_path, **{"optim.max_steps": 24, "log_every": 4,
                                                               "ckpt_every": 100, "run_name": "falls"}))
    summary = train(cfg)
    records = read_log(summary.run_dir)
    start = records[0]
    assert start["event"] == "start" and start["tracker"] == "synthetic_gt" and start["world_size"] == 1
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(r["clips_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in records if "loss" in r)
    assert summary.last_checkpoint is not None and summary.last_checkpoint.name == "checkpoint-00000024.pt"
    state = load_checkpoint(summary.last_checkpoint)
    assert state["step"] == 24 and "rng" in state and "optimizer" in state
    assert state["scheduler"]["total_steps"] == 24 and state["scheduler"]["warmup_steps"] == 1
    assert (summary.run_dir / "config.yaml").is_file()
    assert any((summary.run_dir / "tensorboard").iterdir())
    # the picture of the last step (visualize_every=0): frames, mask, reconstruction, motion target vs prediction
    picture = cv2.imread(str(summary.run_dir / "pictures" / "step_0000024.png"))
    assert picture is not None and picture.shape[0] > 4 * 64 and picture.std() > 10
    # the log says whether the model beat predicting zeros, per target
    assert all(0 < r["rel_pixel"] and 0 < r["rel_track_motion"] for r in records if "loss" in r)

    # export for VideoMAE's fine-tuning code and load it back: same encoder and pixel decoder outputs
    out = tmp_path / "videomae.pth"
    assert export_main([str(summary.last_checkpoint), "--format", "videomae", "--out", str(out)]) == 0
    exported = torch.load(out, weights_only=True)["model"]
    assert "encoder.blocks.0.attn.q_bias" in exported and not any(k.startswith("motion_") for k in exported)
    model = build_model(cfg, TargetBuilder(cfg))
    reference = build_model(cfg, TargetBuilder(cfg))
    reference.load_state_dict(state["model"])
    load_model_state(model, exported, allow_missing_prefixes=("decoders.track_motion.", "heads.track_motion."))
    gen = torch.Generator().manual_seed(0)
    n = model.shape.num_tokens
    vis = torch.randperm(n, generator=gen)[:8].sort().values[None]
    msk = torch.tensor(sorted(set(range(n)) - set(vis[0].tolist())))[None]
    patches = torch.randn(1, 8, model.shape.patch_dim, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model(patches, vis, msk)["pixel"], reference(patches, vis, msk)["pixel"],
                                   atol=1e-5, rtol=1e-5)


def _params(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_resume_mid_epoch_is_bit_exact(synthetic, tmp_path):
    """Checkpoints every 2 steps (3 batches per epoch): resuming from step 2 (mid-epoch) reaches the same step-6
    parameters and optimizer state as the uninterrupted run."""
    args = tiny(synthetic, tmp_path, **{"optim.max_steps": 6, "run_name": "straight"})
    straight = train(load_config("default", args))
    ckpts = straight.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"checkpoint-{s:08d}.pt" for s in (2, 4, 6)]
    resumed_dir = straight.run_dir.parent / "resumed"
    shutil.copytree(straight.run_dir, resumed_dir)
    for step in (4, 6):
        (resumed_dir / "checkpoints" / f"checkpoint-{step:08d}.pt").unlink()
    args = tiny(synthetic, tmp_path, **{"optim.max_steps": 6, "run_name": "resumed", "resume": "auto"})
    resumed = train(load_config("default", args))
    assert resumed.step == 6
    assert any(r.get("event") == "resume" and r["step"] == 2 for r in read_log(resumed_dir))
    a, b = load_checkpoint(ckpts / "checkpoint-00000006.pt"), load_checkpoint(resumed.last_checkpoint)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["loss_history"] == b["loss_history"]


def test_torchrun_two_ranks_on_cpu(synthetic, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    # stops mid-epoch (3 batches per epoch) with a PyAV worker per rank: closing live decoder workers must be clean
    args = tiny(synthetic, tmp_path, **{"optim.max_steps": 2, "run_name": "ddp", "data.num_workers": 1,
                                        "data.decoder": "pyav"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "trackmae_stream.train", *args],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1, proc.stdout  # one line per job, not one per rank
    assert "killed by signal" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ddp"
    records = read_log(run_dir)
    assert records[0]["world_size"] == 2 and records[0]["global_batch"] == 8
    state = load_checkpoint(run_dir / "checkpoints" / "checkpoint-00000002.pt")
    assert len(state["rng"]["per_rank"]) == 2


def test_corrupt_and_missing_videos_are_skipped_and_counted(synthetic, tmp_path):
    bad = tmp_path / "corrupt.webm"
    bad.write_bytes(os.urandom(3000))
    lines = synthetic.list_file.read_text().splitlines() + [f"{bad} 0", f"{tmp_path / 'missing.webm'} 1"]
    lines += synthetic.val_list_file.read_text().splitlines()[: -len(lines) % 4]  # whole batches of 4
    list_file = tmp_path / "with_bad.txt"
    list_file.write_text("\n".join(lines) + "\n")
    steps = len(lines) // 4  # one epoch: every line is visited once
    common = {"data.source": "list", "data.list_file": str(list_file), "data.root": str(synthetic.root),
              "optim.max_steps": steps, "ckpt_every": 100}
    summary = train(load_config("default", tiny(synthetic, tmp_path, **common, run_name="skips",
                                                **{"data.max_skip_fraction": 0.25})))
    assert summary.step == steps and summary.skipped_videos == 2
    assert read_log(summary.run_dir)[-2]["skipped_videos"] == 2
    with pytest.raises(TooManySkippedVideosError, match="max_skip_fraction"):
        train(load_config("default", tiny(synthetic, tmp_path, **common, run_name="bound",
                                          **{"data.max_skip_fraction": 0.05})))


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_nonfinite_loss_or_gradient_stops_naming_the_step(synthetic, tmp_path, monkeypatch, poison):
    """A NaN loss, or a finite loss with a NaN gradient (which would poison the weights in bf16, with no GradScaler
    to skip the step), stops the run naming the step and writes no checkpoint after it."""
    real = engine_module.compute_losses
    calls = {"n": 0}

    def poisoned(pred, batch, lam):
        calls["n"] += 1
        if calls["n"] == 3 and poison == "gradient":  # the third optimizer step
            pred["track_motion"].register_hook(lambda grad: grad * float("nan"))
        losses = real(pred, batch, lam)
        if calls["n"] == 3 and poison == "loss":
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(engine_module, "compute_losses", poisoned)
    args = tiny(synthetic, tmp_path, **{"optim.max_steps": 6, "ckpt_every": 1, "log_every": 10,
                                        "run_name": f"nan_{poison}"})
    with pytest.raises(NonFiniteLossError, match="non-finite loss or gradient at step 3"):
        train(load_config("default", args))
    names = sorted(p.name for p in (tmp_path / "runs" / f"nan_{poison}" / "checkpoints").iterdir())
    assert names == ["checkpoint-00000001.pt", "checkpoint-00000002.pt"]
    stop = read_log(tmp_path / "runs" / f"nan_{poison}")[-1]
    assert stop["event"] == "nonfinite" and stop["step"] == 3 and stop["last_checkpoint"].endswith("02.pt")


def test_cli_reports_bad_input_before_training(synthetic, tmp_path, capsys):
    list_file = tmp_path / "broken.txt"
    list_file.write_text("videos/a.webm 0\nvideos/b.webm zero\n")
    code = main(["data.source=list", f"data.list_file={list_file}", f"output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 1 and f"{list_file}:2" in err
    assert main(["mask.rho=2"]) == 2
    assert "mask.rho=2" in capsys.readouterr().err
    assert main(["--config", "vit_b_k400"]) == 2
    assert "data.list_file" in capsys.readouterr().err
    # more accumulation steps than batches per epoch would never step the optimizer: refused before training
    assert main(tiny(synthetic, tmp_path, **{"optim.accum_steps": 50, "run_name": "accum"})) == 1
    assert "optim.accum_steps=50" in capsys.readouterr().err


def test_trains_with_cotracker3_checkpoint_and_clip_target(synthetic, tmp_path):
    """The trainer drives our CoTracker3 from a checkpoint file (random weights, native resolution) and a CLIP-style
    feature target from a local file (a small timm ViT stands in for CLIP); λ defaults to 0.25 with features."""
    import timm

    from trackmae_stream.tracking.cotracker3 import CoTrackerThreeOffline

    torch.manual_seed(0)
    tracker_ckpt = tmp_path / "scaled_offline.pth"
    torch.save(CoTrackerThreeOffline().state_dict(), tracker_ckpt)
    teacher_ckpt = tmp_path / "teacher.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224.augreg_in21k", num_classes=0).state_dict(), teacher_ckpt)
    args = tiny(synthetic, tmp_path, **{
        "optim.max_steps": 2, "log_every": 2, "run_name": "cotracker_clip", "tracker.checkpoint": str(tracker_ckpt),
        "tracker.resolution": "native", "tracker.iters": 2, "target.spatial": "clip",
        "target.clip_model": "vit_tiny_patch16_224.augreg_in21k", "target.clip_checkpoint": str(teacher_ckpt)})
    summary = train(load_config("default", args))
    records = read_log(summary.run_dir)
    assert records[0]["tracker"] == "cotracker3-offline"
    (logged,) = [r for r in records if "loss" in r]
    assert logged["loss"] == pytest.approx(logged["loss_clip"] + 0.25 * logged["loss_track_motion"], rel=1e-6)
    assert load_checkpoint(summary.last_checkpoint)["model"]["heads.clip.weight"].shape[0] == 192


def test_cli_ends_with_the_probe_against_random_init(synthetic, tmp_path, capsys):
    from trackmae_stream.probe import run_probe
    from trackmae_stream.train import main

    args = tiny(synthetic, tmp_path, **{"optim.max_steps": 2, "run_name": "probed", "probe_at_end": True, "seed": 3})
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("done: step 2")  # still the last line
    report = lines[lines.index(next(line for line in lines if line.startswith("probe ("))):-1]
    checkpoint = tmp_path / "runs" / "probed" / "checkpoints" / "checkpoint-00000002.pt"
    trained, baseline = run_probe(checkpoint), run_probe(checkpoint, random_init=True, seed=3)
    assert report[1].strip().startswith("trained") and report[2].strip().startswith("random init")
    assert f"({trained.val_correct}/{trained.num_val})" in report[1]
    assert f"({baseline.val_correct}/{baseline.num_val})" in report[2]
    assert f"({baseline.knn_correct}/{baseline.num_val})" in report[2]
    assert f"linear {100 * (trained.top1 - baseline.top1):+.1f} points" in report[3]


def test_the_progress_bar_starts_no_monitor_thread(synthetic, tmp_path):
    """Decoder workers fork from the training process each epoch; a lingering tqdm monitor thread is one more thread
    whose locks a fork can catch (worker start-up hangs were seen in a forked worker)."""
    from tqdm import tqdm

    before = tqdm.monitor
    train(load_config("default", tiny(synthetic, tmp_path, **{"optim.max_steps": 2, "progress": True,
                                                               "data.num_workers": 1, "run_name": "bar"})))
    assert tqdm.monitor is before and tqdm.monitor_interval == 0


def test_linear_probe_of_a_trained_checkpoint(tmp_path, capsys):
    from trackmae_stream.probe import main as probe_main
    from trackmae_stream.probe import run_probe

    # 4 clips per class, so that the held-out split is not empty
    synthetic = ensure_synthetic_dataset(tmp_path / "syn32", num_videos=32, size=64, num_frames=20)
    args = tiny(synthetic, tmp_path, **{"optim.max_steps": 2, "run_name": "probe", "data.synthetic_videos": 32})
    summary = train(load_config("default", args))
    trained = run_probe(summary.last_checkpoint)
    baseline = run_probe(summary.last_checkpoint, random_init=True)
    n_train = len(synthetic.list_file.read_text().split())
    n_val = len(synthetic.val_list_file.read_text().split())
    assert trained.num_train == n_train // 2 and trained.num_val == n_val // 2
    assert 0.0 <= trained.top1 <= 1.0 and trained.num_classes == len(synthetic.class_names)
    assert (trained.train_top1, trained.top1) != (baseline.train_top1, baseline.top1) or trained != baseline
    out = tmp_path / "probe.json"
    assert probe_main([str(summary.last_checkpoint), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["num_val"] == trained.num_val
    # a list-trained checkpoint needs explicit lists; wrong weights are refused naming the keys
    state = load_checkpoint(summary.last_checkpoint)
    state["config"]["data"]["source"] = "list"
    listed = tmp_path / "listed.pt"
    torch.save(state, listed)
    assert probe_main([str(listed)]) == 1 and "--train-list" in capsys.readouterr().err
    state["config"]["model"]["embed_dim"] = 96
    torch.save(state, listed)
    args = [str(listed), "--train-list", str(synthetic.list_file), "--val-list", str(synthetic.val_list_file)]
    assert probe_main(args) == 1 and "shape mismatch" in capsys.readouterr().err
