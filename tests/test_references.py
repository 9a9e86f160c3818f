"""Reference tests for public functions whose other tests check properties
only (unbiasedness over seeds, norms, counts, a lower loss).

Each test compares with a value written out independently: a closed form on
a tiny model, a dense float64 Hessian, a mixture computed with SciPy, an
exhaustive count.  Each one fails on a plausible one-line bug, named in
its docstring (most of them pass every other test).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from cases import DT, classification_batches, cnn, dense_ggn, dense_hessian, mlp, recomputed_bn_loss
from torch import nn

from flatness import diversity, hessian
from flatness import landscape as L

# --------------------------------------------------------------------------
# Hessian trace: a least-squares model whose Hessian is diagonal
# --------------------------------------------------------------------------


def _diagonal_least_squares():
    """``Linear(3, 2, bias=False)`` under mean squared error on inputs with
    orthogonal columns, ``X = diag(1, 2, 3)``: the loss is
    ``(1/6) sum_{n,k} (w_k . x_n - y_nk)**2``, so the Hessian is
    ``(2/6) diag(X^T X)`` for each output row, ``(1/3) diag(1, 4, 9, 1, 4, 9)``,
    of trace ``28/3``."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False).to(DT)
    x = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=DT))
    y = torch.randn(3, 2, dtype=DT)
    return model, (x, y)


def test_trace_estimators_are_exact_on_a_diagonal_hessian():
    """A Rademacher probe ``z`` has ``z_i**2 = 1``, so ``z^T D z = tr D`` for
    a diagonal ``D``: Hutchinson's estimate is the exact trace for every seed,
    with zero spread.  Hutch++ is exact once its sketch spans the space
    (``sketch >= n``).  The closed form is ``28/3``.

    Kills: Gaussian probes instead of Rademacher ones, a mean over
    ``n_samples - 1``, a Hutch++ sketch one column short of the space
    (the other tests of the estimates check their mean over seeds)."""
    model, batch = _diagonal_least_squares()
    H = dense_hessian(model, [batch], loss_fn=F.mse_loss)
    assert torch.allclose(H, torch.diag(torch.tensor([1, 4, 9, 1, 4, 9], dtype=DT) / 3), atol=1e-14)
    want = 28 / 3
    assert hessian.trace(model, batch, loss_fn=F.mse_loss, method="exact").value == pytest.approx(want, rel=1e-13)
    for seed in (0, 1, 2):
        r = hessian.trace(model, batch, loss_fn=F.mse_loss, method="hutchinson", n_samples=5, seed=seed)
        assert r.value == pytest.approx(want, rel=1e-13)
        assert r.std_error == pytest.approx(0.0, abs=1e-13)
        # each probe's quadratic form is the trace itself
        assert r.samples.tolist() == pytest.approx([want] * 5, rel=1e-13)
        r = hessian.trace(model, batch, loss_fn=F.mse_loss, method="hutch++", n_samples=3 * 6 + 2, sketch=6,
                          seed=seed)
        assert r.value == pytest.approx(want, rel=1e-12)
        # the sketch spans the space: the deflated forms (Hutch++'s samples) vanish
        assert r.samples.abs().max() <= 1e-12 * want


# --------------------------------------------------------------------------
# minimum sharpness, Hutchinson: each tensor's block diagonal
# --------------------------------------------------------------------------


