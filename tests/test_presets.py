"""Every method preset trains a few steps of its embedded default on CPU (tiny sizes by override; the preset's
targets, heads and mask policy unchanged), and its ViT-B form resolves to the ViT-B recipe with the same method."""
from __future__ import annotations

import pytest
import timm
import torch
from test_train import SYN, read_log, tiny

from trackmae_stream.checkpoint import load_checkpoint
from trackmae_stream.config import load_config
from trackmae_stream.data import ensure_synthetic_dataset
from trackmae_stream.engine import train

PRESETS = {  # preset -> (targets, mask policy, decoder groups)
    "videomae": (["pixel"], "tube", ["pixel"]),
    "trackmae": (["pixel", "track_motion"], "motion", ["pixel", "track_motion"]),
    "trackmae_clip": (["clip", "track_motion"], "motion", ["clip", "track_motion"]),
    "mme": (["mme_traj", "mme_hog"], "tube", ["mme"]),
    "motionmae_ref": (["pixel", "motionmae_ref"], "tube", ["pixel"]),
    "adamae": (["pixel"], "adamae", ["pixel"]),
    "tats_ref": (["pixel"], "tats_ref", ["pixel"]),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "set", **SYN)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random-weight stand-in for the CLIP tower (no network here), as tests/test_train.py does."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=False, num_classes=0).state_dict(),
               path)
    return path


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_trains_its_embedded_default(preset, synthetic, tmp_path, teacher):
    targets, policy, groups = PRESETS[preset]
    extra = {"optim.max_steps": 2, "log_every": 2, "run_name": preset, "tracker.iters": 1}
    if preset == "trackmae_clip":
        extra.update({"target.clip.model": "vit_tiny_patch16_224.augreg_in21k", "target.clip.checkpoint": teacher})
    if preset == "tats_ref":
        extra.update({"mask.options.warmup_steps": 1, "mask.options.epochs": 1})
    cfg = load_config(preset, tiny(synthetic, tmp_path, **extra))
    assert list(cfg.target.enabled()) == targets and cfg.mask.type == policy
    summary = train(cfg)
    (logged,) = [r for r in read_log(summary.run_dir) if "loss" in r]
    weights = {name: entry["weight"] for name, entry in cfg.target.enabled().items()}
    assert logged["loss"] == pytest.approx(sum(w * logged[f"loss_{n}"] for n, w in weights.items()), rel=1e-5)
    assert all(logged[f"rel_{n}"] > 0 for n in targets)
    model = load_checkpoint(summary.last_checkpoint)["model"]
    assert sorted({k.split(".")[1] for k in model if k.startswith("decoders.")}) == sorted(groups)
    assert sorted({k.split(".")[1] for k in model if k.startswith("heads.")}) == sorted(targets)
    if preset == "mme":  # MME's heads: MLPs on one depth-1 decoder; L = (traj + hog) / 2
        assert weights == {"mme_traj": 0.5, "mme_hog": 0.5} and cfg.model.decoder_depth == 1
        assert model["heads.mme_hog.2.weight"].shape[0] == 108 and model["heads.mme_traj.2.weight"].shape[0] == 32


@pytest.mark.parametrize("preset", list(PRESETS))
def test_vit_b_form_of_each_preset(preset, tmp_path):
    targets, policy, _ = PRESETS[preset]
    listing = tmp_path / "train.csv"
    listing.write_text("a.mp4 0\n")
    cfg = load_config(f"{preset}_vit_b", [f"data.list_file={listing}", "tracker.checkpoint=null",
                                           "tracker.backend=lucas-kanade"])
    assert cfg.model.embed_dim == 768 and cfg.model.depth == 12 and cfg.data.input_size == 224
    assert list(cfg.target.enabled()) == targets and cfg.mask.type == policy


@pytest.mark.gpu
@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_training_step_of_each_preset_never_syncs_the_host(preset, synthetic, tmp_path, teacher):
    """On CUDA, one optimizer step of every method (targets on the side stream, learned policies' sampling and
    updates included) runs under torch's sync debug mode "error" after a warm-up step."""
    from trackmae_stream.engine import Trainer, _IntervalState
    from trackmae_stream.pipeline import StreamingPrefetcher

    extra = {"device": "cuda", "tracker.iters": 1, "run_name": preset}
    if preset == "trackmae_clip":
        extra.update({"target.clip.model": "vit_tiny_patch16_224.augreg_in21k", "target.clip.checkpoint": teacher})
    if preset == "tats_ref":
        extra.update({"mask.options.warmup_steps": 1, "mask.options.epochs": 1})
    trainer = Trainer(load_config(preset, tiny(synthetic, tmp_path, **extra)))
    try:
        trainer.data.set_position(0, 0)
        policy_keys = [f"mask_{k}" for k in getattr(trainer.masks.policy, "log_keys", ())]
        state = _IntervalState(trainer.device, trainer.targets.names, policy_keys)
        batches = StreamingPrefetcher(trainer.data.loader, trainer.preparer, start_step=0, timer=state.timer,
                                      stream=trainer.side_stream)
        trainer._train_step(batches, state)  # warm-up (and the end of TATS-ref's uniform warm-up)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer._train_step(batches, state)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        batches.close()
    finally:
        trainer.close()
