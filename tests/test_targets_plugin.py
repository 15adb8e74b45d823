"""Targets as plug-ins: the README's example target (its code block is executed here, so the README cannot drift)
is one module plus its registration; it trains beside the preset's targets with its own head, loss and log keys, and
its values equal a brute-force loop. No former single-purpose names are left outside the target modules."""
from __future__ import annotations

import itertools
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import SYN, read_log, tiny

from trackmae_stream.checkpoint import load_checkpoint
from trackmae_stream.config import ConfigError, load_config
from trackmae_stream.data import ensure_synthetic_dataset
from trackmae_stream.engine import train
from trackmae_stream.targets import TARGETS, TargetBuilder, TargetInputs, unregister_target

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- example: new target (tests/test_targets_plugin.py runs this block) -->"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    after = text[text.index(MARKER) + len(MARKER):]
    match = re.search(r"```python\n(.*?)```", after, re.S)
    assert match is not None, "the README's example block is gone"
    return match.group(1)


@pytest.fixture
def mean_colour():
    module = types.ModuleType("readme_example_target")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    try:
        exec(compile(readme_example(), "README.md:example", "exec"), module.__dict__)
        yield module.MeanColour
    finally:
        unregister_target("mean_colour")
        sys.modules.pop(module.__name__, None)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "set", **SYN)


def test_the_readme_target_equals_a_brute_force_loop(mean_colour):
    assert TARGETS["mean_colour"] is mean_colour
    cfg = load_config("default", ["data.num_frames=6", "data.input_size=48", "target.mean_colour.scale=2.5",
                                  "target.track_motion=false", "mask.type=tube"])
    builder = TargetBuilder(cfg)
    assert builder.names == ["pixel", "mean_colour"] and builder.dims["mean_colour"] == 3
    frames = torch.randint(1, 256, (2, 6, 48, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    masked = torch.tensor([[0, 4, 9, 17, 26], [1, 2, 13, 20, 25]])
    inputs = TargetInputs(frames_u8=frames)
    prepared, _ = builder.prepare(inputs)
    values, valid = builder.at(inputs, prepared, masked)
    assert valid == {}
    ref = np.zeros((2, 5, 3))
    f = frames.numpy().astype(np.float64) / 255.0
    for b, j in itertools.product(range(2), range(5)):
        n = int(masked[b, j])
        t, rest = divmod(n, 9)
        hp, wp = divmod(rest, 3)
        ref[b, j] = 2.5 * f[b, 2 * t:2 * t + 2, 16 * hp:16 * hp + 16, 16 * wp:16 * wp + 16].mean(axis=(0, 1, 2))
    np.testing.assert_allclose(values["mean_colour"].double().numpy(), ref, atol=1e-6, rtol=0)


def test_the_readme_target_trains_beside_the_preset_targets(mean_colour, synthetic, tmp_path):
    args = tiny(synthetic, tmp_path, **{"optim.max_steps": 2, "log_every": 2, "target.mean_colour.weight": 0.5,
                                        "target.track_motion": False, "mask.type": "tube", "run_name": "plugin"})
    summary = train(load_config("default", args))
    records = read_log(summary.run_dir)
    assert records[0]["targets"] == {"pixel": 1.0, "mean_colour": 0.5} and records[0]["mask_policy"] == "tube"
    (logged,) = [r for r in records if "loss" in r]
    assert logged["loss"] == pytest.approx(logged["loss_pixel"] + 0.5 * logged["loss_mean_colour"], rel=1e-6)
    assert 0 < logged["rel_mean_colour"] and "loss_track_motion" not in logged
    state = load_checkpoint(summary.last_checkpoint)
    assert state["model"]["heads.mean_colour.weight"].shape == (3, 32)
    assert "decoders.mean_colour.encoder_to_decoder.weight" in state["model"]
    assert state["config"]["target"]["mean_colour"]["scale"] == 1.0


def test_unknown_options_of_a_plugin_target_name_the_key(mean_colour):
    with pytest.raises(ConfigError, match="target.mean_colour.colour"):
        load_config("default", ["target.mean_colour.colour=1"])


def test_no_former_target_names_outside_the_target_modules():
    """The names "spatial" and "motion" (as target keys) live only in the target modules and the former-layout
    aliases (config.py, model/adapters.py); "motion" stays the motion-aware mask policy's name and a picture label."""
    allowed = {"targets", "methods", "kernels"}
    # the names as keys: x["motion"], {"spatial": ...}, ("spatial", ...) tuples of names, .motion_target, ...
    pattern = re.compile(r"""\[["'](spatial|motion)["']\]|["'](spatial|motion)["']\s*[:,)]"""
                         r"""|\.(spatial|motion)_(target|dim|valid)\b|motion_weight\(""")
    hits = []
    for path in (ROOT / "trackmae_stream").rglob("*.py"):
        rel = path.relative_to(ROOT / "trackmae_stream")
        if rel.parts[0] in allowed or rel.as_posix() in ("config.py", "model/adapters.py", "data/synthetic.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not re.search(r'name = "motion"|\(\["motion", name', line):
                hits.append(f"{rel}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)
