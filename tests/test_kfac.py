"""kfac_variance (flatness._kfac + flatness.nonuniformity) against exact
per-sample gradient variance where the Kronecker factorization is exact, and
against curvlinops' KFAC factors."""

from __future__ import annotations

import cases
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatness import nonuniformity as nu
from flatness._kfac import _positions, factors, plan, trace_terms
from flatness._params import select_params


@pytest.fixture(autouse=True)
def _float64():
    # float64 for the 1e-10 comparisons; restored so other test modules are unaffected
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _mlp(seed=0):
    return cases.mlp(seed, (5, 7, 3), dtype=torch.get_default_dtype())


def _cnn(seed=1, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2), nn.Flatten(), nn.Linear(27, 4)]
    net = nn.Sequential(*layers)
    if bn:
        with torch.no_grad():
            net[1].running_mean.uniform_(-0.5, 0.5)
            net[1].running_var.uniform_(0.5, 2.0)
            net[1].weight.uniform_(0.5, 1.5)
    return net


def _data(n, shape, classes, seed=2):
    return cases.classification_batch(n, shape, classes, seed, dtype=torch.get_default_dtype())


def _singletons(x, y):
    return [(x[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])]


def _close(a, b, tol=1e-10):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=tol, abs=tol), k


def test_mlp_one_sample_per_batch_is_exact():
    # T = 1 and one sample: g = e a~^T exactly, so ||g||^2 = tr(a~a~^T) tr(ee^T).
    model = _mlp()
    x, y = _data(20, (5,), 3)
    exact = nu.gradient_variance(model, (x, y), batch_size=4)
    approx = nu.kfac_variance(model, _singletons(x, y), batch_size=4)
    _close(approx.per_layer, exact.per_layer)
    assert approx.total == pytest.approx(exact.total, rel=1e-10)
    assert approx.noise == pytest.approx(exact.noise, rel=1e-10)
    assert approx.mean_grad_sqnorm == pytest.approx(exact.mean_grad_sqnorm, rel=1e-10)
    assert approx.exact_layers == [] and approx.unsupported == []


def test_linear_independent_inputs_and_output_grads_is_exact():
    # A loss linear in the outputs makes e_i = t_i independent of a_i; on the
    # product set {x_j} x {t_k} the empirical E[a a^T (x) e e^T] factorizes
    # exactly, so the pooled factors over one big batch are exact.
    torch.manual_seed(3)
    model = nn.Linear(4, 3)
    gen = torch.Generator().manual_seed(4)
    xs, ts = torch.randn(5, 4, generator=gen), torch.randn(6, 3, generator=gen)
    x = xs.repeat_interleave(len(ts), 0)
    t = ts.repeat(len(xs), 1)

    def linear_loss(out, target):
        return (out * target).sum(1).mean()

    exact = nu.gradient_variance(model, (x, t), loss_fn=linear_loss)
    approx = nu.kfac_variance(model, (x, t), loss_fn=linear_loss)
    assert approx.total == pytest.approx(exact.total, rel=1e-10)
    # ... and a dependent loss on the same data is not (the test can fail)
    dep = lambda out, target: ((out - target) ** 2).sum(1).mean()  # noqa: E731
    e2 = nu.gradient_variance(model, (x, t), loss_fn=dep)
    a2 = nu.kfac_variance(model, (x, t), loss_fn=dep)
    assert abs(a2.total - e2.total) > 1e-6 * e2.total


def test_conv_scaling_exact_for_orthogonal_equal_norm_patches():
    # KFC is exact when a sample's patches are orthogonal with equal norms:
    # ||sum_t e_t a_t^T||^2 = sum_t ||a_t||^2 ||e_t||^2 = (1/T) sum_t ||a_t||^2 * sum_t ||e_t||^2.
    # Kernel 2, stride 2 on 4x4: T = 4 non-overlapping patches, each a
    # one-hot at a different offset.  A wrong power of T fails this test.
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 3, 2, stride=2, bias=False), nn.Tanh(), nn.Flatten())
    n = 6
    x = torch.zeros(n, 1, 4, 4)
    offsets = [(0, 0), (0, 1), (1, 0), (1, 1)]
    gen = torch.Generator().manual_seed(6)
    scale = torch.rand(n, generator=gen) + 0.5
    for t, (bi, bj) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        oi, oj = offsets[t]
        x[:, 0, 2 * bi + oi, 2 * bj + oj] = scale
    y = torch.randint(0, 12, (n,), generator=gen)
    exact = nu.gradient_variance(model, (x, y))
    approx = nu.kfac_variance(model, _singletons(x, y))
    assert approx.per_layer["0"] == pytest.approx(exact.per_layer["0"], rel=1e-10)


