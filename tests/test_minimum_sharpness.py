"""Minimum sharpness: invariance under function-preserving rescalings of ReLU
networks, checked with exact float64 Hessian diagonals; the convex solver
against the closed form and an independent re-implementation of the paper's
per-layer problem."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.optimize
import torch
from test_hessian_helpers import (
    DT,
    assert_unchanged,
    classification_batches,
    dense_hessian,
    mlp,
    snapshot,
)
from torch import nn

from flatness import hessian
from flatness._minimum import minimize_rescaled_trace


def relu_mlp(bias: bool = True) -> nn.Module:
    return mlp(seed=1, sizes=(4, 6, 5, 3), act=nn.ReLU, bias=bias)


def relu_cnn() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16, 3),
    ).to(DT)


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@torch.no_grad()
def rescale_neurons(model: nn.Module, log_scales: list[torch.Tensor]) -> nn.Module:
    """Multiply hidden unit k of layer l by c = exp(g) (incoming weights and
    bias) and divide the weights leaving it by c: the function is unchanged."""
    model = copy.deepcopy(model)
    layers = _layers(model)
    for l, g in enumerate(log_scales):
        c = torch.exp(g).to(DT)
        m, nxt = layers[l], layers[l + 1]
        m.weight.mul_(c.reshape((-1,) + (1,) * (m.weight.dim() - 1)))
        if m.bias is not None:
            m.bias.mul_(c)
        r = nxt.weight.shape[1] // c.numel()
        cin = c.repeat_interleave(r)
        nxt.weight.div_(cin.reshape((1, -1) + (1,) * (nxt.weight.dim() - 2)))
    return model


def _dense_blocks(model: nn.Module, batches) -> tuple[list[torch.Tensor], list[torch.Tensor | None], float]:
    """D_l (units x previous units) and E_l from the dense Hessian diagonal."""
    diag = torch.diagonal(dense_hessian(model, batches))
    layers = _layers(model)
    blocks, biases, i = [], [], 0
    offsets = {}
    for p in model.parameters():
        offsets[id(p)] = (i, p)
        i += p.numel()
    for l, m in enumerate(layers):
        start, w = offsets[id(m.weight)]
        d = diag[start : start + w.numel()].reshape(w.shape[0], w.shape[1], -1).sum(-1)
        if l > 0:
            d = d.reshape(d.shape[0], layers[l - 1].weight.shape[0], -1).sum(-1)
        blocks.append(d)
        if m.bias is None:
            biases.append(None)
        else:
            s, b = offsets[id(m.bias)]
            biases.append(diag[s : s + b.numel()])
    return blocks, biases, float(diag.sum())


def _random_scales(model: nn.Module, seed: int, per_layer: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in _layers(model)[:-1]:
        size = 1 if per_layer else m.weight.shape[0]
        out.append((torch.rand(size, generator=g, dtype=DT) * 3 - 1.5).expand(m.weight.shape[0]).clone())
    return out


@pytest.mark.parametrize("make, shape", [(relu_mlp, (4,)), (relu_cnn, (1, 8, 8))])
def test_minimum_sharpness_invariant_under_rescaling_trace_is_not(make, shape):
    model = make()
    batches = classification_batches((6, 4), shape, 3)
    base = {
        gr: hessian.minimum_sharpness(model, batches, granularity=gr, method="exact", batch=64)
        for gr in ("layer", "neuron")
    }
    blocks, biases, trace0 = _dense_blocks(model, batches)
    # our exact diagonal is the dense one; the values follow from it
    assert base["layer"].trace == pytest.approx(trace0, rel=1e-10)
    for gr in ("layer", "neuron"):
        value, _ = minimize_rescaled_trace(blocks, biases, granularity=gr)
        assert base[gr].value == pytest.approx(value, rel=1e-9)
    assert base["neuron"].value <= base["layer"].value * (1 + 1e-9) <= trace0 * (1 + 1e-9)

    # layer-wise rescaling: both minima unchanged, the plain trace changes
    scaled = rescale_neurons(model, _random_scales(model, 0, per_layer=True))
    x = batches[0][0]
    assert torch.allclose(scaled(x), model(x), atol=1e-12)
    blocks_s, biases_s, trace_s = _dense_blocks(scaled, batches)
    assert abs(trace_s - trace0) > 0.1 * trace0
    for gr in ("layer", "neuron"):
        value, _ = minimize_rescaled_trace(blocks_s, biases_s, granularity=gr)
        assert value == pytest.approx(base[gr].value, rel=1e-8)
    ours = hessian.minimum_sharpness(scaled, batches, method="exact", batch=64)
    assert ours.value == pytest.approx(base["layer"].value, rel=1e-8)
    assert ours.trace == pytest.approx(trace_s, rel=1e-10)

    # neuron-wise rescaling: the per-neuron minimum is unchanged, the
    # per-layer one is not (it minimizes over fewer rescalings)
    scaled = rescale_neurons(model, _random_scales(model, 1))
    assert torch.allclose(scaled(x), model(x), atol=1e-12)
    blocks_n, biases_n, trace_n = _dense_blocks(scaled, batches)
    assert abs(trace_n - trace0) > 0.1 * trace0
    neuron, _ = minimize_rescaled_trace(blocks_n, biases_n, granularity="neuron")
    layer, _ = minimize_rescaled_trace(blocks_n, biases_n, granularity="layer")
    assert neuron == pytest.approx(base["neuron"].value, rel=1e-8)
    assert abs(layer - base["layer"].value) > 1e-3 * base["layer"].value


def test_optimal_rescaling_attains_the_minimum():
    model = relu_mlp()
    batches = classification_batches((10,), (4,), 3)
    r = hessian.minimum_sharpness(model, batches, granularity="neuron", method="exact")
    # apply the optimal log-scales: the plain trace of that network is MS
    best = rescale_neurons(model, [torch.tensor(g, dtype=DT) for g in r.log_scales])
    t = hessian.trace(best, batches, method="exact").value
    assert t == pytest.approx(r.value, rel=1e-7)


def test_closed_form_without_biases_matches_direct_minimization():
    model = relu_mlp(bias=False)
    batches = classification_batches((9,), (4,), 3)
    r = hessian.minimum_sharpness(model, batches, method="exact")
    T = np.array(r.layer_traces)
    L = len(T)
    assert r.value == pytest.approx(L * np.prod(T) ** (1 / L), rel=1e-12)

    # independent: minimize sum_l T_l / a_l^2 over a_1..a_{L-1}, a_L = 1/prod
    def f(s):
        a = np.exp(np.append(s, -s.sum()))
        return float((T / a**2).sum())

    opt = scipy.optimize.minimize(f, np.zeros(L - 1), method="Nelder-Mead", options={"xatol": 1e-12, "fatol": 1e-15, "maxiter": 20000})
    assert r.value == pytest.approx(opt.fun, rel=1e-8)


def test_per_layer_with_biases_matches_the_papers_formulation():
    # The authors' per-layer problem: weights of layer l scale by a_l, the
    # bias of layer l by prod_{k<=l} a_k, prod_l a_l = 1.
    model = relu_mlp()
    batches = classification_batches((9,), (4,), 3)
    r = hessian.minimum_sharpness(model, batches, method="exact")
    W, B = np.array(r.layer_traces), np.array(r.bias_traces)
    L = len(W)

    def f(s):
        a = np.exp(np.append(s, -s.sum()))
        cum = np.cumprod(a)
        return float((W / a**2).sum() + (B / cum**2).sum())

    opt = scipy.optimize.minimize(f, np.zeros(L - 1), method="Nelder-Mead", options={"xatol": 1e-12, "fatol": 1e-15, "maxiter": 20000})
    assert r.value == pytest.approx(opt.fun, rel=1e-8)
    assert r.value < f(np.zeros(L - 1))  # the rescaling helps


def test_hutchinson_estimate_and_restore():
    model = relu_mlp()
    model.train()
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    batches = classification_batches((8, 8), (4,), 3)
    snap = snapshot(model)
    state = torch.get_rng_state()
    exact = hessian.minimum_sharpness(model, batches, method="exact")
    est = hessian.minimum_sharpness(model, batches, n_samples=200, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert_unchanged(model, snap)
    assert abs(est.trace - exact.trace) <= 4 * est.trace_std_error
    assert est.value == pytest.approx(exact.value, rel=0.2)
    # per neuron the blocks are small and noisy; the value stays unbiased
    neuron = hessian.minimum_sharpness(model, batches, granularity="neuron", method="exact").value
    noisy = [hessian.minimum_sharpness(model, batches, granularity="neuron", n_samples=100, seed=s).value
             for s in range(4)]
    assert abs(sum(noisy) / 4 - neuron) <= 3 * float(torch.tensor(noisy).std()) / 2
    assert est.n_hvp == 200
    assert hessian.minimum_sharpness(model, batches, n_samples=20, seed=5).value == hessian.minimum_sharpness(
        model, batches, n_samples=20, seed=5
    ).value


def test_rejects_models_without_the_symmetry_and_bad_arguments():
    batches = classification_batches((6,), (4,), 3)
    tanh = mlp(seed=1, sizes=(4, 6, 3), act=nn.Tanh)
    snap = snapshot(tanh)
    with pytest.raises(ValueError, match="outputs change"):
        hessian.minimum_sharpness(tanh, batches)
    assert_unchanged(tanh, snap)
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(DT).eval()
    bn[1].running_mean.fill_(0.5)  # (fresh statistics would make BN linear, hence invariant)
    with pytest.raises(ValueError, match="outputs change"):
        hessian.minimum_sharpness(bn, batches)
    model = relu_mlp()
    layers = _layers(model)
    with pytest.raises(ValueError, match="forward order"):
        hessian.minimum_sharpness(model, batches, layers=layers[::-1])
    with pytest.raises(ValueError, match="params"):
        hessian.minimum_sharpness(model, batches, params=[layers[0]])
    with pytest.raises(ValueError, match="granularity"):
        hessian.minimum_sharpness(model, batches, granularity="channel")
    with pytest.raises(ValueError, match="method"):
        hessian.minimum_sharpness(model, batches, method="dense")
    grouped = nn.Sequential(nn.Conv2d(2, 2, 1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(2, 3)).to(DT)
    with pytest.raises(ValueError, match="grouped"):
        hessian.minimum_sharpness(grouped, (torch.randn(3, 2, 1, 1, dtype=DT), torch.zeros(3, dtype=torch.long)))


def test_single_layer_and_negative_curvature_warning():
    lin = mlp(sizes=(4, 3))
    batches = classification_batches((6,), (4,), 3)
    r = hessian.minimum_sharpness(lin, batches, method="exact")
    assert r.value == pytest.approx(r.trace, rel=1e-12)
    value, g = minimize_rescaled_trace([torch.tensor([[-1.0, 2.0]]), torch.tensor([[3.0]])], [None, None],
                                       granularity="neuron")
    # the scale minimizes the sum with the negative entry set to 0,
    # 2/c^2 + 3 c^2 (c^2 = sqrt(2/3)); the value is the signed sum there
    c2 = math.sqrt(2 / 3)
    assert g[0].item() == pytest.approx(0.5 * math.log(c2), rel=1e-6)
    assert value == pytest.approx((2 - 1) / c2 + 3 * c2, rel=1e-9)
