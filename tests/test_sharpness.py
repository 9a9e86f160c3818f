"""flatness.sharpness: closed forms, Monte Carlo, invariances, restore, errors."""

import json
import math

import cases
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zoo
from hypothesis import given, settings
from torch import nn

import flatness
from flatness.sharpness import AVERAGE_CASE, WORST_CASE, NonFiniteLossError

WORST = list(WORST_CASE)
AVERAGE = list(AVERAGE_CASE)

def _per_kind(kind, n_iters, n_samples, **worst_case):
    """APGD iterations (and ``worst_case`` options) for a worst-case kind, draws for an average-case one."""
    return {"n_samples": n_samples} if kind.startswith("avg") else {"n_iters": n_iters, **worst_case}


def bce(z, t):
    return F.binary_cross_entropy_with_logits(z.squeeze(-1), t)


def logistic_problem(seed, dim=6, zero_weight=False):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(dim, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, dim, generator=gen, dtype=torch.float64))
        model.bias.copy_(torch.randn(1, generator=gen, dtype=torch.float64))
        if zero_weight:
            model.weight[0, 0] = 0.0
    x = torch.randn(1, dim, generator=gen, dtype=torch.float64)
    y = torch.tensor([float(seed % 2)], dtype=torch.float64)
    return model, x, y


def exact_worst_case(model, x, y, kind, rho):
    """Closed form for logistic regression on one sample.

    The loss log(1 + exp(-margin)) decreases in the margin s * (w.x + b), which
    is linear in the perturbation; the worst perturbation in a norm ball
    shrinks the margin by rho times the dual norm of the (scaled) input
    [x, 1]: l1 for linf balls, l2 for l2 balls, with the coordinates weighted
    by |w| (and |b|) for the adaptive kinds.
    """
    s = 2 * float(y) - 1
    with torch.no_grad():
        margin = s * float(model(x))
    xa = torch.cat([x.reshape(-1), torch.ones(1, dtype=x.dtype)])
    if kind.startswith("adaptive"):
        xa = xa * torch.cat([model.weight.reshape(-1), model.bias]).detach().abs()
    dual = float(xa.abs().sum()) if kind.endswith("linf") else float(xa.norm())

    def loss(mg):
        return math.log1p(math.exp(-mg))

    return loss(margin - rho * dual) - loss(margin)


@pytest.mark.parametrize("kind", WORST)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("rho", [1e-3, 0.05, 0.5])
def test_worst_case_matches_logistic_closed_form(kind, seed, rho):
    model, x, y = logistic_problem(seed, zero_weight=seed == 3)
    exact = exact_worst_case(model, x, y, kind, rho)
    r = flatness.sharpness(model, (x, y), kind=kind, rho=rho, loss_fn=bce)
    assert r.value >= 0.999 * exact
    assert r.value <= exact * (1 + 1e-9) + 1e-15  # never above the true maximum
    assert r.perturbed_loss == pytest.approx(r.clean_loss + r.value)


@pytest.mark.parametrize("kind", AVERAGE)
def test_average_case_matches_independent_monte_carlo(kind):
    """Compare with a vectorised Monte Carlo written out here: the loss of a
    linear model at w + d for 200k draws of d at once."""
    model, x, y = logistic_problem(7)
    rho = 0.3
    n_ours = 2000
    r = flatness.sharpness(model, (x, y), kind=kind, rho=rho, loss_fn=bce, n_samples=n_ours, seed=1)

    gen = torch.Generator().manual_seed(12345)
    n = 200_000
    w = torch.cat([model.weight.reshape(-1), model.bias]).detach()
    c = w.abs() if "adaptive" in kind else torch.ones_like(w)
    if kind.endswith("l2"):
        noise = torch.randn(n, w.numel(), generator=gen, dtype=torch.float64)
    else:
        noise = torch.rand(n, w.numel(), generator=gen, dtype=torch.float64) * 2 - 1
    wd = w + rho * c * noise
    xa = torch.cat([x.reshape(-1), torch.ones(1, dtype=x.dtype)])
    z = wd @ xa
    losses = F.binary_cross_entropy_with_logits(z, y.expand(n), reduction="none")
    with torch.no_grad():
        clean = float(bce(model(x), y))
    expected = float(losses.mean()) - clean
    # Standard error of our n_ours-sample estimate dominates the reference's.
    se = float(losses.std()) * math.sqrt(1 / n_ours + 1 / n)
    assert abs(r.value - expected) < 4 * se, (r.value, expected, se)


def mlp(seed, width=8, dtype=torch.float64, bias=True):
    return cases.mlp(seed, (5, width, 3), act=nn.ReLU, bias=bias, dtype=dtype)