def test_conv_single_position_is_exact_with_bias():
    # A kernel covering the whole input: T = 1, like a Linear layer.
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.Flatten(), nn.Tanh(), nn.Linear(5, 3))
    x, y = _data(8, (2, 3, 3), 3)
    exact = nu.gradient_variance(model, (x, y))
    approx = nu.kfac_variance(model, _singletons(x, y))
    _close(approx.per_layer, exact.per_layer)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0)),
        dict(kernel_size=3, dilation=2, padding="same"),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        dict(kernel_size=3, padding=2, padding_mode="circular", bias=False),
    ],
    ids=["pad1", "rect-stride", "dilated-same", "reflect", "circular-nobias"],
)
def test_conv_traces_and_patches(conv):
    # (1) tr(A) from the conv-of-ones shortcut equals the trace of the
    # unfolded A (padding modes, stride, dilation, "same");
    # (2) the unfolded patches are the ones autograd uses: sum_t e_t a~_t^T
    # equals the per-sample weight (and bias) gradient.
    torch.manual_seed(8)
    layer = nn.Conv2d(2, 3, **conv)
    model = nn.Sequential(layer, nn.Flatten())
    ps = select_params(model)
    layers, rest = plan(model, ps)
    assert rest == [] and len(layers) == 1
    x = torch.randn(3, 2, 6, 5)
    e = torch.randn_like(layer(x))
    tr_a, tr_g = trace_terms(layers[0], x, e)
    fa, fg = factors(layers[0], x, e)
    assert float(tr_a) == pytest.approx(float(fa.trace()), rel=1e-12)
    assert float(tr_g) == pytest.approx(float(fg.trace()), rel=1e-12)
    wb = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    for i in range(3):
        grads = torch.autograd.grad((layer(x[i : i + 1]) * e[i : i + 1]).sum(), wb)
        ref = torch.cat([g.reshape(3, -1) for g in grads], 1)
        a_pos, e_pos, _ = _positions(layers[0], x[i : i + 1], e[i : i + 1])
        if layer.bias is not None:
            a_pos = torch.cat([a_pos, a_pos.new_ones(*a_pos.shape[:2], 1)], 2)
        torch.testing.assert_close(torch.einsum("nto,nti->oi", e_pos, a_pos), ref, rtol=0, atol=1e-12)


def test_cnn_approximation_within_stated_tolerance():
    # Not exact (T > 1, several samples per factor): the documented tolerance
    # for these small nets is 30% per layer, 15% in total.
    model = _cnn()
    x, y = _data(64, (2, 7, 7), 4)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)]
    exact = nu.gradient_variance(model, batches)
    approx = nu.kfac_variance(model, batches)
    for k in exact.per_layer:
        assert approx.per_layer[k] == pytest.approx(exact.per_layer[k], rel=0.3), k
    assert approx.total == pytest.approx(exact.total, rel=0.15)
    assert approx.n_samples == 64 and approx.batch_size == 8


def test_mlp_approximation_within_stated_tolerance():
    model = _mlp()
    x, y = _data(64, (5,), 3)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    exact = nu.gradient_variance(model, batches)
    approx = nu.kfac_variance(model, batches)
    assert approx.total == pytest.approx(exact.total, rel=0.15)


def test_unsupported_layers_fall_back_to_exact_or_are_listed():
    model = _cnn(bn=True)
    x, y = _data(12, (2, 7, 7), 4)
    exact = nu.gradient_variance(model, (x, y))
    approx = nu.kfac_variance(model, _singletons(x, y))
    assert approx.exact_layers == ["1"]
    assert approx.per_layer["1"] == pytest.approx(exact.per_layer["1"], rel=1e-10)
    skipped = nu.kfac_variance(model, _singletons(x, y), fallback="skip")
    assert skipped.unsupported == ["1.weight", "1.bias"]
    assert "1" not in skipped.per_layer
    assert skipped.total == pytest.approx(approx.total - approx.per_layer["1"], rel=1e-10)


def test_grouped_conv_and_tied_weights_are_not_factored():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 9, 3))
    ps = select_params(model)
    layers, rest = plan(model, ps)
    assert [l.name for l in layers] == ["2"]
    assert [ps.names[k] for k in rest] == ["0.weight", "0.bias"]

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(10)
    tied = Tied()
    ps = select_params(tied)
    layers, rest = plan(tied, ps)
    assert [ps.names[k] for k in rest] == ["a.weight"]
    x, y = _data(6, (3,), 3)
    exact = nu.gradient_variance(tied, (x, y))
    approx = nu.kfac_variance(tied, _singletons(x, y))
    assert approx.total == pytest.approx(exact.total, rel=1e-10)


