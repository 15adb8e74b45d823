"""CoTracker3 checkpoint loader: strict loading with clear errors, the {"model": ...} wrapper, SHA-256, URLs."""
from __future__ import annotations

import hashlib

import pytest
import torch

from trackmae_stream.tracking.cotracker3 import (
    OFFICIAL_CHECKPOINT_URLS,
    CheckpointError,
    CoTrackerThreeOffline,
    CoTrackerThreeOnline,
    build_cotracker3,
    check_state_dict,
    load_checkpoint,
    read_state_dict,
)
from trackmae_stream.tracking.cotracker3.checkpoint import resolve_checkpoint_source

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A randomly initialised offline model saved raw and wrapped; the file's SHA-256."""
    torch.manual_seed(1)
    model = CoTrackerThreeOffline()
    folder = tmp_path_factory.mktemp("ckpt")
    raw, wrapped = folder / "raw.pth", folder / "wrapped.pth"
    torch.save(model.state_dict(), raw)
    torch.save({"model": model.state_dict(), "epoch": 3}, wrapped)
    return {"model": model, "raw": raw, "wrapped": wrapped, "sha256": hashlib.sha256(raw.read_bytes()).hexdigest()}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["raw", "wrapped"])
def test_loads_raw_and_wrapped_with_sha256(saved, kind):
    model = build_cotracker3("offline", saved[kind], sha256=saved["sha256"].upper() if kind == "raw" else None)
    assert _same_weights(model, saved["model"])
    assert not model.training


def test_bad_sha256_names_file_and_hashes(saved):
    with pytest.raises(CheckpointError, match="SHA-256 mismatch") as info:
        load_checkpoint(CoTrackerThreeOffline(), saved["raw"], sha256="0" * 64)
    assert str(saved["raw"]) in str(info.value) and saved["sha256"] in str(info.value)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does-not-exist.pth"):
        build_cotracker3("offline", "/nonexistent/does-not-exist.pth")


def test_missing_and_unexpected_keys_are_listed(saved):
    state = dict(saved["model"].state_dict())
    del state["corr_mlp.fc1.bias"], state["updateformer.virual_tracks"]
    state["updateformer.extra_head.weight"] = torch.ones(2)
    with pytest.raises(CheckpointError) as info:
        check_state_dict(CoTrackerThreeOffline(), state, "my.pth")
    message = str(info.value)
    assert "my.pth" in message
    assert "2 missing key(s): ['corr_mlp.fc1.bias', 'updateformer.virual_tracks']" in message
    assert "1 unexpected key(s): ['updateformer.extra_head.weight']" in message


def test_wrong_shape_is_listed(saved, tmp_path):
    # An online checkpoint's time_emb has 16 rows: loading it into the offline model is a shape error.
    online = CoTrackerThreeOnline().state_dict()
    path = tmp_path / "online.pth"
    torch.save(online, path)
    with pytest.raises(CheckpointError, match=r"time_emb: checkpoint \(1, 16, 1110\) vs model \(1, 60, 1110\)"):
        build_cotracker3("offline", path)
    model = build_cotracker3("online", path)  # and it is the right file for the online model
    assert model.time_emb.shape == (1, 16, 1110)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="expected a state_dict"):
        read_state_dict(path)
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        read_state_dict(path)


def test_official_names_resolve_to_release_urls():
    assert resolve_checkpoint_source("official", "offline") == OFFICIAL_CHECKPOINT_URLS["scaled_offline"]
    online = resolve_checkpoint_source("official", "online")
    assert online == "https://huggingface.co/facebook/cotracker3/resolve/main/scaled_online.pth"
    assert resolve_checkpoint_source("baseline_online") == OFFICIAL_CHECKPOINT_URLS["baseline_online"]
    assert resolve_checkpoint_source("/a/b.pth") == "/a/b.pth"


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown CoTracker3 variant"):
        build_cotracker3("bidirectional")