def batch(seed, n=16, dtype=torch.float64):
    return cases.classification_batch(n, (5,), 3, seed, dtype)


@settings(max_examples=15)
@given(seed=st.integers(0, 1000), kind=st.sampled_from(WORST), rho=st.floats(1e-4, 0.5),
       restarts=st.integers(0, 1))
def test_worst_case_is_nonnegative(seed, kind, rho, restarts):
    r = flatness.sharpness(mlp(seed), batch(seed), kind=kind, rho=rho, n_iters=5, restarts=restarts, seed=seed)
    assert r.value >= 0 and all(v >= 0 for v in r.per_batch)


@settings(max_examples=10)
@given(seed=st.integers(0, 1000), neuron=st.integers(0, 7), log_a=st.floats(-2.3, 2.3),
       kind=st.sampled_from(["adaptive_linf", "adaptive_l2", "avg_adaptive_l2", "avg_adaptive_linf"]))
def test_adaptive_sharpness_invariant_to_relu_neuron_rescaling(seed, neuron, log_a, kind):
    a = math.exp(log_a)
    model = mlp(seed)
    data = batch(seed)
    before = flatness.sharpness(model, data, kind=kind, rho=0.05, **_per_kind(kind, 10, 20), seed=3).value
    scaled = mlp(seed)
    with torch.no_grad():
        scaled[0].weight[neuron] *= a
        scaled[0].bias[neuron] *= a
        scaled[2].weight[:, neuron] /= a
    after = flatness.sharpness(scaled, data, kind=kind, rho=0.05, **_per_kind(kind, 10, 20), seed=3).value
    assert after == pytest.approx(before, rel=1e-7, abs=1e-12)


def test_plain_sharpness_is_not_rescaling_invariant():
    """The control for the test above: plain l2 sharpness does change."""
    model, data = mlp(0), batch(0)
    before = flatness.sharpness(model, data, kind="l2", rho=0.05, n_iters=10).value
    with torch.no_grad():
        model[0].weight *= 10
        model[0].bias *= 10
        model[2].weight /= 10
    after = flatness.sharpness(model, data, kind="l2", rho=0.05, n_iters=10).value
    assert abs(after - before) > 1e-3 * before


def test_m_sharpness_averages_independent_chunks():
    model, (x, y) = mlp(1), batch(1, n=12)
    whole = flatness.sharpness(model, (x, y), kind="linf", rho=0.01, n_iters=8)
    same = flatness.sharpness(model, (x, y), kind="linf", rho=0.01, n_iters=8, m=12)
    assert same.value == whole.value
    chunked = flatness.sharpness(model, (x, y), kind="linf", rho=0.01, n_iters=8, m=4)
    separate = [flatness.sharpness(model, (x[i:i + 4], y[i:i + 4]), kind="linf", rho=0.01, n_iters=8).value
                for i in range(0, 12, 4)]
    assert chunked.value == pytest.approx(sum(separate) / 3, rel=1e-12)
    # Each chunk gets its own perturbation, so the chunked value is larger.
    assert chunked.value > whole.value
    # An uneven last chunk is weighted by its size.
    uneven = flatness.sharpness(model, (x, y), kind="linf", rho=0.01, n_iters=8, m=5)
    parts = [(x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])]
    vals = [flatness.sharpness(model, p, kind="linf", rho=0.01, n_iters=8).value for p in parts]
    assert uneven.value == pytest.approx((5 * vals[0] + 5 * vals[1] + 2 * vals[2]) / 12, rel=1e-12)


def test_batches_are_weighted_by_size():
    model = mlp(2)
    (x, y) = batch(2, n=10)
    loader = [(x[:7], y[:7]), (x[7:], y[7:])]
    r = flatness.sharpness(model, loader, kind="l2", rho=0.02, n_iters=5)
    assert r.batch_sizes == [7, 3]
    assert r.value == pytest.approx((7 * r.per_batch[0] + 3 * r.per_batch[1]) / 10, rel=1e-12)
    single = flatness.sharpness(model, loader[1], kind="l2", rho=0.02, n_iters=5)
    assert single.per_batch[0] == pytest.approx(r.per_batch[1], rel=1e-12)
    limited = flatness.sharpness(model, loader, kind="l2", rho=0.02, n_iters=5, n_batches=1)
    assert limited.batch_sizes == [7]


def test_cost_is_n_forward_backward_plus_one_forward():
    model, data = mlp(3), batch(3)
    r = flatness.sharpness(model, [data, data], kind="adaptive_l2", rho=0.01, n_iters=7)
    assert r.counts == {"forward": 2, "backward": 14}
    r = flatness.sharpness(model, data, kind="linf", rho=0.01, n_iters=7, restarts=2, m=8)
    assert r.counts == {"forward": 2 * 3, "backward": 2 * 3 * 7}
    r = flatness.sharpness(model, data, kind="avg_l2", rho=0.01, n_samples=9)
    assert r.counts == {"forward": 10, "backward": 0}


