"""Config: presets, overrides, type coercion, and validation errors that name the key."""
from __future__ import annotations

import pytest
import yaml

from trackmae_stream.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)


def test_default_preset_resolves_tiny_model():
    cfg = load_config("default")
    assert cfg.model.arch == "vit_tiny" and cfg.model.embed_dim == 192 and cfg.model.decoder_heads == 4
    assert cfg.data.source == "synthetic"
    assert cfg.mask.type == "motion" and cfg.mask.rho == 0.5


def test_base_chain_and_overrides_merge(tmp_path):
    list_file = tmp_path / "train.txt"
    list_file.write_text("a.mp4 0\n")
    cfg = load_config("vit_s_k400", [f"data.list_file={list_file}", "optim.base_lr=3e-4", "data.scales=[1, 0.5]",
                                     "data.flip=true", "tracker.checkpoint=null", "tracker.backend=lucas-kanade"])
    assert cfg.model.arch == "vit_small" and cfg.model.embed_dim == 384  # from vit_s_k400
    assert cfg.optim.warmup_epochs == 40  # inherited from vit_b_k400
    assert cfg.optim.base_lr == pytest.approx(3e-4)
    assert cfg.data.scales == (1.0, 0.5) and cfg.data.flip is True


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("default", ["optim.clip_grad=0.5", "mask.ratio=0.75"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("override, key", [
    ("mask.ratio=1.0", "mask.ratio"),
    ("mask.ratio=0", "mask.ratio"),
    ("mask.rho=1.5", "mask.rho"),
    ("mask.rho=-0.1", "mask.rho"),
    ("data.input_size=120", "data.input_size"),  # not divisible by the 16-px patch
    ("data.num_frames=15", "data.num_frames"),  # not divisible by the tubelet
    ("data.source=list", "data.list_file"),  # list source without a list file
    ("data.list_file=/nonexistent/list.txt", "data.list_file"),
    ("tracker.checkpoint=/nonexistent/scaled_offline.pth", "tracker.checkpoint"),
    ("tracker.backend=cotracker3", "tracker.checkpoint"),
    ("resume=/nonexistent/ckpt.pt", "resume"),
    ("model.arch=vit_gigantic", "model.arch"),
    ("batch_size=0", "batch_size"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("tracker.grid_size=5", "tracker.grid_size"),  # 5 * 2 is not a multiple of the 7-token grid
])
def test_out_of_range_values_fail_naming_the_key(override, key):
    overrides = [override]
    if override.startswith("data.list_file"):
        overrides.append("data.source=list")
    with pytest.raises(ConfigError) as err:
        load_config("default", overrides)
    assert str(err.value).startswith(key), str(err.value)


def test_unknown_keys_and_bad_types_are_rejected():
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        load_config("default", ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="batch_size='eight': expected an integer"):
        load_config("default", ["batch_size=eight"])
    with pytest.raises(ConfigError, match="data.flip=1: expected true or false"):
        load_config("default", ["data.flip=1"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="config preset 'nope' not found"):
        load_config("nope")


def test_defaults_are_valid_dataclass():
    cfg = TrainConfig()
    assert cfg.mask.ratio == 0.9 and cfg.target["track_motion"]["upsample"] == 2


FORMER_TARGET_SECTION = {  # the `target` section of configs stored by checkpoints before targets were plug-ins
    "spatial": "pixel", "normalize_pixels": True, "clip_model": "vit_base_patch16_clip_224.openai",
    "clip_checkpoint": None, "motion": True, "upsample": 2, "displacement": "frame", "motion_norm": "patch",
    "motion_weight": None, "drop_invisible": False, "visibility_threshold": 0.5,
}


def test_the_former_flat_target_layout_resolves_to_the_same_targets_and_run_identity():
    from trackmae_stream.config import config_from_dict, to_dict
    from trackmae_stream.run_folder import run_identity

    new = load_config("trackmae")  # the public code's targets, which the former flat keys describe
    data = to_dict(new)
    data["target"] = dict(FORMER_TARGET_SECTION)
    old = config_from_dict(data)
    assert old.target == new.target and run_identity(old) == run_identity(new)
    assert list(new.target.enabled()) == ["pixel", "track_motion"]
    clip = config_from_dict({**data, "target": {**FORMER_TARGET_SECTION, "spatial": "clip", "motion_norm": "none",
                                                "drop_invisible": True}}, check=False)
    assert list(clip.target.enabled()) == ["clip", "track_motion"]
    assert clip.target["track_motion"]["weight"] == 0.25  # the paper's λ beside CLIP
    assert clip.target["track_motion"]["norm"] == "none" and clip.target["track_motion"]["drop_invisible"]
    none = load_config("default", ["target.motion=false", "mask.type=tube"])
    assert list(none.target.enabled()) == ["pixel"]
    # the resolved section round-trips through a saved config
    assert config_from_dict(to_dict(clip), check=False).target == clip.target


def test_target_section_overrides_add_drop_and_tune_targets():
    cfg = load_config("default", ["target.pixel=false", "target.track_motion.weight=0.5",
                                  "target.track_motion.head=mlp", "target.track_motion.head_hidden=7"])
    assert list(cfg.target.enabled()) == ["track_motion"]
    entry = cfg.target["track_motion"]
    assert entry["weight"] == 0.5 and entry["head"] == "mlp" and entry["head_hidden"] == 7
    assert entry["decoder"] == "track_motion" and entry["activation"] == "none"
    again = load_config("default", ["target.pixel.normalize=false"])  # naming a target's option keeps it on
    assert again.target["pixel"]["enabled"] and not again.target["pixel"]["normalize"]


@pytest.mark.parametrize(("override", "key"), [
    ("target.nonexistent={}", "target.nonexistent"),
    ("target.pixel.normalise=true", "target.pixel.normalise"),
    ("target.track_motion.upsample=0", "target.track_motion.upsample"),
    ("target.track_motion.norm=bogus", "target.track_motion.norm"),
    ("target.track_motion.weight=-1", "target.track_motion.weight"),
    ("target.pixel.head=conv", "target.pixel.head"),
    ("target.pixel.activation=relu", "target.pixel.activation"),
    ("target.pixel.decoder=a-b", "target.pixel.decoder"),
    ("target.pixel.enabled=maybe", "target.pixel.enabled"),
    ("target.track_motion.visibility_threshold=2", "target.track_motion.visibility_threshold"),
    ("target.spatial=pixels", "target.spatial"),
    ("target.pixel=3", "target.pixel"),
    ("mask.type=nonexistent", "mask.type"),
    ("mask.options.nonexistent=1", "mask.options.nonexistent"),
])
def test_bad_target_and_mask_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("default", [override])
    assert key in str(err.value)


def test_no_enabled_target_is_refused():
    with pytest.raises(ConfigError, match="no target is enabled"):
        load_config("default", ["target.pixel=false", "target.track_motion=false"])
