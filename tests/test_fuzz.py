"""Input fuzzing: odd batches and odd models give a correct result or a clear error.

* random batch shapes and dtypes (cast to the parameters' dtype exactly as
  if the caller had cast them), checked against hand-written references;
* empty batches, empty data, mismatched targets, non-batches, one-shot
  iterators: ``ValueError`` / ``TypeError`` naming the problem;
* integer inputs (an embedding model), frozen parts, tied parameters,
  parameters of size 0 and non-contiguous parameters: checked against dense
  float64 Hessians (``torch.autograd.functional.hessian``), per-sample
  autograd loops, or the same model without the oddity.
"""

from __future__ import annotations

import cases
import pytest
import torch
import torch.nn.functional as F
from cases import dense_hessian
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import flatness
from flatness.diversity import disagreement, ensemble_metrics, per_sample_sharpness, prediction_variance
from flatness.hessian import spectral_density, top_eigenvalues, trace
from flatness.nonuniformity import channel_gradient_norms, class_loss_imbalance, gradient_variance, kfac_variance

# Many tiny ops: one intra-op thread (the fixture is in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

def _per_kind(kind, n_iters, n_samples, **worst_case):
    """APGD iterations (and ``worst_case`` options) for a worst-case kind, draws for an average-case one."""
    return {"n_samples": n_samples} if kind.startswith("avg") else {"n_iters": n_iters, **worst_case}


def _mlp(dtype=torch.float64, seed=0):
    return cases.mlp(seed, (3, 4, 3), dtype=dtype)


# --------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------