def test_restarts_never_decrease_the_value():
    model, data = mlp(4), batch(4)
    base = flatness.sharpness(model, data, kind="l2", rho=0.5, n_iters=5)
    more = flatness.sharpness(model, data, kind="l2", rho=0.5, n_iters=5, restarts=3, seed=0)
    assert more.value >= base.value


def test_apgd_beats_single_gradient_step_on_nonlinear_model():
    """On a ReLU net, 20 APGD iterations find more than one normalised
    gradient step of length rho (the SAM perturbation)."""
    model, data = mlp(5, width=32), batch(5, n=64)
    rho = 0.5
    r = flatness.sharpness(model, data, kind="l2", rho=rho, n_iters=20)
    x, y = data
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.add_(g, alpha=rho / float(norm))
        one_step = float(F.cross_entropy(model(x), y)) - float(loss)
    assert r.value >= one_step * (1 - 1e-9)


# ---------------------------------------------------------------- inputs


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(2, 3)

    def forward(self, image, extra):
        return self.a(image) + self.b(extra)


class TupleModel(DictModel):
    def forward(self, image, extra):  # positional
        return super().forward(image, extra)


def test_dict_and_tuple_inputs():
    torch.manual_seed(0)
    x, y = batch(0, dtype=torch.float32)
    e = torch.randn(16, 2)
    for model, inputs in [(DictModel(), {"image": x, "extra": e}), (TupleModel(), (x, e))]:
        r = flatness.sharpness(model, (inputs, y), kind="adaptive_linf", rho=1e-3, n_iters=3)
        assert r.value >= 0 and math.isfinite(r.value)


def test_float32_batchnorm_dropout_model_and_frozen_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    model[0].weight.requires_grad_(False)
    x, y = batch(0, dtype=torch.float32)
    r = flatness.sharpness(model, (x, y.tolist() and y), kind="l2", rho=0.01, n_iters=3)
    assert "0.weight" not in r.settings["params"] and r.settings["dtype"] == "torch.float32"
    # eval mode by default: dropout off, so the result is deterministic.
    r2 = flatness.sharpness(model, (x, y), kind="l2", rho=0.01, n_iters=3)
    assert r.value == r2.value
    r_train = flatness.sharpness(model, (x, y), kind="l2", rho=0.01, n_iters=3, train=True, seed=5)
    r_train2 = flatness.sharpness(model, (x, y), kind="l2", rho=0.01, n_iters=3, train=True, seed=5)
    assert r_train.value == r_train2.value


@pytest.mark.parametrize("kind", ["l2", "linf", "avg_l2", "avg_linf"])
def test_train_mode_keeps_one_dropout_mask_per_chunk(kind):
    # every evaluation drew its own dropout mask: at rho -> 0 the value was
    # the masks' noise (0.09), not ~0; now w and every w + d of a chunk see
    # the same mask, which a float64 model without dropout confirms: the
    # value at rho 1e-8 is of the order of rho
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = batch(0)
    options = {"n_samples": 4} if kind.startswith("avg") else {"n_iters": 3}
    tiny = flatness.sharpness(model, (x, y), kind=kind, rho=1e-8, train=True, seed=1, m=4, **options)
    assert abs(tiny.value) < 1e-6, tiny.value
    # the mask moves on between chunks and with the seed
    other = flatness.sharpness(model, (x, y), kind=kind, rho=1e-8, train=True, seed=2, m=4, **options)
    assert tiny.clean_loss != other.clean_loss


def test_params_selection_and_dataloader_batches():
    model = mlp(6)
    x, y = batch(6, n=20)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    r = flatness.sharpness(model, loader, kind="linf", rho=0.01, n_iters=3, params=[model[2].weight, "0.bias"])
    assert r.settings["params"] == ["0.bias", "2.weight"]
    assert r.batch_sizes == [8, 8, 4]
    r2 = flatness.sharpness(model, loader, kind="linf", rho=0.01, n_iters=3, params=model[2])
    assert r2.settings["params"] == ["2.weight", "2.bias"]


@pytest.mark.parametrize("kind", ["hessian_max_eig", "hessian_trace"])
def test_curvature_kinds_take_params_as_a_generator(kind):
    """``params=model.head.parameters()`` (a one-shot generator) selects
    what the list of the same tensors selects."""
    model, data = mlp(6), batch(6)
    listed = flatness.sharpness(model, data, kind=kind, params=list(model[2].parameters()))
    generated = flatness.sharpness(model, data, kind=kind, params=model[2].parameters())
    assert generated.settings["params"] == listed.settings["params"] == ["2.weight", "2.bias"]
    assert generated.value == listed.value
    assert generated.clean_loss == listed.clean_loss


