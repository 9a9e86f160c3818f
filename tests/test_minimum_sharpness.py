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
import torch.nn.functional as F
from cases import (
    DT,
    assert_unchanged,
    classification_batches,
    dense_hessian,
    mlp,
    snapshot,
)
from torch import nn

import flatness
from flatness import hessian
from flatness._rescaling import minimize_rescaled_trace


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
    est = hessian.minimum_sharpness(model, batches, method="hutchinson", n_samples=200, seed=0, batch=300)
    assert torch.equal(torch.get_rng_state(), state)
    assert_unchanged(model, snap)
    assert abs(est.trace - exact.trace) <= 4 * est.trace_std_error
    for t, e, se in zip(est.layer_traces, exact.layer_traces, est.layer_std_errors):
        assert se > 0 and abs(t - e) <= 4 * se
    assert est.value == pytest.approx(exact.value, rel=0.2)
    assert est.n_hvp == 200 * 6  # one probe per parameter tensor
    assert hessian.minimum_sharpness(model, batches, method="hutchinson", n_samples=20, seed=5).value == \
        hessian.minimum_sharpness(model, batches, method="hutchinson", n_samples=20, seed=5).value


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
    with pytest.raises(ValueError, match=r"outside such a chain .*1 \(BatchNorm1d\): weight, bias"):
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


@pytest.mark.parametrize("method", ["gn", "exact", "hutchinson"])
def test_non_finite_data_is_reported_as_such_not_as_a_broken_symmetry(method):
    """A NaN in the first batch makes the outputs NaN: the error says the
    outputs are not finite, instead of blaming the architecture for a
    rescaling that changed them by "nan"."""
    model = relu_mlp()
    x, y = classification_batches((6,), (4,), 3)[0]
    x = x.clone()
    x[2, 1] = float("nan")
    snap = snapshot(model)
    for run in (lambda: hessian.minimum_sharpness(model, (x, y), method=method),
                lambda: flatness.sharpness(model, (x, y), kind="minimum", method=method)):
        with pytest.raises(flatness.NonFiniteLossError, match="not finite") as info:
            run()
        assert "rescaling" not in str(info.value)
    assert_unchanged(model, snap)


def test_layer_order_error_names_both_layers():
    """Layers out of forward order: the message gives both layers' indices
    and names (the second index was once printed as a literal
    ``{i - 1}``)."""
    model = relu_mlp()
    with pytest.raises(ValueError) as err:
        hessian.minimum_sharpness(model, classification_batches((6,), (4,), 3), layers=_layers(model)[::-1])
    assert str(err.value).startswith(
        "layer 2, 0 (Linear), takes 4 inputs, which do not map onto the 5 units of layer 1, 2 (Linear); "
        "layers= must list the Linear/Conv layers in forward order"
    )


def test_single_layer_and_negative_curvature_warning():
    lin = mlp(sizes=(4, 3))
    batches = classification_batches((6,), (4,), 3)
    for method in ("exact", "gn"):
        r = hessian.minimum_sharpness(lin, batches, method=method)
        assert r.value == pytest.approx(r.trace, rel=1e-12)
    value, g = minimize_rescaled_trace([torch.tensor([[-1.0, 2.0]]), torch.tensor([[3.0]])], [None, None],
                                       granularity="neuron")
    # the scale minimizes the sum with the negative entry set to 0,
    # 2/c^2 + 3 c^2 (c^2 = sqrt(2/3)); the value is the signed sum there
    c2 = math.sqrt(2 / 3)
    assert g[0].item() == pytest.approx(0.5 * math.log(c2), rel=1e-6)
    assert value == pytest.approx((2 - 1) / c2 + 3 * c2, rel=1e-9)


# --------------------------------------------------------------------------
# the exact default: Gauss-Newton diagonal of a piecewise-linear network
# --------------------------------------------------------------------------


def _tensor_traces(model: nn.Module, batches, loss_fn=F.cross_entropy) -> list[float]:
    """Trace of every parameter tensor's block of the dense Hessian."""
    diag = torch.diagonal(dense_hessian(model, batches, loss_fn=loss_fn))
    return [float(part.sum()) for part in torch.split(diag, [p.numel() for p in model.parameters()])]


def _ours(r) -> list[float]:
    out = []
    for w, b in zip(r.layer_traces, r.bias_traces):
        out += [w] + ([] if b is None else [b])
    return out


def _mse(z, y):
    return F.mse_loss(z, F.one_hot(y, z.shape[1]).to(z.dtype))


def _quartic(z, y):
    # Not convex in the outputs: its Hessian there has both signs.
    return (torch.sin(z).sum(1) + 0.1 * (z**2).sum(1) - z.gather(1, y[:, None])[:, 0]).mean()


