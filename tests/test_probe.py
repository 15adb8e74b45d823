"""The linear probe: its classifier on known answers (separable clusters, the optimum's stationarity), and videos
that do not decode (excluded and counted, never replaced by others)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_data_helpers import small_synthetic_set

from trackmae_stream.config import load_config, to_dict
from trackmae_stream.data import read_video_list
from trackmae_stream.probe import ProbeError, build_encoder, fit_linear_probe, probe_encoder, run_probe
from trackmae_stream.probe import main as probe_main


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