def per_sample_trace_cov(model, batches):
    """``tr S`` from a loop of single-sample autograd gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for x, y in batches:
        for i in range(len(y)):
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    G = torch.stack(grads).double()
    return float(((G - G.mean(0)) ** 2).sum(1).mean())


def _unchanged(model, before):
    for (n, p), (p0, v, ptr, req, stride) in zip(model.named_parameters(), before):
        assert p is p0 and p.data_ptr() == ptr and torch.equal(p.detach(), v), n
        assert p.requires_grad == req and p.stride() == stride, n


def _state(model):
    return [(p, p.detach().clone(), p.data_ptr(), p.requires_grad, p.stride()) for p in model.parameters()]


# --------------------------------------------------------------------------
# random batch shapes and dtypes
# --------------------------------------------------------------------------

IN_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    in_dtype=st.sampled_from(IN_DTYPES),
    model_dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_random_batches_are_cast_and_measured_correctly(sizes, in_dtype, model_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    raw = [(torch.randn(n, 3, generator=g).to(in_dtype), torch.randint(0, 3, (n,), generator=g)) for n in sizes]
    cast = [(x.to(model_dtype), y) for x, y in raw]
    model = _mlp(model_dtype)
    before = _state(model)
    r = flatness.sharpness(model, raw, kind="adaptive_linf", rho=0.01, n_iters=2)
    assert r.value >= 0 and r.batch_sizes == sizes
    assert r.to_dict() | {"wall_time": 0} == flatness.sharpness(
        model, cast, kind="adaptive_linf", rho=0.01, n_iters=2).to_dict() | {"wall_time": 0}
    # clean loss against the size-weighted mean cross-entropy
    with torch.no_grad():
        ref = sum(float(F.cross_entropy(model(x), y)) * len(y) for x, y in cast) / sum(sizes)
    assert r.clean_loss == pytest.approx(ref, rel=1e-5 if model_dtype == torch.float32 else 1e-12)
    if model_dtype == torch.float64:
        H = dense_hessian(model, cast)
        assert trace(model, raw, method="exact").value == pytest.approx(float(H.trace()), rel=1e-9, abs=1e-12)
        if sum(sizes) > 1:
            assert gradient_variance(model, raw, chunk_size=2).total == pytest.approx(
                per_sample_trace_cov(model, cast), rel=1e-9, abs=1e-14)
    assert disagreement([model, _mlp(model_dtype, 1)], raw) == disagreement([model, _mlp(model_dtype, 1)], cast)
    _unchanged(model, before)


# --------------------------------------------------------------------------
# bad data: a clear error from every public function
# --------------------------------------------------------------------------

FUNCTIONS = {
    "sharpness": lambda m, d: flatness.sharpness(m, d, kind="linf", rho=0.01, n_iters=1),
    "avg_sharpness": lambda m, d: flatness.sharpness(m, d, kind="avg_l2", rho=0.01, n_samples=1),
    "top_eigenvalues": lambda m, d: top_eigenvalues(m, d, max_iter=2),
    "trace": lambda m, d: trace(m, d, n_samples=4),
    "spectral_density": lambda m, d: spectral_density(m, d, n_steps=2),
    "gradient_variance": lambda m, d: gradient_variance(m, d),
    "kfac_variance": lambda m, d: kfac_variance(m, d),
    "channel_gradient_norms": lambda m, d: channel_gradient_norms(m, d),
    "class_loss_imbalance": lambda m, d: class_loss_imbalance(m, d),
    "disagreement": lambda m, d: disagreement([m, m], d),
    "prediction_variance": lambda m, d: prediction_variance([m, m], d),
    "ensemble_metrics": lambda m, d: ensemble_metrics([m], d),
    "per_sample_sharpness": lambda m, d: per_sample_sharpness(m, d),
}

_X, _Y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
BAD_DATA = {
    "empty batch": ([(_X, _Y), (_X[:0], _Y[:0])], ValueError, "empty batch"),
    "no batches": ([], ValueError, "no batches"),
    "mismatched targets": ((_X, _Y[:3]), ValueError, r"leading dimension.*\[5\].*3 samples"),
    "0-d targets": ((_X, _Y[0]), ValueError, "batch dimension"),
    "a tensor": (_X, TypeError, "batch"),
    "triples": ([(_X, _Y, _Y)], TypeError, r"pair.*length 3; drop the extra entries"),
    "dicts": ([{"x": _X, "y": _Y}], TypeError, r"pair.*keys \['x', 'y'\]; make the dataset"),
}


@pytest.mark.parametrize("bad", list(BAD_DATA))
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_bad_data_is_a_clear_error(name, bad):
    data, exc, match = BAD_DATA[bad]
    model = _mlp()
    before = _state(model)
    with pytest.raises(exc, match=match):
        FUNCTIONS[name](model, data)
    _unchanged(model, before)


def test_one_shot_iterator_is_refused_by_curvature():
    model = _mlp()
    with pytest.raises(TypeError, match="re-iterable"):
        trace(model, iter([(_X, _Y)]), n_samples=4)


# --------------------------------------------------------------------------
# odd models
# --------------------------------------------------------------------------


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(6, 3)
        self.out = nn.Linear(3, 3)

    def forward(self, tokens):
        return self.out(torch.tanh(self.emb(tokens)).mean(1))


@given(batch=st.integers(2, 4), length=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_integer_inputs_embedding(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randint(0, 6, (batch, length), generator=g), torch.randint(0, 3, (batch,), generator=g))]
    model = Embed().double()
    before = _state(model)
    H = dense_hessian(model, data)
    assert trace(model, data, method="exact").value == pytest.approx(float(H.trace()), rel=1e-9, abs=1e-12)
    lam = top_eigenvalues(model, data, tol=1e-10).eigenvalues[0]
    assert float(lam) == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-7, abs=1e-10)
    ref = per_sample_trace_cov(model, data)
    assert gradient_variance(model, data).total == pytest.approx(ref, rel=1e-9, abs=1e-14)
    kv = kfac_variance(model, data)  # Embedding is not factored: computed exactly
    assert "emb" in kv.exact_layers
    assert flatness.sharpness(model, data, kind="l2", rho=0.01, n_iters=2).value >= 0
    _unchanged(model, before)


def test_frozen_parts_are_left_out_and_untouched():
    data = [(_X, _Y)]
    model = _mlp()
    model[0].weight.requires_grad_(False)
    before = _state(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trace(model, data, method="exact").value == pytest.approx(float(dense_hessian(model, data).trace()))
    assert trace(model, data, method="exact").value == trace(model, data, method="exact", params=trainable).value
    assert gradient_variance(model, data).total == pytest.approx(per_sample_trace_cov(model, data), rel=1e-9)
    r = flatness.sharpness(model, data, kind="linf", rho=0.01, n_iters=2)
    assert r.settings["params"] == ["0.bias", "2.weight", "2.bias"]
    # measuring with respect to the frozen weight is allowed and leaves it frozen
    frozen = flatness.sharpness(model, data, kind="linf", rho=0.01, n_iters=2, params=[model[0].weight])
    assert frozen.settings["params"] == ["0.weight"] and frozen.value >= 0
    _unchanged(model, before)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight  # tied
        self.c = nn.Linear(3, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_tied_parameters_count_once_with_both_uses():
    data = [(_X, _Y)]
    model = Tied().double()
    before = _state(model)
    H = dense_hessian(model, data)  # the tied tensor appears once, used twice
    assert H.shape[0] == 9 + 3 + 3 + 9 + 3
    assert trace(model, data, method="exact").value == pytest.approx(float(H.trace()), rel=1e-9)
    lam = top_eigenvalues(model, data, tol=1e-10).eigenvalues[0]
    assert float(lam) == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-7)
    ref = per_sample_trace_cov(model, data)
    assert gradient_variance(model, data).total == pytest.approx(ref, rel=1e-9)
    kv = kfac_variance(model, data)
    assert "a" in kv.exact_layers  # shared between two modules: not factored
    _unchanged(model, before)


class WithEmpty(nn.Module):
    """The MLP plus parameters of size 0 that take part in the forward."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp
        self.empty = nn.Parameter(torch.zeros(0, dtype=torch.float64))
        self.none_out = nn.Linear(3, 0).double()

    def forward(self, x):
        return self.mlp(x) + self.empty.sum() + self.none_out(x).sum()


