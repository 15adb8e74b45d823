"""The probe: its linear classifier on known answers (separable clusters, the optimum's stationarity), videos that do
not decode (excluded and counted, never replaced by others), the Wilson intervals (scipy and the definition), the
k-NN (a brute-force loop), the seeded random-init baseline (the trainer's initialisation) and the fixed clips."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from test_data_helpers import SMALL_SET, decode_all_frames, small_synthetic_set

from trackmae_stream.config import load_config, to_dict
from trackmae_stream.data import read_video_list
from trackmae_stream.data.transforms import CropBox, crop_resize_flip
from trackmae_stream.engine import build_model
from trackmae_stream.probe import (
    Z95,
    Accuracy,
    EvalClips,
    ProbeError,
    build_encoder,
    check_classes,
    eval_frame_indices,
    evaluate_features,
    fit_linear_probe,
    knn_predict,
    probe_encoder,
    run_probe,
    wilson_interval,
)
from trackmae_stream.probe import main as probe_main
from trackmae_stream.targets import TargetBuilder


def clusters(n: int, classes: int, dim: int, spread: float, gen: torch.Generator):
    centres = torch.randn(classes, dim, generator=gen) * 4
    labels = torch.arange(n) % classes
    return centres[labels] + spread * torch.randn(n, dim, generator=gen), labels


def test_separable_clusters_are_classified_perfectly():
    gen = torch.Generator().manual_seed(0)
    train_x, train_y = clusters(61, 5, 37, 0.5, gen)
    val_x, val_y = clusters(29, 5, 37, 0.5, torch.Generator().manual_seed(0).manual_seed(0))
    result = fit_linear_probe(train_x, train_y, val_x, val_y)
    assert result.top1 == 1.0 and result.train_top1 == 1.0
    assert (result.num_train, result.num_val, result.num_classes) == (61, 29, 5)


def test_random_labels_do_not_generalise():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 23, generator=gen)
    y = torch.randint(0, 4, (400,), generator=gen)
    result = fit_linear_probe(x[:300], y[:300], x[300:], y[300:], weight_decay=1e-2)
    assert result.top1 < 0.4  # chance is 0.25; 100 draws leave a 0.4 bound > 3 sigma away


def test_fitted_head_is_the_regularised_optimum():
    """At the L-BFGS solution the gradient of the (convex) objective vanishes: recompute it independently."""
    gen = torch.Generator().manual_seed(2)
    x, y = clusters(90, 3, 11, 3.0, gen)  # overlapping clusters: a non-trivial optimum
    wd = 5e-2
    result = fit_linear_probe(x, y, x, y, weight_decay=wd, max_iter=500)
    weight, bias, mean, std = result.head
    weight, bias = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    xs = (x.double() - x.double().mean(0)) / x.double().std(0)
    torch.testing.assert_close(mean, x.double().mean(0))
    torch.testing.assert_close(std, x.double().std(0))
    loss = F.cross_entropy(xs @ weight + bias, y) + wd * weight.square().sum()
    grads = torch.autograd.grad(loss, (weight, bias))
    assert max(g.abs().max().item() for g in grads) < 1e-6
    predicted = ((xs @ weight + bias).argmax(1) == y).double().mean().item()
    assert predicted == result.train_top1


# ------------------------------------------------------------------------------------- undecodable videos

TINY_PROBE = ["data.num_frames=4", "data.sampling_rate=2", "data.input_size=32", "model.embed_dim=24",
              "model.num_heads=2", "model.depth=1", "model.decoder_dim=16", "model.decoder_heads=2",
              "model.decoder_depth=1"]


@pytest.fixture(scope="module")
def probe_lists(tmp_path_factory):
    """The small synthetic set's train/val lists with a corrupt video added to each, and a val list of bad ones."""
    synthetic = small_synthetic_set(tmp_path_factory)
    folder = tmp_path_factory.mktemp("probe")
    (folder / "corrupt.webm").write_bytes(bytes(range(256)) * 16)
    (folder / "zero.webm").write_bytes(b"")
    for name, source in (("train.list", synthetic.list_file), ("val.list", synthetic.val_list_file)):
        lines = [f"{synthetic.root / line.split()[0]} {line.split()[1]}" for line in source.read_text().splitlines()]
        (folder / name).write_text("\n".join(lines[:2] + ["corrupt.webm 0"] + lines[2:]) + "\n")
    (folder / "bad_val.list").write_text("corrupt.webm 0\nzero.webm 1\nmissing.webm 2\n")
    cfg = load_config("default", TINY_PROBE)
    checkpoint = folder / "untrained.pt"
    torch.save({"model": {}, "optimizer": {}, "step": 0, "epoch": 0, "batch_in_epoch": 0, "config": to_dict(cfg),
                "rng": {}}, checkpoint)
    return folder, synthetic, cfg, checkpoint


