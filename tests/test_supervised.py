"""The supervised bound: the trainer's encoder and optimiser trained on the labels for a step budget, evaluated with
the probe's protocol (fixed clips, both classifiers, Wilson intervals). Tiny shapes: these tests check the plumbing;
the measured bound on the motion task is in the report of `python -m trackmae_stream.supervised`."""
from __future__ import annotations

import json
import logging

import torch
from test_data_helpers import small_synthetic_set

from trackmae_stream.config import load_config
from trackmae_stream.data import read_video_list
from trackmae_stream.probe import build_encoder, wilson_interval
from trackmae_stream.supervised import Classifier, train_supervised
from trackmae_stream.supervised import main as supervised_main

TINY = ["data.num_frames=4", "data.sampling_rate=2", "data.input_size=32", "model.embed_dim=24", "model.num_heads=2",
        "model.depth=1", "model.decoder_dim=16", "model.decoder_heads=2", "model.decoder_depth=1"]


def test_training_moves_the_encoder_and_reports_the_probe_protocol(tmp_path_factory):
    synthetic = small_synthetic_set(tmp_path_factory)
    cfg = load_config("default", TINY)
    train = read_video_list(synthetic.list_file, synthetic.root)
    val = read_video_list(synthetic.val_list_file, synthetic.root)
    result = train_supervised(cfg, train, val, steps=3, batch_size=4, seed=0, workers=0)
    assert (result.steps, result.num_train, result.num_val, result.num_classes) == (3, len(train), len(val), 8)
    assert result.val.total == len(val) and result.train.total == len(train)
    assert result.val.ci95 == wilson_interval(result.val.correct, len(val))
    probe = result.probe
    assert probe["num_val"] == len(val) and probe["knn_k"] == len(train)  # k = 20 capped at the 8 training clips
    assert len(probe["top1_ci95"]) == 2 and len(probe["knn_top1_ci95"]) == 2
    summary = result.summary()
    assert summary["val"]["ci95"] == list(result.val.ci95) and "Wilson" in summary["intervals"]
    assert result.final_loss > 0
    start = build_encoder(cfg, seed=0)  # the same seed: where training started
    assert not torch.equal(result.model.encoder.patch_embed.proj.weight, start.patch_embed.proj.weight)


def test_the_classifier_starts_from_the_trainers_encoder_and_a_zero_head():
    cfg = load_config("default", TINY)
    model = Classifier(build_encoder(cfg, seed=4), num_classes=8)
    reference = build_encoder(cfg, seed=4)
    for (name, value), theirs in zip(model.encoder.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, theirs), name
    clip = torch.randn(2, 3, 4, 32, 32)
    assert torch.equal(model(clip), torch.zeros(2, 8))  # every class equally likely at the start


def test_cli_writes_json_and_ignores_flip(tmp_path_factory, tmp_path, capsys, caplog):
    synthetic = small_synthetic_set(tmp_path_factory)
    out = tmp_path / "supervised.json"
    argv = ["--train-list", str(synthetic.list_file), "--val-list", str(synthetic.val_list_file), "--steps", "2",
            "--batch-size", "4", "--workers", "0", "--out", str(out), "--set", "data.flip=true"]
    for override in TINY:
        argv += ["--set", override]
    with caplog.at_level(logging.WARNING):
        assert supervised_main(argv) == 0
    assert "data.flip=true ignored" in caplog.text
    printed = capsys.readouterr().out
    assert "supervised bound (2 steps x 4 clips" in printed and "k-NN" in printed and "chance 12.5%" in printed
    written = json.loads(out.read_text())
    assert written["steps"] == 2 and written["clip"] == {"num_frames": 4, "sampling_rate": 2, "input_size": 32}
    assert set(written["val"]) == {"top1", "ci95", "correct", "total"} and "knn_top1" in written["probe"]
    assert supervised_main(argv[:4] + ["--steps", "0"]) == 1  # a budget of no steps is refused
    assert "steps and batch_size must be >= 1" in capsys.readouterr().err