@pytest.mark.parametrize("make, shape", [(lambda: relu_mlp(True), (4,)), (lambda: relu_mlp(False), (4,)),
                                         (relu_cnn, (1, 8, 8))])
@pytest.mark.parametrize("loss_fn", [None, _mse, _quartic])
def test_gn_default_equals_the_dense_hessian_block_traces(make, shape, loss_fn):
    model = make()
    batches = classification_batches((7, 5), shape, 3)
    snap = snapshot(model)
    state = torch.get_rng_state()
    r = hessian.minimum_sharpness(model, batches, loss_fn=loss_fn)
    assert r.method == "gn" and r.n_hvp == 0 and r.n_backward == 12 * 3
    assert_unchanged(model, snap)
    assert torch.equal(torch.get_rng_state(), state)
    dense = _tensor_traces(model, batches, loss_fn=loss_fn or F.cross_entropy)
    assert _ours(r) == pytest.approx(dense, rel=1e-10, abs=1e-13)
    assert r.trace == pytest.approx(sum(dense), rel=1e-10)
    assert all(e == 0 for e in r.layer_std_errors)
    # a DataLoader of uneven batches (size-weighted) and one chunk per sample
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])),
        batch_size=5,
    )
    r2 = hessian.minimum_sharpness(model, loader, loss_fn=loss_fn, chunk_size=1)
    assert _ours(r2) == pytest.approx(dense, rel=1e-10, abs=1e-13)
    assert r2.value == pytest.approx(r.value, rel=1e-10)


def test_gn_through_the_sharpness_front_door():
    import flatness

    model = relu_mlp()
    batches = classification_batches((9,), (4,), 3)
    s = flatness.sharpness(model, batches, kind="minimum")
    r = hessian.minimum_sharpness(model, batches, method="exact")
    assert s.settings["method"] == "gn"
    assert s.value == pytest.approx(r.value, rel=1e-10)
    assert s.settings["trace"] == pytest.approx(r.trace, rel=1e-10)


@torch.no_grad()
def _scale_layer(model: nn.Module, a: float) -> nn.Module:
    """Layer 1 (weights and bias) times a, layer 2's weights over a."""
    model = copy.deepcopy(model)
    layers = _layers(model)
    layers[0].weight.mul_(a)
    if layers[0].bias is not None:
        layers[0].bias.mul_(a)
    layers[1].weight.div_(a)
    return model


@torch.no_grad()
def _scale_neuron(model: nn.Module, a: float, layer: int = 1, unit: int = 2) -> nn.Module:
    """One hidden unit times a, the weights leaving it over a."""
    model = copy.deepcopy(model)
    layers = _layers(model)
    layers[layer].weight[unit].mul_(a)
    if layers[layer].bias is not None:
        layers[layer].bias[unit].mul_(a)
    layers[layer + 1].weight[:, unit].div_(a)
    return model


def _reference(model: nn.Module, batches, granularity: str) -> float:
    """Dense-Hessian block traces, then SciPy over the log-scales: an
    implementation of the definition that shares no code with the library."""
    diag = torch.diagonal(dense_hessian(model, batches)).numpy()
    layers = _layers(model)
    offsets, i = {}, 0
    for p in model.parameters():
        offsets[id(p)] = i
        i += p.numel()
    terms = []  # (coefficient, layer, unit k, previous unit j or None for a bias)
    for l, m in enumerate(layers):
        w = m.weight
        o = offsets[id(w)]
        W = diag[o:o + w.numel()].reshape(w.shape[0], w.shape[1])
        for k in range(w.shape[0]):
            for j in range(w.shape[1]):
                terms.append((W[k, j], l, k, j))
        if m.bias is not None:
            o = offsets[id(m.bias)]
            for k in range(w.shape[0]):
                terms.append((diag[o + k], l, k, None))
    hidden = [m.weight.shape[0] for m in layers[:-1]]
    L = len(layers)

    def logc(g, l, k):  # log-scale of unit k of layer l (inputs and outputs: 0)
        if l < 0 or l == L - 1:
            return 0.0
        if granularity == "layer":
            return g[l]
        return g[sum(hidden[:l]) + k]

    def f(g):
        total = 0.0
        for c, l, k, j in terms:
            e = -2 * logc(g, l, k) + (0.0 if j is None else 2 * logc(g, l - 1, j))
            total += c * np.exp(e)
        return total

    n = L - 1 if granularity == "layer" else sum(hidden)
    best = scipy.optimize.minimize(f, np.zeros(n), method="BFGS", options={"gtol": 1e-13, "maxiter": 10000})
    return float(best.fun)