def test_hessian_max_eig_refuses_the_smallest_eigenvalue():
    """which='SA' would report the smallest eigenvalue as the sharpness
    ``hessian_max_eig``: refused before any product, model unchanged; the
    largest (default) and largest-magnitude eigenvalues are accepted."""
    model, data = mlp(6), batch(6)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="which='SA'"):
        flatness.sharpness(model, data, kind="hessian_max_eig", which="SA")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    eigenvalues = torch.linalg.eigvalsh(cases.dense_hessian(model, [data]))
    top = flatness.sharpness(model, data, kind="hessian_max_eig", tol=1e-8)
    assert top.value == pytest.approx(float(eigenvalues[-1]), rel=1e-6)


def test_params_as_named_parameters_pairs():
    """``params=model.named_parameters()``, or a filtered list of its
    ``(name, tensor)`` pairs, selects those tensors."""
    model, data = mlp(6), batch(6)
    head = [(n, p) for n, p in model.named_parameters() if n.startswith("2.")]
    r = flatness.sharpness(model, data, kind="linf", rho=0.01, n_iters=3, params=head)
    assert r.settings["params"] == ["2.weight", "2.bias"]
    assert r.value == flatness.sharpness(model, data, kind="linf", rho=0.01, n_iters=3, params=model[2]).value
    every = flatness.sharpness(model, data, kind="avg_l2", rho=0.01, n_samples=2, params=model.named_parameters())
    assert every.settings["params"] == [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="not a parameter of model"):
        flatness.sharpness(model, data, kind="linf", rho=0.01, params=list(mlp(7).named_parameters()))


def test_params_tied_names_and_foreign_modules():
    """A tied tensor is selected by any of its names (``state_dict`` lists
    them all); a module of another model is refused, not skipped."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, tokens):
            return self.out(self.emb(tokens).mean(dim=1))

    torch.manual_seed(0)
    tied = Tied().double()
    tokens, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,))
    by_first = flatness.sharpness(tied, (tokens, y), kind="avg_l2", rho=0.01, n_samples=3, params=["emb.weight"])
    by_second = flatness.sharpness(tied, (tokens, y), kind="avg_l2", rho=0.01, n_samples=3, params=["out.weight"])
    assert by_second.settings["params"] == ["emb.weight"] and by_second.value == by_first.value
    with pytest.raises(ValueError, match="did you mean 'emb.weight'"):
        flatness.sharpness(tied, (tokens, y), kind="avg_l2", rho=0.01, params=["emb.weigth"])

    model, other = mlp(6), mlp(7)
    x, y = batch(6)
    for params in ([other[0]], [model[0], other[2]]):
        before = zoo.state(model)
        with pytest.raises(ValueError, match="not parameters of model"):
            flatness.sharpness(model, (x, y), kind="linf", rho=0.01, n_iters=2, params=params)
        zoo.assert_same_state(before, zoo.state(model))
    # a container built outside the model around its own modules is fine
    r = flatness.sharpness(model, (x, y), kind="linf", rho=0.01, n_iters=2, params=nn.ModuleList([model[2]]))
    assert r.settings["params"] == ["2.weight", "2.bias"]


def test_normalize_logits_invariant_to_logit_scale():
    """With normalised logits, scaling the last layer (and its bias) by a
    positive constant changes nothing at all."""
    model, data = mlp(7), batch(7)
    kw = dict(kind="adaptive_l2", rho=0.05, n_iters=6, normalize_logits=True)
    before = flatness.sharpness(model, data, **kw).value
    with torch.no_grad():
        model[2].weight *= 5
        model[2].bias *= 5
    assert flatness.sharpness(model, data, **kw).value == pytest.approx(before, rel=1e-9)


class _FixedLogits(nn.Module):
    """Returns its input as the logits; its one parameter moves nothing."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, z):
        return z + 0.0 * self.unused