def test_module_called_twice_is_treated_exactly_and_model_is_restored():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    torch.manual_seed(11)
    model = Twice()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _data(4, (3,), 3)
    # the factors of one call do not describe a weight used twice: its part
    # is computed exactly from per-sample gradients (or skipped)
    r = nu.kfac_variance(model, (x, y))
    assert "called 2 times" in r.settings["hidden_from_hooks"]["lin"]
    assert r.exact_layers == ["lin"]
    assert r.total == pytest.approx(nu.gradient_variance(model, (x, y)).total, rel=1e-12)
    skipped = nu.kfac_variance(model, (x, y), fallback="skip")
    assert skipped.unsupported == ["lin.weight", "lin.bias"] and skipped.total == 0
    assert not model.lin._forward_hooks
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


def test_factors_trace_and_pooling():
    model = _cnn()
    x, y = _data(16, (2, 7, 7), 4)
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    r = nu.kfac_variance(model, batches, factors=True)
    assert set(r.factors) == {"0", "2", "4"}
    a, g = r.factors["0"]
    assert a.shape == (2 * 9 + 1, 2 * 9 + 1) and g.shape == (4, 4)
    a4, g4 = r.factors["4"]
    assert a4.shape == (28, 28) and g4.shape == (4, 4)
    # symmetric PSD
    for a, g in r.factors.values():
        torch.testing.assert_close(a, a.T)
        assert torch.linalg.eigvalsh(g).min() > -1e-12
    d = r.to_dict()
    assert d["factors"]["4"] == [[28, 28], [4, 4]]
    # T = 1 Linear layer in one batch: tr(A)tr(G) of the pooled factors is the
    # per-batch product (identical for a single batch)
    one = nu.kfac_variance(model, (x, y), factors=True)
    a4, g4 = one.factors["4"]
    assert one.per_layer["4"] + _layer_mean_sq(model, x, y, "4") == pytest.approx(
        float(a4.trace() * g4.trace()), rel=1e-10
    )


def _layer_mean_sq(model, x, y, layer):
    loss = F.cross_entropy(model(x), y)
    mod = dict(model.named_modules())[layer]
    grads = torch.autograd.grad(loss, list(mod.parameters()))
    return sum(float(g.pow(2).sum()) for g in grads)


def test_factors_match_curvlinops_empirical_kfac():
    curvlinops = pytest.importorskip("curvlinops")
    model = _cnn()
    x, y = _data(24, (2, 7, 7), 4)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    ours = nu.kfac_variance(model, batches, factors=True)
    params = [p for p in model.parameters()]
    op = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(), params, batches, fisher_type="empirical",
        kfac_approx="expand", separate_weight_and_bias=False, check_deterministic=False,
    )
    op.compute_kronecker_factors()
    for name, (a, g) in ours.factors.items():
        torch.testing.assert_close(a, op._input_covariances[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, op._gradient_covariances[name], rtol=1e-10, atol=1e-12)


def test_hidden_layer_found_in_the_first_pass_keeps_the_others_factors():
    # The first batch's pass both accumulates and finds the layers whose
    # hooks miss a use of their weights; what it accumulated for the other
    # layers stays (two batches: a dropped first batch would show).
    class Functional(nn.Module):
        def __init__(self, functional: bool):
            super().__init__()
            self.functional = functional
            self.a = nn.Linear(3, 5)
            self.b = nn.Linear(5, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return F.linear(h, self.b.weight, self.b.bias) if self.functional else self.b(h)

    torch.manual_seed(3)
    hidden = Functional(True).to(torch.float64)
    called = Functional(False).to(torch.float64)
    called.load_state_dict(hidden.state_dict())
    x, y = _data(10, (3,), 3)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    got = nu.kfac_variance(hidden, batches, factors=True)
    ref = nu.kfac_variance(called, batches, factors=True)
    exact = nu.gradient_variance(hidden, batches)
    assert set(got.settings["hidden_from_hooks"]) == {"b"} and got.exact_layers == ["b"]
    assert got.per_layer["a"] == pytest.approx(ref.per_layer["a"], rel=1e-12)
    assert got.per_layer["b"] == pytest.approx(exact.per_layer["b"], rel=1e-12)
    assert set(got.factors) == {"a"}
    for mine, theirs in zip(got.factors["a"], ref.factors["a"]):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=0)
    assert got.mean_grad_sqnorm == pytest.approx(exact.mean_grad_sqnorm, rel=1e-12)


def test_float32_convolutions_are_not_mistaken_for_hidden_uses():
    # The check compares the weight gradient rebuilt from the hooks with
    # autograd's; in float32 the two sum over samples and positions in
    # another order (1.5e-6 relative apart on this model's first layer), which is rounding,
    # not a hidden use.  A real hidden use in float32 is still found.
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 16 * 16, 10)).to(torch.float32)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(64, 3, 16, 16, generator=g, dtype=torch.float32), torch.randint(0, 10, (64,), generator=g))
    r = nu.kfac_variance(cnn, data)
    assert r.settings["hidden_from_hooks"] == {} and r.exact_layers == []
    assert r.settings["kfac_layers"] == ["0", "2", "5"]

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 5)
            self.b = nn.Linear(5, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x))) + 0.1 * F.linear(x[:, :3] @ x.new_ones(3, 5), self.b.weight)

    torch.manual_seed(1)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float32), torch.randint(0, 3, (16,), generator=g)
    assert set(nu.kfac_variance(Functional().to(torch.float32), (x, y)).settings["hidden_from_hooks"]) == {"b"}

    class ConvReused(nn.Module):  # the second convolution's kernel also used functionally, strided
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 16, 3, padding=1)
            self.c2 = nn.Conv2d(16, 16, 3, padding=1, stride=2, dilation=1)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            h = torch.relu(self.c1(x))
            z = torch.relu(self.c2(h)) + 0.05 * F.conv2d(h, self.c2.weight, stride=2, padding=1)
            return self.head(z.mean((2, 3)))

    torch.manual_seed(2)
    assert set(nu.kfac_variance(ConvReused(), data).settings["hidden_from_hooks"]) == {"c2"}