def test_parameters_of_size_zero_change_nothing():
    data = [(_X[:3], _Y[:3]), (_X[3:], _Y[3:])]
    plain, odd = _mlp(), WithEmpty(_mlp())
    before = _state(odd)
    for kind in ("linf", "adaptive_l2", "avg_adaptive_linf"):
        a = flatness.sharpness(plain, data, kind=kind, rho=0.02, **_per_kind(kind, 3, 3))
        b = flatness.sharpness(odd, data, kind=kind, rho=0.02, **_per_kind(kind, 3, 3))
        assert a.value == pytest.approx(b.value, rel=1e-12, abs=1e-15), kind
    assert trace(odd, data, method="exact").value == pytest.approx(trace(plain, data, method="exact").value)
    assert top_eigenvalues(odd, data).eigenvalues[0] == pytest.approx(top_eigenvalues(plain, data).eigenvalues[0])
    assert gradient_variance(odd, data).total == pytest.approx(gradient_variance(plain, data).total)
    assert kfac_variance(odd, data).total == pytest.approx(kfac_variance(plain, data).total)
    assert channel_gradient_norms(odd, data).variance == pytest.approx(channel_gradient_norms(plain, data).variance)
    _unchanged(odd, before)


class Transposed(nn.Module):
    """A linear layer whose weight is a non-contiguous (transposed) tensor."""

    def __init__(self, contiguous: bool):
        super().__init__()
        torch.manual_seed(0)
        w = torch.randn(3, 3, dtype=torch.float64)
        self.w = nn.Parameter(w.t().contiguous() if contiguous else w.t())
        self.b = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(x @ self.w.t() + self.b)


def test_non_contiguous_parameters():
    data = [(_X, _Y)]
    nc, c = Transposed(False), Transposed(True)
    assert not nc.w.is_contiguous()
    before = _state(nc)
    for kind in ("linf", "l2", "adaptive_linf", "adaptive_l2"):
        assert flatness.sharpness(nc, data, kind=kind, rho=0.05, n_iters=3).value == pytest.approx(
            flatness.sharpness(c, data, kind=kind, rho=0.05, n_iters=3).value, rel=1e-10, abs=1e-14), kind
    H = dense_hessian(c, data)
    assert trace(nc, data, method="exact").value == pytest.approx(float(H.trace()), rel=1e-9)
    assert top_eigenvalues(nc, data, tol=1e-10).eigenvalues[0] == pytest.approx(
        float(torch.linalg.eigvalsh(H)[-1]), rel=1e-7)
    assert gradient_variance(nc, data).total == pytest.approx(per_sample_trace_cov(c, data), rel=1e-9)
    assert kfac_variance(nc, data).total == pytest.approx(gradient_variance(c, data).total, rel=1e-9)
    _unchanged(nc, before)  # still the same non-contiguous storage



PROGRESS_FUNCTIONS = {
    "sharpness": lambda m, d, **k: flatness.sharpness(m, d, kind="linf", rho=0.01, n_iters=1, **k),
    "avg_sharpness": lambda m, d, **k: flatness.sharpness(m, d, kind="avg_l2", rho=0.01, n_samples=1, **k),
    "sharpness_hessian_trace": lambda m, d, **k: flatness.sharpness(m, d, kind="hessian_trace", **k),
    "top_eigenvalues": lambda m, d, **k: top_eigenvalues(m, d, max_iter=2, **k),
    "trace": lambda m, d, **k: trace(m, d, n_samples=4, **k),
    "spectral_density": lambda m, d, **k: spectral_density(m, d, n_steps=2, **k),
    "minimum_sharpness": lambda m, d, **k: flatness.hessian.minimum_sharpness(m, d, **k),
    "gradient_variance": lambda m, d, **k: gradient_variance(m, d, **k),
    "kfac_variance": lambda m, d, **k: kfac_variance(m, d, **k),
    "channel_gradient_norms": lambda m, d, **k: channel_gradient_norms(m, d, **k),
    "class_loss_imbalance": lambda m, d, **k: class_loss_imbalance(m, d, **k),
    "per_sample_sharpness": lambda m, d, **k: per_sample_sharpness(m, d, **k),
    "landscape.slice": lambda m, d, **k: flatness.landscape.slice(
        m, d, flatness.landscape.directions(m, k=1), grid=3, **k),
    "landscape.interpolate": lambda m, d, **k: flatness.landscape.interpolate(m, _mlp(seed=1), d, n_points=3, **k),
}


@pytest.mark.parametrize("bad", ["False", 1, None])
@pytest.mark.parametrize("name", list(PROGRESS_FUNCTIONS))
def test_progress_must_be_a_bool(name, bad):
    # progress="False" (a string from a command line) showed a bar, and
    # progress=1 or None were taken for their truth, in silence.
    model = cases.mlp(0, (3, 4, 3), act=nn.ReLU, dtype=torch.float64)  # ReLU: minimum sharpness
    before = _state(model)
    with pytest.raises(TypeError, match="progress must be True or False"):
        PROGRESS_FUNCTIONS[name](model, [(_X, _Y)], progress=bad)
    _unchanged(model, before)
    PROGRESS_FUNCTIONS[name](model, [(_X, _Y)], progress=False)