def test_minimum_sharpness_hutchinson_is_exact_when_every_tensor_block_is_diagonal():
    """``Linear(1, 1) - ReLU - Linear(1, 2)`` under mean squared error: the
    first layer's weight and bias are scalars, and the second layer's output
    ``k`` depends on row ``k`` only, so the diagonal block of every parameter
    tensor is a diagonal matrix (the blocks between tensors are not).  The
    Hutchinson diagonal, which probes one tensor at a time, is then exact for
    any seed, and so is the minimum sharpness; the reference is the dense
    Hessian's diagonal.

    Kills: probing all tensors at once (the cross-tensor blocks then enter
    the estimate: still unbiased, only noisier)."""
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2)).to(DT)
    with torch.no_grad():
        model[0].weight.fill_(1.5)
        model[0].bias.fill_(0.2)
        model[2].weight.copy_(torch.tensor([[0.7], [-1.1]]))
        model[2].bias.copy_(torch.tensor([0.3, -0.4]))
    x = torch.linspace(0.5, 2.0, 6, dtype=DT)[:, None]
    y = torch.stack([torch.sin(3 * x[:, 0]), torch.cos(2 * x[:, 0])], 1)
    batch = (x, y)
    diag = dense_hessian(model, [batch], loss_fn=F.mse_loss).diagonal()
    # per-tensor traces of the dense diagonal: W1, b1, W2, b2
    want = [float(diag[0]), float(diag[1]), float(diag[2:4].sum()), float(diag[4:6].sum())]
    exact = hessian.minimum_sharpness(model, batch, loss_fn=F.mse_loss, method="exact")
    assert exact.layer_traces == pytest.approx([want[0], want[2]], rel=1e-12)
    assert exact.bias_traces == pytest.approx([want[1], want[3]], rel=1e-12)
    for seed in (0, 3):
        r = hessian.minimum_sharpness(model, batch, loss_fn=F.mse_loss, method="hutchinson", n_samples=3,
                                      seed=seed)
        assert r.layer_traces == pytest.approx([want[0], want[2]], rel=1e-12)
        assert r.bias_traces == pytest.approx([want[1], want[3]], rel=1e-12)
        assert r.trace == pytest.approx(sum(want), rel=1e-12)
        assert r.value == pytest.approx(exact.value, rel=1e-9)
        assert r.trace_std_error == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------
# SharpBalance's random baseline: uniform without replacement
# --------------------------------------------------------------------------


def test_random_split_draws_every_subset_equally_often():
    """``floor(flat_ratio * n)`` samples drawn uniformly without replacement:
    over 1200 seeds, each of the ``C(6, 3) = 20`` subsets of 3 of 6 samples
    appears about 60 times (a chi-square test at the 0.1 % level; the
    seeds are fixed, so the test is deterministic).

    Kills: a draw that never reaches the last sample (``randperm(n - 1)``
    when fewer than ``n`` are drawn); the property tests check only the
    count, the partition and that members differ."""
    from scipy.stats import chi2

    n, k, trials = 6, 3, 1200
    subsets = {s: 0 for s in itertools.combinations(range(n), k)}
    for seed in range(trials):
        sam, plain = diversity.random_split(n, 0, 0.5, seed=seed)
        subsets[tuple(sam.tolist())] += 1
        assert sorted(sam.tolist() + plain.tolist()) == list(range(n))
    expected = trials / len(subsets)
    stat = sum((c - expected) ** 2 / expected for c in subsets.values())
    assert stat < chi2.ppf(0.999, len(subsets) - 1), subsets
    # same=False: member 1's subsets follow the same law, independently of member 0's
    pairs = [(tuple(diversity.random_split(n, 0, 0.5, seed=s)[0].tolist()),
              tuple(diversity.random_split(n, 1, 0.5, seed=s)[0].tolist())) for s in range(200)]
    assert sum(a == b for a, b in pairs) < 200 * 3 / len(subsets)


# --------------------------------------------------------------------------
# spectral density: the smoothing and the quadrature
# --------------------------------------------------------------------------


def test_spectral_density_is_the_gaussian_mixture_of_the_quadrature():
    """With ``n_steps`` at least the number of parameters, Lanczos exhausts
    the space: every node carrying weight is an eigenvalue of the dense
    Hessian and each vector's weights sum to 1.  The density is
    ``mean_v sum_i w_vi N(t; theta_vi, sigma**2)`` (written out with
    SciPy), on a grid from ``lo - 5 sigma`` to ``hi + 5 sigma`` with
    ``sigma`` 1 % of the range of the nodes, as documented.

    Kills: a default ``sigma`` other than 1 % of the range, or a given
    ``sigma`` ignored: the density still integrates to 1, the other check
    of the smoothing."""
    from scipy.stats import norm

    model = mlp(sizes=(3, 3, 2))
    batches = [(torch.randn(7, 3, generator=torch.Generator().manual_seed(4), dtype=DT),
                torch.tensor([0, 1, 1, 0, 1, 0, 0]))]
    ev = torch.linalg.eigvalsh(dense_hessian(model, batches))
    n = ev.numel()
    d = hessian.spectral_density(model, batches, n_vectors=3, n_steps=n, grid_size=200, seed=0)
    used = d.weights > 1e-10
    gap = (d.nodes[used][:, None] - ev[None]).abs().min(1).values
    assert float(gap.max()) <= 1e-7 * float(ev.abs().max())
    assert torch.allclose(d.weights.sum(1), torch.ones(3, dtype=DT), atol=1e-12)
    lo, hi = float(d.nodes[d.weights > 0].min()), float(d.nodes[d.weights > 0].max())
    assert d.sigma == pytest.approx(0.01 * (hi - lo), rel=1e-12)
    assert float(d.grid[0]) == pytest.approx(lo - 5 * d.sigma, rel=1e-12, abs=1e-15)
    assert float(d.grid[-1]) == pytest.approx(hi + 5 * d.sigma, rel=1e-12, abs=1e-15)
    # the default sigma, and one given
    given = hessian.spectral_density(model, batches, n_vectors=3, n_steps=n, grid_size=200, seed=0, sigma=0.05)
    assert given.sigma == 0.05 and float(given.grid[-1]) == pytest.approx(hi + 0.25, rel=1e-12)
    for r in (d, given):
        t = r.grid.numpy()[:, None, None]
        ref = (r.weights.numpy()[None] * norm.pdf(t, loc=r.nodes.numpy()[None], scale=r.sigma)).sum(-1).mean(-1)
        assert torch.allclose(r.density, torch.as_tensor(ref), rtol=1e-10, atol=1e-12 * float(ref.max()))


