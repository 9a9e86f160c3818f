"""The matvec-only algorithms on explicit symmetric matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cases import peak_allocated

from flatness._lanczos import (
    exact_diagonal,
    gaussian_density,
    hutchinson,
    hutchpp,
    lanczos,
    slq_nodes,
)

DT = torch.float64


def _matrix(n: int, eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g))
    return Q @ torch.diag(eigenvalues) @ Q.T


def _spectrum(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bulk = torch.rand(n - 6, dtype=DT, generator=g) * 3 - 1
    return torch.cat([torch.tensor([10.0, 9.0, 8.5, -12.0, -11.0, -10.5], dtype=DT), bulk])


@pytest.mark.parametrize("block_size", [1, 2, 4])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_lanczos_extreme_eigenpairs(which, block_size):
    n = 120
    ev = _spectrum(n)
    A = _matrix(n, ev)
    res = lanczos(lambda V: A @ V, n, 3, which=which, tol=1e-10, block_size=block_size,
                  generator=torch.Generator().manual_seed(1))
    if which == "LA":
        want = torch.sort(ev, descending=True).values[:3]
    elif which == "SA":
        want = torch.sort(ev).values[:3]
    else:
        want = ev[torch.argsort(ev.abs(), descending=True)][:3]
    assert res.converged
    assert torch.allclose(res.eigenvalues, want, rtol=1e-9, atol=0)
    Y = res.eigenvectors
    assert torch.allclose(Y.T @ Y, torch.eye(3, dtype=DT), atol=1e-10)
    assert torch.allclose(A @ Y, Y * res.eigenvalues, atol=1e-8)
    assert res.n_matvec == res.n_iter * block_size


def test_lanczos_exhausts_small_space_and_counts_products():
    # 3 distinct eigenvalues: the Krylov space is invariant after 3 steps.
    n = 50
    ev = torch.tensor([5.0] * 10 + [2.0] * 20 + [-1.0] * 20, dtype=DT)
    A = _matrix(n, ev)
    calls = []

    def mm(V):
        calls.append(V.shape[1])
        return A @ V

    res = lanczos(mm, n, 1, tol=1e-12, generator=torch.Generator().manual_seed(0))
    assert res.converged and res.n_iter <= 4
    assert res.eigenvalues[0].item() == pytest.approx(5.0, rel=1e-12)
    assert sum(calls) == res.n_matvec




@pytest.mark.parametrize("block_size", [1, 2])
def test_lanczos_memory_is_the_basis_plus_a_few_vectors(block_size):
    # Full reorthogonalization must keep every basis vector (8 n bytes each)
    # but nothing more than a few n-sized temporaries: growing one tensor by
    # doubling held the old and the grown basis at once (about twice this).
    n, steps = 100_000, 20
    d = torch.linspace(-1, 1, n, dtype=DT)
    g = torch.Generator().manual_seed(0)
    res = []
    peak = peak_allocated(lambda: res.append(lanczos(
        lambda V: d[:, None] * V, n, 1, max_iter=steps, tol=1e-14, generator=g, block_size=block_size,
    )))
    assert res[0].n_iter == steps
    vectors = peak / (8 * n)
    assert vectors <= steps * block_size + 3 * block_size, vectors


def test_lanczos_input_errors():
    A = torch.eye(4, dtype=DT)
    with pytest.raises(ValueError, match="which"):
        lanczos(lambda V: A @ V, 4, 1, which="BE")
    with pytest.raises(ValueError, match="k must"):
        lanczos(lambda V: A @ V, 4, 5)


def test_trace_estimators_unbiased_and_standard_errors_honest():
    n = 60
    ev = _spectrum(n, seed=2)
    A = _matrix(n, ev, seed=2)
    exact = float(ev.sum())
    for estimator, m in ((hutchinson, 12), (hutchpp, 12)):
        est, ses = [], []
        for seed in range(40):
            value, se, _ = estimator(lambda V: A @ V, n, m, generator=torch.Generator().manual_seed(seed))
            est.append(value)
            ses.append(se)
        est_t = torch.tensor(est)
        spread = float(est_t.std())
        assert abs(float(est_t.mean()) - exact) <= 3 * spread / math.sqrt(len(est))
        # the reported standard error describes the spread over seeds
        assert 0.5 <= float(np.mean(ses)) / spread <= 2.0
    # Hutch++ wins when a few eigenvalues dominate (here 4 of 60)
    spiky = torch.cat([torch.tensor([100.0, 80, 60, 40], dtype=DT), torch.rand(n - 4, dtype=DT)])
    B = _matrix(n, spiky)
    hp = [hutchpp(lambda V: B @ V, n, 30, generator=torch.Generator().manual_seed(s))[0] for s in range(10)]
    hu = [hutchinson(lambda V: B @ V, n, 30, generator=torch.Generator().manual_seed(s))[0] for s in range(10)]
    assert np.std(hp) < np.std(hu) / 3


def test_trace_estimators_need_enough_samples():
    A = torch.eye(5, dtype=DT)
    with pytest.raises(ValueError, match="n_samples"):
        hutchinson(lambda V: A @ V, 5, 1, generator=torch.Generator())
    with pytest.raises(ValueError, match="n_samples"):
        hutchpp(lambda V: A @ V, 5, 3, generator=torch.Generator())


def test_exact_diagonal():
    A = _matrix(13, _spectrum(13))
    assert torch.allclose(exact_diagonal(lambda V: A @ V, 13, batch=4), torch.diagonal(A), atol=1e-14)


def test_slq_quadrature_is_exact_for_low_degree_moments():
    n = 40
    ev = _spectrum(n, seed=3)
    A = _matrix(n, ev, seed=3)
    steps = 6
    # with the unit vectors as starts, sum_v e_v^T A^p e_v = tr(A^p) exactly
    nodes, weights = slq_nodes(lambda V: A @ V, n, n, steps, vectors=torch.eye(n, dtype=DT))
    assert torch.allclose(weights.sum(1), torch.ones(n, dtype=DT), atol=1e-12)
    for p in range(2 * steps):
        got = float((weights * nodes**p).sum(1).mean())
        want = float((ev**p).mean())
        assert got == pytest.approx(want, rel=1e-9), p


def test_slq_density_integrates_to_one_with_random_starts():
    n = 40
    ev = _spectrum(n, seed=4)
    A = _matrix(n, ev, seed=4)
    nodes, weights = slq_nodes(lambda V: A @ V, n, 30, 40, generator=torch.Generator().manual_seed(0))
    per_vector = (weights * nodes**2).sum(1)
    se = float(per_vector.std() / math.sqrt(len(per_vector)))
    assert abs(float(per_vector.mean()) - float((ev**2).mean())) <= 3 * se
    sigma = 0.2
    grid = torch.linspace(float(nodes.min()) - 6 * sigma, float(nodes.max()) + 6 * sigma, 4000, dtype=DT)
    density = gaussian_density(nodes, weights, grid, sigma)
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-8)
    mean = float(torch.trapezoid(density * grid, grid))
    assert mean == pytest.approx(float((weights * nodes).sum(1).mean()), abs=1e-8)
    # second moment of the smoothed density adds sigma^2
    second = float(torch.trapezoid(density * grid**2, grid))
    assert second == pytest.approx(float(per_vector.mean()) + sigma**2, rel=1e-8)


# --------------------------------------------------------------------------
# memory-saving modes: float32 basis, basis on another device, no basis
# --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_float32_basis_matches_float64_to_float32_resolution(which):
    n = 300
    ev = _spectrum(n)
    A = _matrix(n, ev)
    ref = lanczos(lambda V: A @ V, n, 3, which=which, tol=1e-10, generator=torch.Generator().manual_seed(1))
    res = lanczos(lambda V: A.to(V.dtype) @ V, n, 3, which=which, tol=1e-5,
                  generator=torch.Generator().manual_seed(1), basis_dtype=torch.float32)
    assert res.converged and res.eigenvectors.dtype == torch.float32
    scale = float(ev.abs().max())
    # the documented accuracy: about 1e-6 * max |lambda|
    assert torch.allclose(res.eigenvalues, ref.eigenvalues, rtol=0, atol=1e-6 * scale)
    Y = res.eigenvectors.double()
    assert torch.allclose(A @ Y, Y * res.eigenvalues, atol=1e-4 * scale)


def test_basis_device_keeps_the_basis_where_asked():
    n = 50
    A = _matrix(n, _spectrum(n))
    devices = []

    def mm(V):
        devices.append(V.device)
        return A @ V

    res = lanczos(mm, n, 2, tol=1e-10, generator=torch.Generator().manual_seed(0), basis_device="cpu")
    assert res.eigenvectors.device.type == "cpu" and set(d.type for d in devices) == {"cpu"}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_recurrence_without_basis_finds_each_eigenvalue_once(which, seed):
    # Many more steps than convergence needs: without reorthogonalization the
    # converged eigenvalues come back as copies (checked below), which must be
    # merged, and spurious Ritz values must not enter the answer.
    n = 600
    ev = _spectrum(n, seed=seed)
    A = _matrix(n, ev, seed=seed)
    if which == "LA":
        want = torch.sort(ev, descending=True).values[:3]
    elif which == "SA":
        want = torch.sort(ev).values[:3]
    else:
        want = ev[torch.argsort(ev.abs(), descending=True)][:3]
    for steps in (60, 150, 250):
        res = lanczos(lambda V: A @ V, n, 3, which=which, tol=1e-300, max_iter=steps,
                      generator=torch.Generator().manual_seed(seed), store_basis=False)
        assert res.eigenvectors.shape == (n, 0)
        assert torch.allclose(res.eigenvalues, want, rtol=1e-9, atol=0), (steps, res.eigenvalues)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_float32_recurrence_matches_float64(which, seed):
    # The recurrence in float32 vectors (float64 dot products) on a float32
    # operator: copies of a converged eigenvalue differ by up to about
    # 1e-5 * max |lambda| (not 1e-8 as in float64) and must still be merged;
    # the eigenvalues agree with the float64 run to float32's resolution.
    n = 600
    ev = _spectrum(n, seed=seed)
    A = _matrix(n, ev, seed=seed)
    A32 = A.float()
    scale = float(ev.abs().max())
    for steps in (60, 250):
        kw = dict(which=which, tol=1e-300, max_iter=steps, generator=torch.Generator().manual_seed(seed),
                  store_basis=False)
        ref = lanczos(lambda V: A @ V, n, 3, **kw)
        kw["generator"] = torch.Generator().manual_seed(seed)
        res = lanczos(lambda V: A32 @ V, n, 3, basis_dtype=torch.float32, **kw)
        assert res.eigenvectors.dtype == torch.float32
        assert torch.allclose(res.eigenvalues, ref.eigenvalues, rtol=0, atol=1e-5 * scale), (steps, res.eigenvalues)


def test_float32_recurrence_dot_products_are_float64():
    from flatness._lanczos import _dot

    x = torch.full((3 * (1 << 18) + 5,), 1 + 2**-12, dtype=torch.float32)
    want = math.fsum([float(1 + 2**-12) ** 2] * x.numel())
    assert _dot(x, x) == pytest.approx(want, rel=1e-14)
    # two different vectors share no scratch block: each block of y is
    # converted into its own, including the short last one
    y = torch.randn(x.numel(), generator=torch.Generator().manual_seed(0))
    want = math.fsum((x.double() * y.double()).tolist())
    assert _dot(x, y) == pytest.approx(want, rel=1e-12, abs=1e-9)
    assert _dot(y, y) == pytest.approx(math.fsum((y.double() ** 2).tolist()), rel=1e-12)


def test_recurrence_without_basis_produces_copies_that_are_merged():
    # Control for the test above: the raw tridiagonal spectrum after many
    # steps does hold copies of the top eigenvalue.
    import flatness._lanczos as L

    n = 600
    ev = _spectrum(n)
    A = _matrix(n, ev)
    raw = []
    original = L._good_ritz

    def spy(theta, *args):
        raw.append(theta.copy())
        return original(theta, *args)

    L._good_ritz = spy
    try:
        res = lanczos(lambda V: A @ V, n, 1, tol=1e-300, max_iter=250,
                      generator=torch.Generator().manual_seed(0), store_basis=False)
    finally:
        L._good_ritz = original
    copies = int(np.sum(np.abs(raw[-1] - 10.0) < 1e-8))
    assert copies >= 2
    assert res.eigenvalues.tolist() == pytest.approx([10.0], rel=1e-12)


def test_good_ritz_removes_a_spurious_value():
    # T with a decoupled trailing block: its eigenvalue 7 is simple and is
    # also an eigenvalue of T without its first row and column (the start
    # vector never sees it), so Cullum-Willoughby removes it.
    from flatness._lanczos import _good_ritz

    d = [1.0, 2.0, 7.0]
    e = [0.5, 0.0]
    theta, U = __import__("scipy.linalg").linalg.eigh_tridiagonal(np.array(d), np.array(e))
    values, _ = _good_ritz(theta, np.ones(3), d, e, 7.0)
    assert 7.0 not in values.tolist() and len(values) == 2


def test_store_basis_false_needs_block_size_one_and_dtype_checked():
    A = torch.eye(4, dtype=DT)
    with pytest.raises(ValueError, match="block_size"):
        lanczos(lambda V: A @ V, 4, 1, block_size=2, store_basis=False)
    with pytest.raises(ValueError, match="basis_dtype"):
        lanczos(lambda V: A @ V, 4, 1, basis_dtype=torch.float16)


def test_memory_of_float32_basis_and_of_the_recurrence():
    n, steps = 100_000, 20
    d = torch.linspace(-1, 1, n, dtype=DT)
    peaks = {}
    for name, kw in (("f64", {}), ("f32", {"basis_dtype": torch.float32}), ("none", {"store_basis": False})):
        g = torch.Generator().manual_seed(0)
        res = []
        peaks[name] = peak_allocated(lambda: res.append(lanczos(
            lambda V: d.to(V.dtype)[:, None] * V, n, 1, max_iter=steps, tol=1e-300, generator=g, **kw,
        )))
        assert res[0].n_iter == steps
    # in float64 vectors (8 n bytes): the float32 basis is half, the
    # recurrence a handful whatever the number of steps
    assert peaks["f32"] / (8 * n) <= steps / 2 + 3, peaks
    assert peaks["none"] / (8 * n) <= 5, peaks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trace_estimators_hold_batch_vectors_at_a_time(dtype):
    # Vectors are drawn block by block in the operator's dtype: with batch=1
    # the estimators hold a vector, its product and (Hutch++) the sketch.
    n, m = 100_000, 12
    d = torch.linspace(-1, 1, n, dtype=dtype)
    size = n * d.element_size()
    for estimator, sketch in ((hutchinson, 0), (hutchpp, m // 3)):
        out = []
        peak = peak_allocated(lambda: out.append(estimator(
            lambda V: d[:, None] * V, n, m, generator=torch.Generator().manual_seed(0), batch=1, dtype=dtype,
        )))
        assert out[0][0] == pytest.approx(float(d.double().sum()), abs=1e-3 * n)
        # the sketch Q for Hutch++ (orthonormalized in place), then a few vectors
        assert peak / size <= sketch + 4, (estimator.__name__, peak / size)


def test_orthonormalize_in_place_matches_qr_range():
    from flatness._lanczos import _orthonormalize_

    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 4, dtype=DT, generator=g)
    X[:, 3] = X[:, 0] + 2 * X[:, 1]  # dependent column
    Q = _orthonormalize_(X.clone())
    assert torch.allclose(Q[:, :3].T @ Q[:, :3], torch.eye(3, dtype=DT), atol=1e-12)
    assert torch.count_nonzero(Q[:, 3]) == 0
    P_ref = torch.linalg.qr(X[:, :3])[0]
    assert torch.allclose(Q[:, :3] @ Q[:, :3].T, P_ref @ P_ref.T, atol=1e-12)


@pytest.mark.parametrize("store_basis", [True, False])
def test_lanczos_matmat_returning_its_argument(store_basis):
    # the iteration updates A q in place unless it shares memory with q: an
    # operator that returns its argument or a view of it must not corrupt
    # the basis (the identity has the one eigenvalue 1)
    n = 30
    for op, want in ((lambda V: V + V, 2.0), (lambda V: V, 1.0), (lambda V: V.view_as(V), 1.0)):
        r = lanczos(op, n, 1, tol=1e-10, generator=torch.Generator().manual_seed(0), store_basis=store_basis)
        assert r.eigenvalues[0].item() == pytest.approx(want, rel=1e-12)
        assert r.converged
        if store_basis:  # the Ritz vector comes from the stored basis
            assert r.eigenvectors[:, 0].norm().item() == pytest.approx(1.0, rel=1e-12)


def test_recurrence_merges_copies_at_the_products_precision():
    # float64 vectors through a float32 operator (a float32 model's HVPs):
    # the copies that loss of orthogonality makes of a converged eigenvalue
    # agree only to float32's rounding.  Merged at float64's resolution they
    # were reported as distinct eigenvalues (3 seeds of these 20 did);
    # product_dtype merges them at the products' own resolution.
    gen = torch.Generator().manual_seed(0)
    n = 60
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    top = torch.tensor([10.0, 9.0, 8.0], dtype=torch.float64)
    A32 = ((U * torch.cat([top, torch.rand(n - 3, dtype=torch.float64, generator=gen)])) @ U.T).float()

    def matmat(V):
        return (A32 @ V.float()).double()

    for seed in range(20):
        res = lanczos(matmat, n, 3, tol=1e-9, max_iter=150, generator=torch.Generator().manual_seed(seed),
                      store_basis=False, product_dtype=torch.float32)
        assert torch.allclose(res.eigenvalues, top, rtol=0, atol=1e-4), (seed, res.eigenvalues)


def test_block_lanczos_with_a_vanishing_column_does_not_claim_convergence():
    # The start block's first column is an eigenvector: the next block's
    # first column vanishes while the second does not.  The Ritz values of
    # the first block are then not eigenvalues (the second column still
    # couples to the rest of the space), and must not be reported converged.
    n = 40
    ev = _spectrum(n)
    A = _matrix(n, ev)
    _, U = torch.linalg.eigh(A)
    g = torch.Generator().manual_seed(3)
    v0 = torch.stack([U[:, 5], torch.randn(n, dtype=DT, generator=g)], dim=1)
    res = lanczos(lambda V: A @ V, n, 2, tol=1e-10, block_size=2, v0=v0, generator=g)
    Y = res.eigenvectors
    true = torch.linalg.norm(A @ Y - Y * res.eigenvalues, dim=0)
    assert torch.allclose(true, res.residuals, atol=1e-9)
    if res.converged:
        assert torch.allclose(res.eigenvalues, torch.sort(ev, descending=True).values[:2], rtol=1e-9, atol=0)


@pytest.mark.parametrize("block_size", [1, 2, 3])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("spectrum, k", [
    ([3.0] * 30, 4),                                   # a multiple of the identity
    ([5.0] + [2.0] * 14 + [1.0] * 15, 4),              # fewer distinct eigenvalues than k
    ([4.0, 4.0, -6.0] + [0.0] * 27, 5),                # rank 3 (rank-deficient)
    ([5.0, 4.0, 3.0, 2.0, 1.0, 4.0] + [1.0] * 24, 3),  # a copy of the second largest
])
def test_lanczos_restarts_when_the_krylov_space_is_invariant(spectrum, k, which, block_size):
    # The Krylov space of a start block holds each eigenvalue at most
    # block_size times and becomes invariant after as many steps as there are
    # distinct eigenvalues: the iteration must go on from a random vector
    # orthogonal to the basis and return k correct values, not fewer.
    ev = torch.tensor(spectrum, dtype=DT)
    n = len(spectrum)
    A = _matrix(n, ev, seed=2)
    res = lanczos(lambda V: A @ V, n, k, which=which, tol=1e-10, block_size=block_size,
                  generator=torch.Generator().manual_seed(4))
    if which == "LA":
        want = torch.sort(ev, descending=True).values[:k]
    elif which == "SA":
        want = torch.sort(ev).values[:k]
    else:
        want = torch.sort(ev.abs(), descending=True).values[:k]
    got = res.eigenvalues.abs() if which == "LM" else res.eigenvalues
    assert res.converged and len(res.eigenvalues) == k
    assert torch.allclose(got, want, rtol=0, atol=1e-9), (res.eigenvalues, want)
    Y = res.eigenvectors
    assert torch.allclose(Y.T @ Y, torch.eye(k, dtype=DT), atol=1e-10)
    assert torch.allclose(A @ Y, Y * res.eigenvalues, atol=1e-8)
    assert res.n_matvec < n  # not a walk through the whole space


@pytest.mark.parametrize("n, block_size", [(10, 4), (11, 3), (7, 6)])
def test_block_size_that_does_not_divide_the_dimension(n, block_size):
    # The last block has fewer directions left than columns: the extra
    # columns must not be rounding noise (which made the projected matrix
    # meaningless), and the run ends exact once the basis spans the space.
    g = torch.Generator().manual_seed(n)
    ev = torch.randn(n, dtype=DT, generator=g) * 3
    A = _matrix(n, ev, seed=n)
    k = n - 1
    res = lanczos(lambda V: A @ V, n, k, tol=1e-14, block_size=block_size, generator=g)
    assert res.converged
    assert torch.allclose(res.eigenvalues, torch.sort(ev, descending=True).values[:k], rtol=0, atol=1e-10)
    Y = res.eigenvectors
    assert torch.allclose(Y.T @ Y, torch.eye(k, dtype=DT), atol=1e-10)
    assert torch.allclose(A @ Y, Y * res.eigenvalues, atol=1e-9)


@pytest.mark.parametrize("store_basis", [True, False])
def test_too_few_steps_for_k_values_is_refused_before_any_product(store_basis):
    A = torch.diag(torch.arange(1.0, 21.0, dtype=DT))
    calls = []

    def mm(V):
        calls.append(V.shape[1])
        return A @ V

    b = 2 if store_basis else 1
    with pytest.raises(ValueError, match=r"max_iter \* block_size.*k=5"):
        lanczos(mm, 20, 5, max_iter=2, block_size=b, store_basis=store_basis)
    assert calls == []
    res = lanczos(mm, 20, 4, max_iter=4 // b, block_size=b, store_basis=store_basis,
                  generator=torch.Generator().manual_seed(0))  # just enough: runs
    assert res.n_matvec == 4


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("store_basis", [True, False])
def test_slq_quadrature_moments_with_and_without_reorthogonalization(dtype, tol, store_basis):
    # Gauss quadrature from m Lanczos steps reproduces v^T A^p v for p < 2m.
    # Without reorthogonalization (store_basis=False, the low-memory SLQ)
    # the converged top eigenvalues come back as several ghost nodes, whose
    # weights add up to the one node's: the moments stay exact to working
    # precision (Greenbaum 1989).
    from flatness._lanczos import slq_nodes

    g = torch.Generator().manual_seed(0)
    n = 300
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    lam = torch.cat([torch.tensor([50.0, 49.9, 30.0, 20.0], dtype=torch.float64),
                     torch.rand(n - 4, dtype=torch.float64, generator=g) * 2 - 1])
    A = (U * lam) @ U.T
    v = torch.randint(0, 2, (n, 1), generator=g).double() * 2 - 1
    u = v[:, 0] / v.norm()
    nodes, weights = slq_nodes(lambda X: A.to(X.dtype) @ X, n, 1, 80, vectors=v, basis_dtype=dtype,
                               store_basis=store_basis)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    for p in range(7):
        exact = float(u @ torch.linalg.matrix_power(A, p) @ u)
        got = float((weights[0] * nodes[0] ** p).sum())
        assert abs(got - exact) <= tol * max(abs(exact), 50.0**p * 1e-3), (p, got, exact)
    ghosts = int((nodes[0] > 49).sum())
    assert ghosts == 2 if store_basis else ghosts > 2  # the recurrence really lost orthogonality


# -- thick restart (max_basis) ------------------------------------------------


def _wanted(ev: torch.Tensor, which: str, k: int) -> torch.Tensor:
    if which == "LA":
        return torch.sort(ev, descending=True).values[:k]
    if which == "SA":
        return torch.sort(ev).values[:k]
    return ev[torch.argsort(ev.abs(), descending=True)][:k]


@pytest.mark.parametrize("block_size", [1, 2])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("max_basis", [None, 7, 12])
def test_thick_restart_finds_the_eigenpairs_of_an_unrestarted_run(which, block_size, max_basis):
    # a bulk close to the wanted values: convergence takes many more steps
    # than a small basis holds, so the runs restart several times
    n, k = 300, 3
    g = torch.Generator().manual_seed(2)
    ev = torch.cat([torch.tensor([10.0, 9.6, 9.3, -10.2, -9.7, -9.4], dtype=DT),
                    torch.rand(n - 6, dtype=DT, generator=g) * 17 - 8.5])
    A = _matrix(n, ev)
    res = lanczos(lambda V: A @ V, n, k, which=which, tol=1e-9, block_size=block_size, max_iter=3000,
                  generator=torch.Generator().manual_seed(1), max_basis=max_basis)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, _wanted(ev, which, k), rtol=1e-12, atol=1e-12)
    Y = res.eigenvectors
    torch.testing.assert_close(Y.T @ Y, torch.eye(k, dtype=DT), rtol=0, atol=1e-12)
    # the true residuals, not the recurrence's estimate
    assert float((A @ Y - Y * res.eigenvalues).norm(dim=0).max()) <= 2e-9 * 10
    if max_basis is not None:
        assert res.n_iter > 2 * max_basis  # it did restart, more than once
    assert res.n_matvec == res.n_iter * block_size


def test_thick_restart_with_the_smallest_basis():
    # k wanted vectors and one more block: a restart keeps all but one
    n = 200
    ev = _spectrum(n)
    A = _matrix(n, ev)
    res = lanczos(lambda V: A @ V, n, 3, tol=1e-8, max_iter=5000, max_basis=4,
                  generator=torch.Generator().manual_seed(0))
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, _wanted(ev, "LA", 3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block_size", [1, 2])
def test_thick_restart_holds_at_most_max_basis_blocks(block_size):
    # the same run as test_lanczos_memory_is_the_basis_plus_a_few_vectors,
    # with four times as many steps: the basis stays at max_basis blocks
    # (the rotation's temporaries are about 8 MiB, one vector here)
    n, steps, max_basis = 100_000, 80, 10
    d = torch.linspace(-1, 1, n, dtype=DT)
    g = torch.Generator().manual_seed(0)
    res = []
    peak = peak_allocated(lambda: res.append(lanczos(
        lambda V: d[:, None] * V, n, 1, max_iter=steps, tol=1e-14, generator=g, block_size=block_size,
        max_basis=max_basis,
    )))
    assert res[0].n_iter == steps
    vectors = peak / (8 * n)
    assert vectors <= max_basis * block_size + 3 * block_size + 2, vectors


def test_max_basis_is_checked_before_any_product():
    A = torch.eye(10, dtype=DT)
    calls = []

    def matmat(V):
        calls.append(1)
        return A @ V

    with pytest.raises(ValueError, match="max_basis=3 blocks of 1 cannot hold the k=3"):
        lanczos(matmat, 10, 3, max_basis=3)
    with pytest.raises(ValueError, match="max_basis=2 blocks of 2 cannot hold the k=4"):
        lanczos(matmat, 10, 4, block_size=2, max_basis=2)
    with pytest.raises(ValueError, match="which='LM' settles on eigenvalues of the wrong sign.*at least 7"):
        lanczos(matmat, 100, 3, which="LM", max_basis=6)
    with pytest.raises(ValueError, match="store_basis=False stores none"):
        lanczos(matmat, 10, 1, store_basis=False, max_basis=5)
    assert not calls


def test_max_basis_that_never_fills_changes_nothing():
    n = 120
    A = _matrix(n, _spectrum(n))
    runs = [lanczos(lambda V: A @ V, n, 2, tol=1e-10, generator=torch.Generator().manual_seed(1), max_basis=mb)
            for mb in (None, 10_000)]
    assert torch.equal(runs[0].eigenvalues, runs[1].eigenvalues)
    assert torch.equal(runs[0].eigenvectors, runs[1].eigenvectors)
    assert runs[0].n_iter == runs[1].n_iter


def test_thick_restart_of_a_float32_basis():
    n = 300
    ev = _spectrum(n, seed=3)
    A = _matrix(n, ev)
    A32 = A.float()
    res = lanczos(lambda V: A32 @ V, n, 3, tol=1e-5, basis_dtype=torch.float32, max_basis=6, max_iter=3000,
                  generator=torch.Generator().manual_seed(0))
    assert res.converged and res.n_iter > 12 and res.eigenvectors.dtype == torch.float32
    torch.testing.assert_close(res.eigenvalues, _wanted(ev, "LA", 3), rtol=0, atol=1e-5 * 12)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_bound_that_leaves_less_than_a_block_is_not_applied(which):
    # n=5, blocks of 2, max_basis=2: a restart at the full basis would go on
    # from a block the space's end cut to one column, whose zero column gave
    # a Ritz value of 0 with a zero vector, "converged"
    A = torch.diag(-torch.arange(1.0, 6.0, dtype=DT))
    for mb in (2, None):
        res = lanczos(lambda V: A @ V, 5, 1, which=which, block_size=2, max_basis=mb, tol=1e-10,
                      generator=torch.Generator().manual_seed(0))
        assert res.converged
        assert float(res.eigenvalues[0]) == pytest.approx(-1.0 if which == "LA" else -5.0, abs=1e-10)
        assert float(res.eigenvectors.norm()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_breakdown_at_the_end_of_the_space_is_a_breakdown(seed):
    # n=5, blocks of 2: the third block has room for one column; when that
    # column's Krylov space is exhausted too, the whole block broke down
    # (the column beyond the room counts), and the rest of the space is
    # searched for the third copy of 2 instead of stopping at [2, 2, 1]
    A = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0], dtype=DT))
    res = lanczos(lambda V: A @ V, 5, 3, which="LA", block_size=2, tol=1e-10,
                  generator=torch.Generator().manual_seed(seed))
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, torch.full((3,), 2.0, dtype=DT), rtol=0, atol=1e-10)


@pytest.mark.parametrize("k", [1, 5])
def test_thick_restart_for_lm_keeps_both_ends_of_the_spectrum(k):
    # LM with the smallest basis it accepts, on random spectra around 0:
    # a restart that kept its extra vectors by magnitude alone took them
    # all from the side that led, and settled on a wrong eigenvalue
    # ("converged"); with a block from each end it finds the wanted ones
    n = 60
    for seed in range(12):
        ev = torch.rand(n, dtype=DT, generator=torch.Generator().manual_seed(100 + seed)) * 10 - 5
        A = _matrix(n, ev, seed=seed)
        res = lanczos(lambda V: A @ V, n, k, which="LM", tol=1e-10, max_iter=4000, max_basis=k + 4,
                      generator=torch.Generator().manual_seed(seed))
        assert res.converged
        torch.testing.assert_close(torch.sort(res.eigenvalues).values, torch.sort(_wanted(ev, "LM", k)).values,
                                   rtol=0, atol=1e-8, msg=f"seed {seed}")