@pytest.mark.parametrize("kind", ["l2", "linf"])
def test_normalize_logits_by_hand(kind):
    """``z <- (z - mean z) / ||z - mean z||`` per sample: for z = (1, 2, 4),
    mean 7/3, centred (-4, -1, 5) / 3 with norm sqrt(42) / 3; for (0, 0, 3),
    centred (-1, -1, 2) with norm sqrt(6); a constant row stays at zero."""
    z = torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 3.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    expected = torch.tensor([[-4.0, -1.0, 5.0], [-1.0, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    expected[0] /= math.sqrt(42)
    expected[1] /= math.sqrt(6)
    seen = []

    def loss_fn(out, y):
        seen.append(out.detach().clone())
        return F.cross_entropy(out, y)

    flatness.sharpness(_FixedLogits(), (z, torch.tensor([0, 1, 2])), kind=kind, rho=0.1,
                       loss_fn=loss_fn, normalize_logits=True, **_per_kind(kind, 2, 2))
    assert seen
    for out in seen:
        torch.testing.assert_close(out, expected, rtol=1e-15, atol=1e-15)


def test_determinism_and_global_rng_untouched():
    model, data = mlp(8), batch(8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = flatness.sharpness(model, data, kind="avg_l2", rho=0.05, n_samples=5, seed=11)
    b = flatness.sharpness(model, data, kind="avg_l2", rho=0.05, n_samples=5, seed=11)
    c = flatness.sharpness(model, data, kind="avg_l2", rho=0.05, n_samples=5, seed=12)
    flatness.sharpness(model, data, kind="l2", rho=0.05, n_iters=3, restarts=2, seed=None)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.value == b.value and a.value != c.value


def test_result_serialises():
    r = flatness.sharpness(mlp(9), batch(9), kind="l2", rho=0.01, n_iters=2)
    d = json.loads(r.to_json())
    assert d["kind"] == "l2" and d["value"] == r.value and d["per_batch"] == r.per_batch
    assert d["settings"]["n_iters"] == 2 and float(r) == r.value
    assert r.to_dict()["counts"] == r.counts


@pytest.mark.parametrize("kind", [*WORST, *AVERAGE, "hessian_trace"])
def test_settings_name_the_loss_fn(kind):
    """``settings`` holds every option that determined the value, the loss
    included, under the same key for every kind."""
    model, data = mlp(9), batch(9)
    options = {} if kind == "hessian_trace" else {"rho": 0.01, **_per_kind(kind, 2, 2)}
    assert flatness.sharpness(model, data, kind=kind, **options).settings["loss_fn"] == "default_loss"
    r = flatness.sharpness(model, data, kind=kind, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1), **options)
    assert r.settings["loss_fn"] == "CrossEntropyLoss"
    assert json.loads(r.to_json())["settings"]["loss_fn"] == "CrossEntropyLoss"


# --------------------------------------------------------------- restore


def snapshot(model):
    return {
        "values": {n: p.detach().clone() for n, p in model.named_parameters()},
        "ptrs": {n: p.data_ptr() for n, p in model.named_parameters()},
        "objs": {n: id(p) for n, p in model.named_parameters()},
        "req": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: (None if p.grad is None else (id(p.grad), p.grad.clone())) for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
    }


def assert_same(model, snap):
    now = snapshot(model)
    assert now["ptrs"] == snap["ptrs"] and now["objs"] == snap["objs"]
    assert now["req"] == snap["req"] and now["modes"] == snap["modes"]
    for n, v in snap["values"].items():
        assert torch.equal(now["values"][n], v), n  # bit for bit
    for n, g in snap["grad"].items():
        if g is None:
            assert now["grad"][n] is None
        else:
            assert now["grad"][n][0] == g[0] and torch.equal(now["grad"][n][1], g[1])
    for n, b in snap["buffers"].items():
        assert torch.equal(now["buffers"][n], b), n


def bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3)).double()
    model.train()
    model[4].eval()  # mixed modes must come back as they were
    model[0].bias.requires_grad_(False)
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()  # existing .grad fields
    return model


@pytest.mark.parametrize("kind", WORST + AVERAGE)
@pytest.mark.parametrize("train", [False, True])
def test_model_restored_bit_for_bit(kind, train):
    model = bn_model()
    snap = snapshot(model)
    flatness.sharpness(model, batch(1), kind=kind, rho=0.05, **_per_kind(kind, 3, 3), train=train)
    assert_same(model, snap)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("kind", ["adaptive_l2", "linf", "avg_adaptive_linf"])
@pytest.mark.parametrize("fail_at", [1, 2, 4, 7])
@pytest.mark.parametrize("train", [False, True])
def test_model_restored_when_loss_fn_raises_midway(kind, fail_at, train):
    model = bn_model()
    snap = snapshot(model)
    state = torch.get_rng_state()
    calls = {"n": 0}

    def failing_loss(out, t):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise Boom("injected")
        return F.cross_entropy(out, t)

    with pytest.raises(Boom):
        flatness.sharpness(model, [batch(1), batch(2)], kind=kind, rho=0.05, **_per_kind(kind, 3, 3),
                           loss_fn=failing_loss, train=train)
    assert_same(model, snap)
    assert torch.equal(torch.get_rng_state(), state)


def test_model_restored_on_keyboard_interrupt_from_data():
    model = bn_model()
    snap = snapshot(model)

    def data():
        yield batch(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        flatness.sharpness(model, data(), kind="l2", rho=0.05, n_iters=2, train=True)
    assert_same(model, snap)


# ----------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors_before_changing_anything():
    model = bn_model()
    snap = snapshot(model)
    data = batch(0)
    with pytest.raises(ValueError, match="valid kinds: linf, l2"):
        flatness.sharpness(model, data, kind="sam", rho=0.1)
    for rho in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="rho"):
            flatness.sharpness(model, data, kind="l2", rho=rho)
    with pytest.raises(ValueError, match="needs rho"):
        flatness.sharpness(model, data, kind="l2")
    with pytest.raises(ValueError, match="no batches"):
        flatness.sharpness(model, [], kind="l2", rho=0.1)
    with pytest.raises(ValueError, match="empty batch"):
        flatness.sharpness(model, (data[0][:0], data[1][:0]), kind="l2", rho=0.1)
    with pytest.raises(ValueError, match="leading dimension"):
        flatness.sharpness(model, (data[0], data[1][:3]), kind="l2", rho=0.1)
    with pytest.raises(ValueError, match="no parameters"):
        flatness.sharpness(nn.ReLU(), data, kind="l2", rho=0.1)
    with pytest.raises(ValueError, match="n_iters"):
        flatness.sharpness(model, data, kind="l2", rho=0.1, n_iters=0)
    with pytest.raises(ValueError, match="m must be"):
        flatness.sharpness(model, data, kind="l2", rho=0.1, m=0)
    with pytest.raises(TypeError, match="data must be"):
        flatness.sharpness(model, data[0], kind="l2", rho=0.1)
    with pytest.raises(TypeError, match="model must be"):
        flatness.sharpness("model", data, kind="l2", rho=0.1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        flatness.sharpness(model, data, kind="l2", rho=0.1, n_iter=3)
    with pytest.raises(ValueError, match="scalar"):
        flatness.sharpness(model, data, kind="l2", rho=0.1,
                           loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none"))
    assert_same(model, snap)


def test_loss_without_gradient_is_a_clear_error_for_worst_case_kinds():
    """APGD follows gradients: a 0-1 error (argmax) as loss_fn, or a model
    that detaches its outputs, is refused with a ValueError that says so;
    the average-case kinds measure such a loss."""
    model = bn_model()
    snap = snapshot(model)
    data = batch(0)

    def error_rate(outputs, targets):
        return (outputs.argmax(1) != targets).to(outputs.dtype).mean()

    for kind in WORST:
        with pytest.raises(ValueError, match="no gradient"):
            flatness.sharpness(model, data, kind=kind, rho=0.1, n_iters=2, loss_fn=error_rate)
        with pytest.raises(ValueError, match="no gradient"):
            flatness.sharpness(model, data, kind=kind, rho=0.1, n_iters=2,
                               loss_fn=lambda o, t: F.cross_entropy(o.detach(), t))
    assert_same(model, snap)
    r = flatness.sharpness(model, data, kind="avg_linf", rho=0.1, n_samples=3, loss_fn=error_rate)
    assert 0 <= r.clean_loss <= 1


class _Outputs(nn.Module):
    """A classifier that returns its logits inside a dict (the layout of
    Hugging Face models' outputs), an object with ``.logits`` or a tuple."""

    def __init__(self, layout):
        super().__init__()
        self.layout = layout
        self.net = mlp(0)

    def forward(self, x):
        z = self.net(x)
        if self.layout == "dict":
            return {"logits": z, "hidden": x}
        if self.layout == "attribute":
            return type("ModelOutput", (), {"logits": z})()
        return z, x


@pytest.mark.parametrize(("layout", "hint"), [("dict", "['logits']"), ("attribute", ".logits"), ("tuple", "[0]")])
def test_default_loss_on_outputs_that_are_not_logits_says_what_to_pass(layout, hint):
    model, data = _Outputs(layout), batch(0)
    with pytest.raises(TypeError, match="loss_fn=") as info:
        flatness.sharpness(model, data, kind="linf", rho=0.01, n_iters=2)
    assert f"out{hint}" in str(info.value)
    pick = {"dict": lambda out: out["logits"], "attribute": lambda out: out.logits, "tuple": lambda out: out[0]}[layout]
    r = flatness.sharpness(model, data, kind="linf", rho=0.01, n_iters=2, loss_fn=lambda out, y: F.cross_entropy(pick(out), y))
    assert r.value == flatness.sharpness(model.net, data, kind="linf", rho=0.01, n_iters=2).value


def test_a_dataset_instead_of_batches_is_refused_with_the_fix():
    """A Dataset (or a list of its samples) holds samples, not batches: the
    error says to wrap it in a DataLoader."""
    model, (x, y) = mlp(0), batch(0)
    dataset = torch.utils.data.TensorDataset(x, y)
    for data in (dataset, list(dataset), dataset[0]):
        with pytest.raises((TypeError, ValueError), match="DataLoader"):
            flatness.sharpness(model, data, kind="linf", rho=0.01, n_iters=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    assert flatness.sharpness(model, loader, kind="linf", rho=0.01, n_iters=2).batch_sizes == [8, 8]


def test_bad_device_option_is_a_clear_error_before_anything_changes():
    model = bn_model()
    snap = snapshot(model)
    data = batch(0)
    for device, error, needle in (("meta", ValueError, "shapes only"), ("gpu", ValueError, "not an available device"),
                                  ("cuda:99", ValueError, "cuda"), (1.5, TypeError, "device must be")):
        with pytest.raises(error, match=needle):
            flatness.sharpness(model, data, kind="avg_l2", rho=0.1, n_samples=2, device=device)
        with pytest.raises(error, match=needle):
            flatness.sharpness(model, data, kind="linf", rho=0.1, n_iters=2, device=device)
    assert_same(model, snap)
    for device in ("cpu", torch.device("cpu")):
        r = flatness.sharpness(model, data, kind="linf", rho=0.1, n_iters=2, device=device)
        assert r.settings["device"] == "cpu"


def test_rho_from_numpy_is_a_number():
    """A radius taken from a NumPy array (an element of a float32 grid) is
    the same radius as the Python float; a large finite one is not called
    infinite."""
    model, data = mlp(0), batch(0)
    rho = np.linspace(0.01, 0.05, 3, dtype=np.float32)[1]
    plain = flatness.sharpness(model, data, kind="linf", rho=float(rho), n_iters=3)
    for radius in (rho, np.float16(0.03)):
        r = flatness.sharpness(model, data, kind="linf", rho=radius, n_iters=3)
        assert type(r.rho) is float
        if radius == rho:
            assert r.rho == float(rho) and r.value == plain.value
    with pytest.raises(TypeError, match="rho must be a real number"):
        flatness.sharpness(model, data, kind="linf", rho="0.01")
    with pytest.raises(TypeError, match="rho must be a real number"):
        flatness.sharpness(model, data, kind="linf", rho=True)
    with pytest.raises(ValueError, match="rho must be finite, got inf"):
        flatness.sharpness(model, data, kind="linf", rho=np.float64("inf"))
    r = flatness.sharpness(nn.Linear(5, 3).double(), data, kind="avg_l2", rho=1e-300, n_samples=2)
    assert r.rho == 1e-300
    with pytest.raises(NonFiniteLossError):  # finite, so measured (and the loss overflows)
        flatness.sharpness(model, data, kind="linf", rho=1e300, n_iters=2)


def test_non_finite_loss_is_reported_not_averaged():
    model, (x, y) = mlp(0), batch(0)
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="nan"):
        flatness.sharpness(model, (x, y), kind="l2", rho=0.1)
    assert issubclass(NonFiniteLossError, ValueError)


# --------------------------------------------------------------------------
# APGD's gradients in the buffers of the perturbed weights
# --------------------------------------------------------------------------


def _plain_gradients(monkeypatch):
    """Make every sharpness call keep gradients and perturbed weights apart."""
    import importlib

    sharpness_mod = importlib.import_module("flatness.sharpness")  # the module, not the function
    init = sharpness_mod._Loss.__init__

    def plain(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.in_place_grads = False

    monkeypatch.setattr(sharpness_mod._Loss, "__init__", plain)


class _TiedReuse(nn.Module):
    """A tied weight (used twice, its gradient the sum) and, optionally, a
    detached alias of a weight that backpropagation reads after that
    weight's gradient is complete."""

    def __init__(self, detached: bool) -> None:
        super().__init__()
        self.detached = detached
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        extra = h @ self.c.weight.detach().t() if self.detached else 0.0
        h = torch.tanh(self.b(h))
        h = torch.tanh(F.linear(h, self.b.weight, self.b.bias))  # tied: b used twice
        return self.c(h) + 0.5 * extra


@pytest.mark.parametrize("detached", [False, True], ids=["tied", "detached-alias"])
@pytest.mark.parametrize("kind", ["l2", "linf", "adaptive_linf"])
def test_apgd_gradients_in_the_perturbed_weights_buffers_change_nothing(monkeypatch, kind, detached):
    # Writing each complete gradient (l2), or the linf step it makes, over
    # the perturbed weights it was taken at gives the value of keeping them
    # apart, bit for bit; a model that reads a weight after its gradient is
    # complete (through a detached alias) makes autograd refuse the buffer,
    # and the measurement falls back to separate buffers with the same
    # result.
    torch.manual_seed(0)
    model = _TiedReuse(detached)
    data = batch(1, n=12, dtype=torch.float32)
    data = (data[0][:, :4], data[1] % 3)
    got = flatness.sharpness(model, data, kind=kind, rho=0.05, n_iters=6, restarts=1)
    _plain_gradients(monkeypatch)
    ref = flatness.sharpness(model, data, kind=kind, rho=0.05, n_iters=6, restarts=1)
    assert got.value == ref.value and got.value > 0
    assert got.counts == ref.counts


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("kind", ["linf", "adaptive_linf"])
def test_linf_apgd_steps_inside_the_backward_pass(monkeypatch, kind):
    # linf steps are taken in the gradient hooks (flatness._apgd._Run.fused),
    # never over whole gradients: the plain step is not called, and every
    # parameter, the unused one included, steps once per backward pass
    import flatness._apgd as apgd_mod

    def plain_step(*args, **kwargs):
        raise AssertionError("the plain step ran")

    monkeypatch.setattr(apgd_mod, "_step", plain_step)
    stepped = []
    fused_step = apgd_mod._linf_step_tensor
    monkeypatch.setattr(apgd_mod, "_linf_step_tensor",
                        lambda pset, i, *a, **k: (stepped.append(i), fused_step(pset, i, *a, **k))[1])
    torch.manual_seed(0)
    model = _WithUnused()
    data = batch(1, n=12, dtype=torch.float32)
    data = (data[0][:, :4], data[1] % 3)
    res = flatness.sharpness(model, data, kind=kind, rho=0.05, n_iters=5)
    n_params = len(list(model.parameters()))
    assert res.counts == {"forward": 1, "backward": 5}
    assert sorted(stepped) == sorted(list(range(n_params)) * 5)
    assert res.value > 0


def test_perturbation_lost_to_low_precision_rounding_is_reported():
    # In bfloat16 an adaptive_linf radius below 2**-9 rounds every w + d back
    # to w: the value is exactly 0 for any model, which nothing else shows.
    import copy
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5))
    batch = (torch.randn(64, 20), torch.randint(0, 5, (64,)))
    low = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match=r"bfloat16 loses 100% .*float\(\)") as record:
        r = flatness.sharpness(low, batch, kind="adaptive_linf", rho=1e-3, n_iters=3)
    assert record[0].filename == __file__  # pointed at the caller's line
    assert r.value == 0.0 and r.settings["rounding_loss"] == 1.0
    # the same radius on the float32 model, and a radius of many bfloat16
    # steps, are measured without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r32 = flatness.sharpness(model, batch, kind="adaptive_linf", rho=1e-3, n_iters=3)
        wide = flatness.sharpness(low, batch, kind="adaptive_linf", rho=0.1, n_iters=3)
        flatness.sharpness(low, batch, kind="avg_l2", rho=0.05, n_samples=2)
    assert r32.value > 0 and r32.settings["rounding_loss"] == 0.0
    assert wide.value > 0 and wide.settings["rounding_loss"] < 0.1


@pytest.mark.parametrize("kind", ["avg_l2", "avg_linf"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_average_case_draws_the_float32_perturbations(kind, dtype):
    # rand / randn draw another stream in another dtype: the same seed
    # perturbed a float16 copy of this CNN along other directions than the
    # float32 model (avg_l2 1.6% apart, 0.4% with the float32 draw).
    import copy

    torch.manual_seed(0)
    model = zoo.cnn_bn().eval()
    data = (torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,)))
    ps = [p for p in model.parameters()]
    from flatness._geometry import PerturbationSet

    norm = kind.removeprefix("avg_")
    ref = PerturbationSet(norm, 0.05, ps, adaptive=False)
    half = PerturbationSet(norm, 0.05, [p.detach().to(dtype) for p in ps], adaptive=False)
    for r, h in zip(ref.average_case_sample(torch.Generator().manual_seed(2)),
                    half.average_case_sample(torch.Generator().manual_seed(2))):
        assert h.dtype == dtype
        assert torch.allclose(h.float(), r, rtol=1e-2, atol=1e-4)
    if dtype == torch.float16 and kind == "avg_l2":
        want = float(flatness.sharpness(model, data, kind=kind, rho=0.05))
        got = float(flatness.sharpness(copy.deepcopy(model).to(dtype), data, kind=kind, rho=0.05))
        assert got == pytest.approx(want, rel=1e-2)