@pytest.mark.parametrize("bias", [True, False])
def test_default_equals_a_dense_hessian_scipy_minimisation(bias):
    model = relu_mlp(bias)
    batches = classification_batches((6, 5), (4,), 3)
    for gr in ("layer", "neuron"):
        ours = hessian.minimum_sharpness(model, batches, granularity=gr).value
        assert ours == pytest.approx(_reference(model, batches, gr), rel=1e-8)


@pytest.mark.parametrize("bias", [True, False])
def test_default_is_invariant_under_layer_and_neuron_rescaling(bias):
    model = relu_mlp(bias)
    batches = classification_batches((6, 5), (4,), 3)
    x = batches[0][0]
    base = {gr: hessian.minimum_sharpness(model, batches, granularity=gr).value for gr in ("layer", "neuron")}
    trace = hessian.minimum_sharpness(model, batches).trace
    for a in (0.01, 0.1, 3.0, 10.0, 100.0):
        scaled = _scale_layer(model, a)
        assert torch.allclose(scaled(x), model(x), rtol=1e-12, atol=1e-12)
        r = hessian.minimum_sharpness(scaled, batches)
        assert abs(r.trace - trace) > 0.05 * trace  # the plain trace moves
        assert r.value == pytest.approx(base["layer"], rel=1e-8)
        assert hessian.minimum_sharpness(scaled, batches, granularity="neuron").value == pytest.approx(
            base["neuron"], rel=1e-8)
        one = _scale_neuron(model, a)
        assert torch.allclose(one(x), model(x), rtol=1e-12, atol=1e-12)
        assert hessian.minimum_sharpness(one, batches, granularity="neuron").value == pytest.approx(
            base["neuron"], rel=1e-8)


def test_gn_is_faster_than_unit_vector_products_and_counts_its_passes():
    model = mlp(seed=0, sizes=(8, 16, 16, 4), act=nn.ReLU)
    batches = classification_batches((32, 32), (8,), 4)
    r = hessian.minimum_sharpness(model, batches)
    e = hessian.minimum_sharpness(model, batches, method="exact", batch=64)
    assert r.value == pytest.approx(e.value, rel=1e-10)
    assert r.n_backward == 64 * 4 and e.n_hvp == sum(p.numel() for p in model.parameters())


def test_gn_refuses_what_it_cannot_do_before_changing_anything():
    class PairNorm(nn.Module):
        # sqrt(h_k^2 + h_{k-1}^2): positively homogeneous, so a layer-wise
        # rescaling leaves the network's function unchanged, but smooth: the
        # network is not linear in the first layer's weights.
        def forward(self, h):
            return torch.sqrt(h**2 + h.roll(1, -1) ** 2)

    torch.manual_seed(0)
    smooth = nn.Sequential(nn.Linear(4, 6), PairNorm(), nn.Linear(6, 3)).to(DT)
    batches = classification_batches((6,), (4,), 3)
    snap = snapshot(smooth)
    with pytest.raises(ValueError, match="linear in each layer"):
        hessian.minimum_sharpness(smooth, batches)
    assert_unchanged(smooth, snap)
    assert hessian.minimum_sharpness(smooth, batches, method="exact").value > 0  # the exact method works
    # affine=False: no parameters outside the chain, only batch statistics
    bn = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3, affine=False)).to(DT)
    with pytest.raises(ValueError, match="statistics of the batch"):
        hessian.minimum_sharpness(bn, classification_batches((6,), (4,), 3), train=True)

    batches = classification_batches((6,), (4,), 3)

    model = relu_mlp()
    snap = snapshot(model)

    def coupled(z, y):  # not a mean of per-sample losses
        return F.cross_entropy(z, y) * z.shape[0] ** 0.5

    with pytest.raises(ValueError, match="per-sample loss"):
        hessian.minimum_sharpness(model, batches, loss_fn=coupled)
    with pytest.raises(ValueError, match="method"):
        hessian.minimum_sharpness(model, batches, method="ggn")
    assert_unchanged(model, snap)
    # a sum over samples is fine: the Hessian of the summed loss
    one = [batches[0]]
    r = hessian.minimum_sharpness(model, one, loss_fn=lambda z, y: F.cross_entropy(z, y, reduction="sum"))
    assert r.trace == pytest.approx(6 * hessian.minimum_sharpness(model, one).trace, rel=1e-10)


