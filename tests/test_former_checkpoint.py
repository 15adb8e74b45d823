"""A training checkpoint written before targets became plug-ins (model keys `decoder.*` / `motion_decoder.*` in the
former registration order, the optimizer state numbered in that order, the config's flat `target` section) resumes
into the per-target trainer and reaches the uninterrupted run's step-4 weights, optimizer state and losses bit for
bit."""
from __future__ import annotations

import shutil

import torch
from test_config import FORMER_TARGET_SECTION
from test_train import SYN, read_log, tiny

from trackmae_stream.checkpoint import load_checkpoint
from trackmae_stream.config import load_config
from trackmae_stream.data import ensure_synthetic_dataset
from trackmae_stream.engine import train

NEW_TO_OLD = (("heads.pixel.", "decoder.head."), ("decoders.pixel.encoder_to_decoder.", "encoder_to_decoder."),
              ("decoders.pixel.", "decoder."), ("heads.track_motion.", "motion_decoder.head."),
              ("decoders.track_motion.encoder_to_decoder.", "motion_encoder_to_decoder."),
              ("decoders.track_motion.", "motion_decoder."))
# the former TrackMAE registered: encoder, mask_token, encoder_to_decoder, decoder (blocks, norm, head), then the same
# for the motion decoder
OLD_SECTIONS = ("encoder.", "mask_token", "encoder_to_decoder.", "decoder.blocks.", "decoder.norm.", "decoder.head.",
                "motion_encoder_to_decoder.", "motion_decoder.blocks.", "motion_decoder.norm.", "motion_decoder.head.")


def old_name(key: str) -> str:
    for new, old in NEW_TO_OLD:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def groups(names: list[str], shapes: dict[str, tuple]) -> list[list[str]]:
    """VideoMAE's AdamW groups: matrices decayed; 1-D tensors and the mask token not."""
    decay = [n for n in names if len(shapes[n]) > 1 and n != "mask_token"]
    return [decay, [n for n in names if n not in decay]]


def to_former_layout(state: dict) -> dict:
    model = state["model"]
    new_names = list(model)
    old = {old_name(k): v for k, v in model.items()}
    order = sorted(old, key=lambda k: (next(i for i, s in enumerate(OLD_SECTIONS) if k.startswith(s)),
                                       new_names.index(next(n for n in new_names if old_name(n) == k))))
    shapes_new = {k: tuple(v.shape) for k, v in model.items()}
    shapes_old = {old_name(k): s for k, s in shapes_new.items()}
    new_groups, old_groups = groups(new_names, shapes_new), groups(order, shapes_old)
    new_id = {n: i for i, n in enumerate(new_groups[0] + new_groups[1])}
    opt = state["optimizer"]
    saved_state, param_groups, position = {}, [], 0
    for group, names in zip(opt["param_groups"], old_groups):
        ids = []
        for name in names:
            source = new_id[next(n for n in new_names if old_name(n) == name)]
            saved_state[position] = opt["state"][source]
            ids.append(position)
            position += 1
        param_groups.append({**group, "params": ids})
    config = dict(state["config"])
    config["target"] = dict(FORMER_TARGET_SECTION)
    return {**state, "model": {k: old[k] for k in order}, "optimizer": {"state": saved_state,
                                                                         "param_groups": param_groups},
            "config": config}


def test_a_former_layout_training_checkpoint_resumes_bit_exact(tmp_path):
    synthetic = ensure_synthetic_dataset(tmp_path / "synthetic", **SYN)
    # the former flat target keys describe the public code's targets (normalised pixels and motion)
    extra = {"optim.max_steps": 4, "ckpt_every": 2, "target.pixel.normalize": True, "target.track_motion.norm": "patch"}
    straight = train(load_config("default", tiny(synthetic, tmp_path, run_name="straight", **extra)))
    former_dir = straight.run_dir.parent / "former"
    shutil.copytree(straight.run_dir, former_dir)
    (former_dir / "checkpoints" / "checkpoint-00000004.pt").unlink()
    path = former_dir / "checkpoints" / "checkpoint-00000002.pt"
    state = to_former_layout(load_checkpoint(path))
    assert "decoder.head.weight" in state["model"] and "motion_decoder.blocks.0.attn.qkv.weight" in state["model"]
    torch.save(state, path)
    resumed = train(load_config("default", tiny(synthetic, tmp_path, run_name="former", resume="auto", **extra)))
    assert any(r.get("event") == "resume" and r["step"] == 2 for r in read_log(former_dir))
    a, b = load_checkpoint(straight.run_dir / "checkpoints" / "checkpoint-00000004.pt"), load_checkpoint(
        resumed.last_checkpoint)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for i, sa in a["optimizer"]["state"].items():
        sb = b["optimizer"]["state"][i]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"]), i
    assert a["loss_history"] == b["loss_history"]
