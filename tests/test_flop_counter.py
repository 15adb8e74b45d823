"""The op counter against FLOPs written out by hand for each kind of op, at odd sizes.

The formulas in the tests are independent of the counter's: they count multiply-adds from the layer's definition
(output elements x reduction length), not from the tensors the dispatcher sees.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trackmae_stream.flop_counter import OpFlopCounter


def count(fn) -> OpFlopCounter:
    with OpFlopCounter() as counter, torch.no_grad():
        fn()
    return counter


def test_linear_on_3d_input_and_einsum():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=gen)
    layer = torch.nn.Linear(5, 11)
    counter = count(lambda: layer(x))
    assert counter.total == 2 * 3 * 7 * 5 * 11 and not counter.unknown
    a, b = torch.randn(4, 6, 9, generator=gen), torch.randn(4, 9, 13, generator=gen)
    assert count(lambda: torch.einsum("bij,bjk->bik", a, b)).total == 2 * 4 * 6 * 9 * 13
    assert count(lambda: a @ b).total == 2 * 4 * 6 * 9 * 13
    v = torch.randn(9, generator=gen)
    assert count(lambda: a[0] @ v).total == 2 * 6 * 9
    assert count(lambda: v @ v).total == 2 * 9


@pytest.mark.parametrize("groups,stride,padding", [(1, 1, 0), (3, 2, 1)])
def test_conv2d_and_conv3d(groups, stride, padding):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 13, 11, generator=gen)
    conv = torch.nn.Conv2d(6, 9, kernel_size=(3, 5), stride=stride, padding=padding, groups=groups)
    out = conv(x)
    expected = 2 * out.numel() * (6 // groups) * 3 * 5
    assert count(lambda: conv(x)).total == expected
    x3 = torch.randn(1, 3, 6, 10, 14, generator=gen)
    conv3 = torch.nn.Conv3d(3, 5, kernel_size=(2, 4, 4), stride=(2, 4, 4))
    assert count(lambda: conv3(x3)).total == 2 * (5 * 3 * 2 * 3) * 3 * 2 * 4 * 4


def test_transposed_conv_counts_each_input_scatter():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 5, 7, generator=gen)
    deconv = torch.nn.ConvTranspose2d(4, 6, kernel_size=3, stride=2, groups=2)
    # Every input element is multiplied into (6 / 2) output channels x 3 x 3 kernel taps.
    assert count(lambda: deconv(x)).total == 2 * x.numel() * 3 * 3 * 3


@pytest.mark.parametrize("lq,lk,dqk,dv", [(7, 7, 8, 8), (5, 11, 6, 10)])
def test_attention_kernel_and_math_path_agree(lq, lk, dqk, dv):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, lq, dqk, generator=gen)
    k = torch.randn(2, 3, lk, dqk, generator=gen)
    v = torch.randn(2, 3, lk, dv, generator=gen)
    expected = 2 * 2 * 3 * lq * lk * (dqk + dv)
    fused = count(lambda: F.scaled_dot_product_attention(q, k, v))
    assert fused.total == expected and not fused.unknown
    math_path = count(lambda: torch.softmax(q @ k.transpose(-1, -2) * dqk ** -0.5, -1) @ v)
    assert math_path.total == expected


def test_product_without_formula_is_reported_not_dropped():
    gen = torch.Generator().manual_seed(4)
    bias = torch.randn(3, 5, generator=gen)
    a, b = torch.randn(4, 3, 7, generator=gen), torch.randn(4, 7, 5, generator=gen)
    counter = count(lambda: torch.addbmm(bias, a, b))
    assert counter.unknown["addbmm"] == 1 and counter.total == 0
    # Sampling is not product work even though its name says "linear".
    img = torch.randn(1, 2, 5, 6, generator=gen)
    sampled = count(lambda: F.interpolate(img, scale_factor=2, mode="bilinear"))
    assert not sampled.unknown and sampled.total == 0