# --------------------------------------------------------------------------
# Hutchinson, the option: safe and, per layer, invariant for a fixed seed
# --------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Hutchinson's estimates:RuntimeWarning")
def test_hutchinson_is_never_non_finite_nor_negative_over_50_seeds():
    # The case that used to give -inf: a bias-free ReLU MLP with its layers
    # rescaled far apart; few probes.
    model = relu_mlp(bias=False)
    batches = classification_batches((6, 5), (4,), 3)
    scaled = _scale_layer(model, 100.0)
    for seed in range(50):
        r = hessian.minimum_sharpness(scaled, batches, method="hutchinson", n_samples=4, seed=seed)
        assert math.isfinite(r.value) and r.value >= 0
        assert all(math.isfinite(t) and t >= 0 for t in r.layer_traces)  # PSD blocks
        assert all(math.isfinite(e) for e in r.layer_std_errors)
    # same probes: the per-layer value does not see a layer rescaling
    for a in (0.01, 100.0):
        for seed in range(3):
            same = [hessian.minimum_sharpness(m, batches, method="hutchinson", n_samples=4, seed=seed).value
                    for m in (model, _scale_layer(model, a))]
            assert same[1] == pytest.approx(same[0], rel=1e-10)
    # with enough probes it is close to the exact value
    many = hessian.minimum_sharpness(model, batches, method="hutchinson", n_samples=400, seed=0, batch=300)
    assert many.value == pytest.approx(hessian.minimum_sharpness(model, batches).value, rel=0.1)


def test_hutchinson_standard_errors_match_the_spread_over_seeds():
    model = relu_mlp()
    batches = classification_batches((6, 5), (4,), 3)
    runs = [hessian.minimum_sharpness(model, batches, method="hutchinson", n_samples=24, seed=s, batch=150) for s in range(24)]
    for l in range(3):
        spread = float(np.std([r.layer_traces[l] for r in runs], ddof=1))
        se = float(np.mean([r.layer_std_errors[l] for r in runs]))
        assert 0.5 < se / spread < 2.0
        # the biases' standard errors, likewise
        spread = float(np.std([r.bias_traces[l] for r in runs], ddof=1))
        se = float(np.mean([r.bias_std_errors[l] for r in runs]))
        assert 0.5 < se / spread < 2.0
    # the whole trace's, too
    spread = float(np.std([r.trace for r in runs], ddof=1))
    assert 0.5 < float(np.mean([r.trace_std_error for r in runs])) / spread < 2.0


def test_hutchinson_refuses_a_non_positive_layer_trace_and_warns_near_zero():
    from flatness._diagonal import _check_estimates

    model = relu_mlp()
    batches = classification_batches((6,), (4,), 3)
    snap = snapshot(model)

    def concave(z, y):  # negative definite in the outputs: every block trace < 0
        return -F.cross_entropy(z, y)

    with pytest.raises(ValueError, match=r"not positive.*\+-"):
        hessian.minimum_sharpness(model, batches, loss_fn=concave, method="hutchinson", n_samples=10)
    assert_unchanged(model, snap)
    with pytest.warns(RuntimeWarning, match=r"layer 1 weights: 0\.1 \+- 0\.08"):
        _check_estimates([1.0, 0.1], [0.1, 0.08], [None, None], [None, None], 10)
    with pytest.warns(RuntimeWarning, match="layer 0 bias"):
        _check_estimates([1.0, 1.0], [0.1, 0.1], [-0.01, None], [0.1, None], 10)
    with pytest.raises(ValueError, match="layer 1: -0.1"):
        _check_estimates([1.0, -0.1], [0.1, 0.08], [None, None], [None, None], 10)


@pytest.mark.parametrize("method", ["gn", "exact"])
def test_works_under_the_callers_no_grad_and_inference_mode(method):
    # The measure differentiates internally; the caller's grad mode (for its
    # own evaluation code) must not change the result nor make it fail.
    model = relu_mlp()
    batches = classification_batches((6,), (4,), 3)
    snap = snapshot(model)
    want = hessian.minimum_sharpness(model, batches, method=method)
    with torch.no_grad():
        quiet = hessian.minimum_sharpness(model, batches, method=method)
    with torch.inference_mode():
        inference = hessian.minimum_sharpness(model, batches, method=method)
        inference_kind = flatness.sharpness(model, batches, kind="minimum", method=method)
    for r in (quiet, inference):
        assert r.value == want.value and r.layer_traces == want.layer_traces
    assert inference_kind.value == want.value
    assert_unchanged(model, snap)


@pytest.mark.parametrize("method", ["gn", "exact", "hutchinson"])
@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, "2", True])
def test_chunk_size_must_be_a_positive_int_up_front(method, chunk_size):
    model = relu_mlp()
    batches = classification_batches((6,), (4,), 3)
    snap = snapshot(model)
    with pytest.raises((ValueError, TypeError), match="chunk_size"):
        hessian.minimum_sharpness(model, batches, method=method, chunk_size=chunk_size)
    with pytest.raises((ValueError, TypeError), match="chunk_size"):
        flatness.sharpness(model, batches, kind="minimum", method=method, chunk_size=chunk_size)
    assert_unchanged(model, snap)
