"""The reference vectors' weight fills (README_vectors.md §2), shared by the CoTracker3 tests, and checks of the
model's construction against the reference files (state_dict layout, default time embedding, fill checksums)."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from conftest import reference_path

from trackmae_stream.tracking.cotracker3 import CoTrackerThreeOffline, CoTrackerThreeOnline

torch.set_num_threads(2)

_U64 = np.uint64


def splitmix_uniform(index: int, count: int) -> np.ndarray:
    """u in [0, 1) from splitmix64 of (index << 32) + arange(count), wrap-around uint64 arithmetic."""
    x = (_U64(index) << _U64(32)) + np.arange(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        z = z ^ (z >> _U64(31))
    return (z >> _U64(11)).astype(np.float64) * 2.0 ** -53


def fill_value(kind: str, index: int, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """Tensor number `index` (in sorted key order) of the "sin" or "hash" fill, float32 with `shape`."""
    count = int(np.prod(shape))
    if kind == "sin":
        values = 0.05 * np.sin(0.7 * np.arange(count, dtype=np.float64) + 0.3 * index)
    elif kind == "hash":
        u = splitmix_uniform(index, count)
        if key.endswith("norm_context.weight"):
            values = 1 + 0.2 * (u - 0.5)
        elif len(shape) == 1:
            values = 0.2 * (u - 0.5)
        elif len(shape) == 2:
            values = (2 * u - 1) * np.sqrt(3 / shape[1])
        elif len(shape) == 4 and key.startswith("fnet."):
            values = (2 * u - 1) * np.sqrt(3 / (shape[1] * shape[2] * shape[3]))
        else:
            values = 2 * u - 1
    else:
        raise ValueError(f"unknown fill {kind!r}")
    return values.astype(np.float32).reshape(shape)


@functools.cache
def _filled_tensors(kind: str, layout: tuple[tuple[str, tuple[int, ...]], ...]) -> dict[str, torch.Tensor]:
    # Cached per (fill, state_dict layout): the splitmix fill of 25 M values takes ~1 s, and many tests need it.
    return {key: torch.from_numpy(fill_value(kind, k, key, shape)) for k, (key, shape) in enumerate(sorted(layout))}


def fill_state_dict(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """Overwrite every tensor of model.state_dict() with the fill formula (strict load); returns the model."""
    layout = tuple((key, tuple(value.shape)) for key, value in model.state_dict().items())
    model.load_state_dict(_filled_tensors(kind, layout), strict=True)
    return model


def filled_model(kind: str, variant: str = "offline") -> torch.nn.Module:
    cls = CoTrackerThreeOffline if variant == "offline" else CoTrackerThreeOnline
    return fill_state_dict(cls(), kind).eval()


VECTOR_FILLS = {"vector_a.npz": ("sin", "offline"), "vector_c.npz": ("hash", "offline"),
                "vector_online.npz": ("sin", "online")}


@pytest.mark.parametrize("name", sorted(VECTOR_FILLS))
def test_fill_matches_reference_checksums(name):
    data = np.load(reference_path(f"cotracker3/{name}"))
    kind, variant = VECTOR_FILLS[name]
    model = filled_model(kind, variant)
    state = model.state_dict()
    keys = sorted(state)
    assert keys == [str(k) for k in data["fill_keys_sorted"]]
    sums = np.array([[state[k].double().sum().item(), state[k].double().abs().sum().item()] for k in keys])
    np.testing.assert_allclose(sums, data["fill_sum_and_abssum"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("cls,file", [(CoTrackerThreeOffline, "offline_state_dict_shapes.json"),
                                      (CoTrackerThreeOnline, "online_state_dict_shapes.json")])
def test_state_dict_layout_equals_official(cls, file):
    spec = json.loads(reference_path(f"cotracker3/{file}").read_text())
    model = cls()
    state = model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == {e["key"]: e["shape"] for e in spec["entries"]}
    assert all(v.dtype == torch.float32 for v in state.values())
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters"]
    assert model.time_emb.numel() == spec["num_buffer_elements"]
    for key, value in spec["constructor"].items():
        got = getattr(model, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_default_time_embedding_equals_reference():
    data = np.load(reference_path("cotracker3/vector_a.npz"))
    np.testing.assert_array_equal(CoTrackerThreeOffline().time_emb.numpy(), data["time_emb_default_window60"])


def test_time_embedding_is_independent_float64_sincos():
    # Independent of the reference files: the formula of SPEC.md §2 step 4, evaluated here in float64.
    table = CoTrackerThreeOnline().time_emb[0].double()
    pos = torch.arange(16, dtype=torch.float64)[:, None]
    omega = 10000.0 ** (-torch.arange(555, dtype=torch.float64) / 555)
    expected = torch.cat([torch.sin(pos * omega), torch.cos(pos * omega)], dim=1)
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-7)
