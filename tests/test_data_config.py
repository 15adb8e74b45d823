"""The data section's validation: keys that would be ignored, lists that are folders, mean and std named apart."""
from __future__ import annotations

import pytest

from trackmae_stream.config import ConfigError, load_config


def test_a_list_file_without_the_list_source_is_refused_naming_both_keys(tmp_path):
    list_file = tmp_path / "train.csv"
    list_file.write_text("a.mp4 0\n")
    with pytest.raises(ConfigError) as error:
        load_config("default", [f"data.list_file={list_file}"])  # the default preset trains on the synthetic set
    message = str(error.value)
    assert message.startswith("data.list_file=") and "data.source='list'" in message, message
    with pytest.raises(ConfigError, match=r"^data\.root=.*data\.source='list'"):
        load_config("default", [f"data.root={tmp_path}"])
    cfg = load_config("default", ["data.source=list", f"data.list_file={list_file}", f"data.root={tmp_path}"])
    assert cfg.data.list_file == str(list_file)


def test_every_preset_that_names_a_list_also_selects_the_list_source(tmp_path):
    list_file = tmp_path / "train.csv"
    list_file.write_text("a.mp4 0\n")
    for preset in ("vit_s_k400", "vit_b_k400", "vit_b_k400_clip", "vit_l_k700"):
        cfg = load_config(preset, [f"data.list_file={list_file}", "tracker.checkpoint=official"])
        assert cfg.data.source == "list", preset


def test_a_list_file_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.list_file=.*is a directory, not a list file"):
        load_config("default", ["data.source=list", f"data.list_file={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^data\.list_file=.*file not found"):
        load_config("default", ["data.source=list", f"data.list_file={tmp_path / 'nope.csv'}"])
    list_file = tmp_path / "train.csv"
    list_file.write_text("a.mp4 0\n")
    with pytest.raises(ConfigError, match=r"^data\.root=.*is a file, not a folder"):
        load_config("default", ["data.source=list", f"data.list_file={list_file}", f"data.root={list_file}"])


@pytest.mark.parametrize("override, key", [
    ("data.mean=[0.5, 0.5]", "data.mean"),
    ("data.mean=[0.5, 0.5, 0.5, 0.5]", "data.mean"),
    ("data.std=[0.2, 0.2]", "data.std"),
    ("data.std=[0.2, 0.0, 0.2]", "data.std"),
    ("data.std=[0.2, -0.1, 0.2]", "data.std"),
])
def test_mean_and_std_errors_name_their_own_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config("default", [override])
    assert str(error.value).startswith(f"{key}="), str(error.value)
