"""The linear probe's classifier on known answers (separable clusters, the optimum's stationarity)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trackmae_stream.probe import fit_linear_probe


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