LAYOUTS = ["batch-first", "sequence-first", "flattened"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sample_count_is_the_batch_not_the_leading_dimension(layout):
    # G sums the output gradients over a sample's positions and averages
    # over samples; the layer's leading dimension is the sequence (T) in a
    # sequence-first layout and B * T when flattened, and dividing by it put
    # G off by T / B.  Exact case: one sample per batch, and each sample's
    # T = 4 inputs orthogonal with equal norms (one-hot at different
    # coordinates), so ||sum_t e_t a_t^T||^2 = (1/T) sum_t ||a_t||^2 sum_t ||e_t||^2.
    torch.manual_seed(0)
    model = cases.LinearLayouts(layout, bias=False)
    n = 5
    gen = torch.Generator().manual_seed(1)
    x = torch.eye(4).expand(n, 4, 4) * (torch.rand(n, 1, 1, generator=gen) + 0.5)
    y = torch.randint(0, 3, (n,), generator=gen)
    exact = nu.gradient_variance(model, (x, y))
    approx = nu.kfac_variance(model, _singletons(x, y))
    assert approx.settings["kfac_layers"] == ["lin"]
    assert approx.total == pytest.approx(exact.total, rel=1e-10)
    # several samples per batch: the factors by hand, G = (1/B) sum_{i,t} e e^T
    # with e the gradients of the sample losses (of their sum)
    z = torch.randn(n, 6, 4, generator=gen)
    r = nu.kfac_variance(model, (z, y), factors=True)
    h = nn.functional.linear(z, model.lin.weight)
    e = torch.autograd.grad(F.cross_entropy(torch.tanh(h).sum(1), y, reduction="sum"), h)[0]
    a_ref = torch.einsum("nti,ntj->ij", z, z) / (n * 6)
    g_ref = torch.einsum("nti,ntj->ij", e, e) / n
    torch.testing.assert_close(r.factors["lin"][0], a_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.factors["lin"][1], g_ref, rtol=1e-12, atol=1e-14)
    mean_sq = float(torch.autograd.grad(F.cross_entropy(model(z), y), model.lin.weight)[0].pow(2).sum())
    assert r.total == pytest.approx(float(a_ref.trace() * g_ref.trace()) - mean_sq, rel=1e-10)


def test_selected_layers_without_gradient_report_zeros():
    # A selected layer the forward pass never calls has zero gradient: zero
    # variance and zero factors, reported like any other layer (its factors
    # were missing from result.factors).
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.u = nn.Linear(3, 2)
            self.c = nn.Conv2d(1, 2, 3)
            self.p = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return self.a(x)

    torch.manual_seed(0)
    model = Unused()
    x, y = _data(6, (3,), 4)
    for params in (None, [model.u, model.c, model.p]):
        r = nu.kfac_variance(model, [(x[:4], y[:4]), (x[4:], y[4:])], params=params, factors=True)
        e = nu.gradient_variance(model, (x, y), params=params)
        c = nu.channel_gradient_norms(model, (x, y), params=params)
        for layer in ("u", "c", "p"):
            assert r.per_layer[layer] == 0 and e.per_layer[layer] == 0, layer
            assert c.per_layer[layer]["mean"] == 0, layer
        assert set(r.factors) == ({"a", "u", "c"} if params is None else {"u", "c"})
        assert [t.shape for t in r.factors["u"]] == [(4, 4), (2, 2)]
        assert [t.shape for t in r.factors["c"]] == [(10, 10), (2, 2)]
        assert all(not t.any() for t in (*r.factors["u"], *r.factors["c"]))