def test_undecodable_videos_are_excluded_and_counted_never_substituted(probe_lists):
    folder, synthetic, cfg, _ = probe_lists
    train = read_video_list(folder / "train.list")
    val = read_video_list(folder / "val.list")
    torch.manual_seed(0)
    result = probe_encoder(build_encoder(cfg), cfg, train, val, batch_size=4)
    assert (result.num_train, result.num_val) == (len(train) - 1, len(val) - 1)
    assert (result.num_train_excluded, result.num_val_excluded) == (1, 1)
    assert [(e["split"], e["path"]) for e in result.excluded] == [("train", str(folder / "corrupt.webm")),
                                                                  ("val", str(folder / "corrupt.webm"))]
    assert all("unreadable" in e["reason"] for e in result.excluded)
    summary = result.summary()
    assert summary["num_val_excluded"] == 1 and summary["num_train_excluded"] == 1


def test_probe_cli_reports_the_exclusions_and_fails_when_no_val_video_decodes(probe_lists, tmp_path, capsys):
    folder, _, _, checkpoint = probe_lists
    common = [str(checkpoint), "--random-init", "--train-list", str(folder / "train.list"), "--batch-size", "4"]
    out = tmp_path / "probe.json"
    assert probe_main(common + ["--val-list", str(folder / "val.list"), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "excluded 1 of 9 train and 1 of 9 validation videos" in printed.out, printed.out
    assert str(folder / "corrupt.webm") in printed.err  # each excluded video with its reason
    written = json.loads(out.read_text())
    assert (written["num_val"], written["num_val_excluded"], written["num_train_excluded"]) == (8, 1, 1)

    assert probe_main(common + ["--val-list", str(folder / "bad_val.list")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "none of the 3 validation videos" in err, err
    with pytest.raises(ProbeError, match="none of the 3 validation videos can be decoded"):
        run_probe(checkpoint, random_init=True, train_list=str(folder / "train.list"),
                  val_list=str(folder / "bad_val.list"))


# ------------------------------------------------------------------ intervals, k-NN, seeded random init, fixed clips

def _wilson_by_bisection(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson interval from its definition: the proportions p that the score test |k/n - p| <= z sqrt(p (1 - p)
    / n) accepts, their ends found by bisection."""
    p_hat = k / n

    def rejects(p: float) -> bool:
        return (p_hat - p) ** 2 > z * z * p * (1 - p) / n

    def end(inside: float, outside: float) -> float:
        for _ in range(200):
            middle = (inside + outside) / 2
            inside, outside = (inside, middle) if rejects(middle) else (middle, outside)
        return inside

    return (0.0 if k == 0 else end(p_hat, 0.0)), (1.0 if k == n else end(p_hat, 1.0))


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (1, 1), (15, 120), (57, 120), (119, 120), (21, 480)])
def test_wilson_interval_matches_scipy_and_its_definition(k, n):
    low, high = wilson_interval(k, n)
    reference = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert low == pytest.approx(reference.low, abs=1e-12) and high == pytest.approx(reference.high, abs=1e-12)
    brute_low, brute_high = _wilson_by_bisection(k, n)
    assert low == pytest.approx(brute_low, abs=1e-9) and high == pytest.approx(brute_high, abs=1e-9)
    assert Accuracy(k, n).ci95 == (low, high)


def test_wilson_interval_known_value():
    # 14 of 120 (the 11.7%), by hand: centre (p + z^2 / 2n) / (1 + z^2 / n) = 0.12856, half-width
    # z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n) = 0.05778: [7.08%, 18.63%], chance (12.5%) inside
    low, high = wilson_interval(14, 120)
    assert (round(low, 4), round(high, 4)) == (0.0708, 0.1863)
    with pytest.raises(ValueError):
        wilson_interval(3, 0)


def _knn_brute_force(train_x, train_y, query_x, k, temperature, num_classes):
    """One query at a time, plain Python over float64 numpy rows."""
    train, query = train_x.double().numpy(), query_x.double().numpy()
    n, dim = train.shape
    mean = [sum(train[i, j] for i in range(n)) / n for j in range(dim)]
    std = [max(math.sqrt(sum((train[i, j] - mean[j]) ** 2 for i in range(n)) / (n - 1)), 1e-6) for j in range(dim)]

    def unit(row):
        z = [(row[j] - mean[j]) / std[j] for j in range(dim)]
        norm = math.sqrt(sum(v * v for v in z))
        return [v / norm for v in z]

    bank = [unit(train[i]) for i in range(n)]
    predictions = []
    for row in query:
        u = unit(row)
        scored = sorted(((sum(a * b for a, b in zip(u, bank[i])), i) for i in range(n)), reverse=True)[:k]
        votes = [0.0] * num_classes
        for similarity, i in scored:
            votes[int(train_y[i])] += math.exp(similarity / temperature)
        predictions.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return predictions


@pytest.mark.parametrize("n, q, dim, classes, k", [(37, 13, 5, 3, 7), (11, 9, 3, 4, 20), (53, 21, 8, 5, 1),
                                                   (29, 7, 17, 2, 29)])
def test_knn_matches_a_brute_force_loop(n, q, dim, classes, k):
    gen = torch.Generator().manual_seed(n)
    scale = torch.rand(dim, generator=gen) * 5 + 0.1  # unequal feature scales: the standardisation matters
    train_x = torch.randn(n, dim, generator=gen) * scale + 3
    train_y = torch.randint(0, classes, (n,), generator=gen)
    query_x = torch.randn(q, dim, generator=gen) * scale + 3
    predicted = knn_predict(train_x, train_y, query_x, k=k, temperature=0.07, num_classes=classes)
    assert predicted.tolist() == _knn_brute_force(train_x, train_y, query_x, min(k, n), 0.07, classes)


def test_evaluate_features_reports_both_classifiers_with_intervals():
    gen = torch.Generator().manual_seed(4)
    train_x, train_y = clusters(64, 4, 9, 1.0, gen)
    val_x, val_y = clusters(31, 4, 9, 1.0, torch.Generator().manual_seed(4))
    result = evaluate_features(train_x, train_y, val_x, val_y, knn_k=5)
    assert result.knn_top1 == 1.0 and result.top1 == 1.0 and result.knn_k == 5
    assert result.val_correct == result.knn_correct == 31
    assert result.top1_ci95 == wilson_interval(31, 31) and result.knn_top1_ci95 == wilson_interval(31, 31)
    summary = result.summary()
    assert summary["top1_ci95"] == list(wilson_interval(31, 31)) and "over the evaluated clips" in summary["intervals"]


def test_random_init_is_seeded_and_is_the_trainers_initialisation():
    cfg = load_config("default")  # vit_tiny, the embedded default
    before = torch.random.get_rng_state()
    first, again, other = build_encoder(cfg, seed=0), build_encoder(cfg, seed=0), build_encoder(cfg, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global generator is left alone
    for (name, value), repeat in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(value, repeat), name
    assert not torch.equal(first.blocks[0].attn.qkv.weight, other.blocks[0].attn.qkv.weight)

    torch.manual_seed(0)
    trainer = build_model(cfg, TargetBuilder(cfg)).encoder  # what engine.Trainer builds
    for (name, value), theirs in zip(first.state_dict().items(), trainer.state_dict().values()):
        assert torch.equal(value, theirs), name
    qkv = torch.cat([block.attn.qkv.weight.flatten() for block in first.blocks])
    trainer_qkv = torch.cat([block.attn.qkv.weight.flatten() for block in build_encoder(cfg, seed=5).blocks])
    # xavier-uniform (VideoMAE): std sqrt(2 / (192 + 576)) = 0.051, not torch's default 1 / sqrt(3 * 192) = 0.042
    assert qkv.std().item() == pytest.approx(math.sqrt(2 / (192 + 576)), rel=0.01)
    assert qkv.std().item() == pytest.approx(trainer_qkv.std().item(), rel=0.01)


def test_same_seed_same_random_init_result_other_seed_other_result(probe_lists):
    folder, _, _, checkpoint = probe_lists
    lists = dict(train_list=str(folder / "train.list"), val_list=str(folder / "val.list"), batch_size=4)
    first = run_probe(checkpoint, random_init=True, seed=0, **lists)
    again = run_probe(checkpoint, random_init=True, seed=0, **lists)
    other = run_probe(checkpoint, random_init=True, seed=1, **lists)
    assert first.summary() == again.summary()
    assert all(torch.equal(a, b) for a, b in zip(first.head, again.head))
    assert not torch.equal(first.head[2], other.head[2])  # other weights, other features
    assert first.meta["seed"] == 0 and first.meta["random_init"] and first.meta["clip"]["window"] == "centre"


def test_evaluation_clips_are_fixed_windows_whatever_the_run_seed(probe_lists):
    _, synthetic, cfg, _ = probe_lists
    records = read_video_list(synthetic.val_list_file, synthetic.root)[:3]
    d = cfg.data
    assert eval_frame_indices(40, 16, 2).tolist() == list(range(4, 35, 2))  # centred: 4 frames left, 5 right
    assert eval_frame_indices(24, 4, 2).tolist() == [8, 10, 12, 14]
    assert eval_frame_indices(5, 4, 2).tolist() == [0, 2, 4, 4]  # shorter than the window: the sampler's clamp
    clips = [EvalClips(records, replace(cfg, seed=seed)) for seed in (0, 7)]
    for index, record in enumerate(records):
        a, b = clips[0][index]["frames"], clips[1][index]["frames"]
        assert torch.equal(a, b)
        frames = decode_all_frames(record.path)[eval_frame_indices(SMALL_SET["num_frames"], d.num_frames,
                                                                   d.sampling_rate)]
        expected = crop_resize_flip(frames, CropBox(0, 0, SMALL_SET["size"], SMALL_SET["size"]), d.input_size)
        assert np.abs(a[0].numpy().astype(int) - expected.astype(int)).max() <= 1  # decoders agree within rounding


def test_a_class_missing_from_the_validation_split_is_refused():
    check_classes(torch.tensor([0, 1, 2, 2]), torch.tensor([2, 1, 0]))
    with pytest.raises(ProbeError, match=r"class\(es\) \[1, 3\]"):
        check_classes(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2]))


def test_probe_cli_writes_intervals_knn_and_the_seed(probe_lists, tmp_path, capsys):
    folder, _, _, _ = probe_lists
    out = tmp_path / "probe.json"
    # no checkpoint: a preset (with the tiny shapes) and --random-init
    argv = ["--random-init", "--seed", "3", "--config", "default", "--train-list", str(folder / "train.list"),
            "--val-list", str(folder / "val.list"), "--batch-size", "4", "--knn-k", "5", "--out", str(out)]
    for override in TINY_PROBE:
        argv += ["--set", override]
    assert probe_main(argv) == 0
    printed = capsys.readouterr().out
    assert "random init (seed 3) linear probe: top-1" in printed and "k-NN (k=5, cosine, weighted)" in printed
    assert "95% Wilson score intervals" in printed
    written = json.loads(out.read_text())
    assert written["seed"] == 3 and written["random_init"] and written["checkpoint"] is None
    assert written["knn_k"] == 5 and len(written["knn_top1_ci95"]) == 2 and len(written["top1_ci95"]) == 2
    assert written["top1"] == written["val_correct"] / written["num_val"]
    assert written["clip"] == {"window": "centre", "num_frames": 4, "sampling_rate": 2, "input_size": 32}
    assert "over the evaluated clips" in written["intervals"]
    assert probe_main(["--config", "default"]) == 1  # neither a checkpoint nor --random-init
    assert "give a checkpoint" in capsys.readouterr().err