# --------------------------------------------------------------------------
# temperature scaling: a closed form
# --------------------------------------------------------------------------


def test_fit_temperature_closed_form_for_two_classes():
    """Two classes, logit margin ``a`` on every sample, a fraction ``q`` of
    them correct: the NLL at inverse temperature ``b`` is
    ``q log(1 + e^{-ab}) + (1 - q) log(1 + e^{ab})``, stationary where
    ``sigmoid(ab) = q``, so ``T = a / log(q / (1 - q))``.  Here ``a = 2``,
    ``q = 3/4``: ``T = 2 / log 3``.  A per-sample shift of the logits
    (log-probabilities instead) changes nothing.

    Kills: scaling by ``T`` instead of ``1/T`` (gives ``log 3 / 2``)."""
    z = torch.tensor([[2.0, 0.0]] * 4, dtype=DT)
    y = torch.tensor([0, 0, 0, 1])
    want = 2 / math.log(3)
    assert diversity.fit_temperature(z, y) == pytest.approx(want, rel=1e-6)
    assert diversity.fit_temperature(torch.log_softmax(z, -1) + 5.0, y) == pytest.approx(want, rel=1e-6)
    # more correct samples: a sharper, colder fit (q = 7/8: T = 2 / log 7)
    z8, y8 = torch.tensor([[2.0, 0.0]] * 8, dtype=DT), torch.tensor([0] * 7 + [1])
    assert diversity.fit_temperature(z8, y8) == pytest.approx(2 / math.log(7), rel=1e-6)


# --------------------------------------------------------------------------
# loss-landscape directions: Li et al.'s normalisation of the random draw
# --------------------------------------------------------------------------


def test_filter_and_layer_directions_rescale_the_random_draw():
    """``kind="filter"`` and ``"layer"`` are the ``kind="random"`` draw of
    the same seed with each filter (each tensor) rescaled to the weights'
    norm: ``d_f |w_f| / |d_f|``, written out here; one-dimensional tensors
    get zero (``bias="zero"``).

    Kills: returning the weights themselves rescaled (``w |w| / |w|``) as the
    direction, which has exactly the norms the other test checks."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)).to(DT)
    rnd = L.directions(model, "random", seed=5)
    filt = L.directions(model, "filter", seed=5)
    lay = L.directions(model, "layer", seed=5)
    for j in range(2):
        for p, r, f, g in zip(model.parameters(), rnd[j], filt[j], lay[j]):
            w = p.detach()
            if w.dim() <= 1:
                assert torch.equal(f, torch.zeros_like(w)) and torch.equal(g, torch.zeros_like(w))
                continue
            rows_r, rows_w = r.reshape(r.shape[0], -1), w.reshape(w.shape[0], -1)
            want = rows_r * (rows_w.norm(dim=1) / rows_r.norm(dim=1))[:, None]
            assert torch.allclose(f, want.reshape(w.shape), rtol=1e-13, atol=0)
            assert torch.allclose(g, r * (w.norm() / r.norm()), rtol=1e-13, atol=0)


# --------------------------------------------------------------------------
# top eigenpairs: the reported residuals
# --------------------------------------------------------------------------


@pytest.mark.parametrize("block_size, which", [(1, "LA"), (2, "SA")])
def test_eigen_residuals_are_those_of_the_dense_hessian(block_size, which):
    """``residuals[i]`` is documented as ``||H y_i - lambda_i y_i||``: after
    six steps, far from convergence, it equals that norm computed with the
    dense Hessian and the returned pair (the recurrence gives it without a
    product).  The low-memory recurrence reports the same values.

    Kills: the low-memory recurrence's residual without its ``beta``, and
    the residual taken from the first block of the Ritz vectors instead of
    the last (``S[:b]``); no other test reads the public field."""
    model = mlp(sizes=(5, 6, 4))
    batches = classification_batches((9,), (5,), 4)
    H = dense_hessian(model, batches)
    r = hessian.top_eigenvalues(model, batches, k=2, max_iter=6, block_size=block_size, which=which)
    assert not r.converged
    want = []
    for theta, vec in zip(r.eigenvalues, r.eigenvectors):
        y = torch.cat([v.reshape(-1) for v in vec])
        want.append(float((H @ y - theta * y).norm()))
    assert min(want) > 1e-3  # far from converged: the comparison means something
    assert r.residuals.tolist() == pytest.approx(want, rel=1e-8)
    if block_size == 1:
        lean = hessian.top_eigenvalues(model, batches, k=2, max_iter=6, which=which, low_memory=True)
        assert lean.residuals.tolist() == pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------------------
# loss landscapes: PCA variances and the barrier curves
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_pca_explained_variance_matches_scikit_learn(k):
    """``kind="pca"`` with ``center=True`` is scikit-learn's PCA of the
    checkpoints' differences from the weights (as the paper's code runs it):
    the same components up to sign, explained variances (``s**2 / (m - 1)``)
    and ratios.

    Kills: the variance divided by ``m`` instead of ``m - 1``; the other
    test reads only the ratios."""
    decomposition = pytest.importorskip("sklearn.decomposition")
    model = mlp(sizes=(3, 4, 2))
    g = torch.Generator().manual_seed(7)
    names = [n for n, _ in model.named_parameters()]
    ckpts = [{n: p.detach() + torch.randn(p.shape, generator=g, dtype=DT) * (0.5 + i) for n, p in
              model.named_parameters()} for i in range(5)]
    d = L.directions(model, "pca", k=k, checkpoints=ckpts)
    final = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    X = torch.stack([torch.cat([c[n].reshape(-1) for n in names]) - final for c in ckpts]).numpy()
    pca = decomposition.PCA(n_components=k, svd_solver="full").fit(X)
    assert d.explained_variance == pytest.approx(pca.explained_variance_.tolist(), rel=1e-10)
    assert d.explained_variance_ratio == pytest.approx(pca.explained_variance_ratio_.tolist(), rel=1e-10)
    for i in range(k):
        ours = torch.cat([t.reshape(-1) for t in d[i]]).numpy()
        assert abs(float(ours @ pca.components_[i])) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("on", ["loss", "error"])
def test_barrier_curves_are_the_loss_and_error_along_each_line(on):
    """``curves["i-j"]`` is the loss (or the error rate) of
    ``(1 - t) w_i + t w_j`` at the points ``t``, computed here with
    ``functional_call``; the Frankle barrier of each pair is the curve's
    maximum minus the mean of its ends.

    Kills: the accuracy stored as the error curve (``r.accuracy`` for
    ``1 - r.accuracy``), or the pair's line taken from ``j`` to ``i``; the
    other tests read only the key names of ``curves``."""
    from torch.func import functional_call

    models = [mlp(seed=s, sizes=(4, 5, 3), act=nn.ReLU) for s in (1, 2, 3)]
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(4))
    res = L.loss_barrier(models, (x, y), n_points=5, kind="frankle", on=on)
    assert res.t == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        want = []
        for t in res.t:
            params = {n: (1 - t) * a.detach() + t * b.detach()
                      for (n, a), b in zip(models[i].named_parameters(), models[j].parameters())}
            z = functional_call(models[0], params, (x,))
            want.append(float(F.cross_entropy(z, y)) if on == "loss"
                        else 1 - float((z.argmax(1) == y).double().mean()))
        assert res.curves[f"{i}-{j}"] == pytest.approx(want, rel=1e-12, abs=1e-14)
        assert float(res.matrix[i, j]) == pytest.approx(max(want) - 0.5 * (want[0] + want[-1]), rel=1e-12,
                                                        abs=1e-14)


def test_bn_recompute_on_the_first_bn_batches_only():
    """``bn="recompute", bn_batches=1``: at each point the BatchNorm
    statistics are those of one training-mode pass over the first batch of
    ``bn_data`` (default: ``data``), then the loss is the size-weighted mean
    over all of ``data``; recomputed here by hand on a copy of the model.

    Kills: ``bn_batches`` not passed on (every batch then enters the
    statistics); no other test sets it."""
    model = cnn()
    batches = classification_batches((5, 4, 6), (1, 6, 6), 3)
    d = L.directions(model, "filter", seed=0)
    res = L.slice(model, batches, d, grid=(-0.5, 0.5, 3), bn="recompute", bn_batches=1)
    coords = [-0.5, 0.0, 0.5]
    for i, j in [(0, 2), (1, 1), (2, 0)]:
        want = recomputed_bn_loss(model, d, coords[i], coords[j], [batches[0][0]], batches)
        assert float(res.loss[i, j]) == pytest.approx(want, rel=1e-10)


# --------------------------------------------------------------------------
# the public Hessian- and GGN-vector products
# --------------------------------------------------------------------------


def test_public_hvp_equals_dense_products():
    """``hessian.hvp`` against the dense float64 Hessian (two uneven
    batches: the size-weighted mean loss), its block for ``params=``, and
    the dense Gauss-Newton matrix ``J^T H_z J`` for ``curvature="ggn"``.

    Kills: ``curvature`` not passed on to the operator (the Hessian comes
    back for ``"ggn"``); the other test of the public function checks only
    that single and batched calls agree."""
    model = mlp(sizes=(4, 5, 3))
    batches = classification_batches((6, 3), (4,), 3)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(2)
    vs = [torch.randn(2, *p.shape, generator=g, dtype=DT) for p in params]
    flat = torch.stack([torch.cat([v[i].reshape(-1) for v in vs]) for i in range(2)], 1)

    def flat_out(out):
        return torch.stack([torch.cat([o[i].reshape(-1) for o in out]) for i in range(2)], 1)

    H = dense_hessian(model, batches)
    assert torch.allclose(flat_out(hessian.hvp(model, batches, vs)), H @ flat, rtol=1e-10, atol=1e-12)
    single = hessian.hvp(model, batches, [v[1] for v in vs])
    assert torch.allclose(torch.cat([o.reshape(-1) for o in single]), H @ flat[:, 1], rtol=1e-10, atol=1e-12)
    # a block: the last layer's weight and bias
    head = model[2]
    n_head = head.weight.numel() + head.bias.numel()
    out = hessian.hvp(model, batches, [vs[2][0], vs[3][0]], params=[head])
    assert torch.allclose(torch.cat([o.reshape(-1) for o in out]), H[-n_head:, -n_head:] @ flat[-n_head:, 0],
                          rtol=1e-10, atol=1e-12)
    # the Gauss-Newton matrix, one batch
    G = dense_ggn(model, batches[0])
    model.eval()
    got = flat_out(hessian.hvp(model, batches[0], vs, curvature="ggn"))
    assert torch.allclose(got, G @ flat, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(G, dense_hessian(model, batches[:1]), atol=1e-6)  # they differ here


def test_trace_and_density_of_the_ggn_and_of_a_block_equal_the_dense_ones():
    """``trace(curvature="ggn")`` is the trace of the dense ``J^T H_z J``,
    ``trace(params=[head])`` that of the dense Hessian's block, and an
    exhaustive ``spectral_density(curvature="ggn")`` puts its nodes on the
    GGN's eigenvalues (which are not the Hessian's here).

    Kills: ``curvature`` or ``params`` not passed on by ``trace`` or
    ``spectral_density``; no other test compares their GGN or block values
    with a reference."""
    model = mlp(sizes=(4, 5, 3))
    batch = classification_batches((7,), (4,), 3)[0]
    G = dense_ggn(model, batch)
    H = dense_hessian(model, [batch])
    assert abs(float(G.trace() - H.trace())) > 1e-6
    t = hessian.trace(model, batch, method="exact", curvature="ggn").value
    assert t == pytest.approx(float(G.trace()), rel=1e-10)
    head = model[2]
    n_head = head.weight.numel() + head.bias.numel()
    t = hessian.trace(model, batch, method="exact", params=[head]).value
    assert t == pytest.approx(float(H[-n_head:, -n_head:].trace()), rel=1e-10)
    ev = torch.linalg.eigvalsh(G)
    d = hessian.spectral_density(model, batch, n_vectors=2, n_steps=G.shape[0], curvature="ggn")
    used = d.weights > 1e-10
    gap = (d.nodes[used][:, None] - ev[None]).abs().min(1).values
    assert float(gap.max()) <= 1e-7 * float(ev.abs().max())
