"""Perturbation sets: projections land in the set, are idempotent and exact."""

import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given

from flatness._apgd import checkpoints
from flatness._geometry import PerturbationSet, project_weight_space

shapes = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=3)


def _tensors(shapes, seed, scale=1.0, zero_frac=0.0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        if zero_frac:
            t[torch.rand(shape, generator=gen, dtype=torch.float64) < zero_frac] = 0
        out.append(t)
    return out


def _scaled_size(d, scales, norm):
    """Size of d in the set's norm, ||d / c||, with 0/0 treated as 0."""
    ratio = []
    for t, c in zip(d, scales):
        r = torch.where(c > 0, t / torch.where(c > 0, c, torch.ones_like(c)), torch.zeros_like(t))
        assert torch.all(t[c == 0] == 0), "coordinates with w_i = 0 must stay unperturbed"
        ratio.append(r.reshape(-1))
    flat = torch.cat(ratio)
    return float(flat.abs().max()) if norm == "linf" else float(flat.norm())


@given(shapes=shapes, seed=st.integers(0, 10_000), rho=st.floats(1e-3, 10.0),
       norm=st.sampled_from(["linf", "l2"]), adaptive=st.booleans(),
       spread=st.floats(0.01, 100.0))
def test_scaled_projection_lands_in_ball_and_is_idempotent(shapes, seed, rho, norm, adaptive, spread):
    w = _tensors(shapes, seed, zero_frac=0.2)
    pset = PerturbationSet(norm, rho, w, adaptive=adaptive)
    delta = pset.project_(_tensors(shapes, seed + 1, scale=spread))
    assert pset.contains(delta, rtol=1e-9)
    again = pset.project_([t.clone() for t in delta])
    for a, b in zip(delta, again):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    # In weight space, the perturbation is in the set of the kind.
    d = pset.to_weight_space(delta)
    scales = pset.scales if adaptive else [torch.ones_like(t) for t in w]
    assert _scaled_size(d, scales, norm) <= rho * (1 + 1e-9)


@given(shapes=shapes, seed=st.integers(0, 10_000), rho=st.floats(1e-3, 10.0),
       norm=st.sampled_from(["linf", "l2"]), adaptive=st.booleans(),
       spread=st.floats(0.01, 100.0))
def test_weight_space_projection_exact(shapes, seed, rho, norm, adaptive, spread):
    w = _tensors(shapes, seed, zero_frac=0.2)
    scales = [t.abs() for t in w] if adaptive else None
    d = _tensors(shapes, seed + 1, scale=spread)
    x = project_weight_space(d, rho, norm, scales)
    ones = [torch.ones_like(t) for t in w]
    assert _scaled_size(x, scales or ones, norm) <= rho * (1 + 1e-8)
    again = project_weight_space(x, rho, norm, scales)
    for a, b in zip(x, again):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    # Optimality: no feasible point is closer to d than the projection.
    dist = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(x, d)))
    gen = torch.Generator().manual_seed(seed + 2)
    pset = PerturbationSet(norm, rho, w, adaptive=adaptive)
    for _ in range(20):
        y = pset.to_weight_space(pset.random_start(gen))
        # Mix towards the projection: points near x are the ones that matter.
        t = float(torch.rand((), generator=gen, dtype=torch.float64))
        y = [t * yi + (1 - t) * xi for yi, xi in zip(y, x)]
        dist_y = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(y, d)))
        assert dist <= dist_y * (1 + 1e-9) + 1e-12


def test_ellipsoid_projection_matches_scipy():
    scipy_opt = pytest.importorskip("scipy.optimize")
    gen = np.random.default_rng(0)
    c = np.abs(gen.normal(size=7)) + 0.1
    d = gen.normal(size=7) * 3
    rho = 0.5
    (x,) = project_weight_space([torch.tensor(d)], rho, "l2", [torch.tensor(c)])
    res = scipy_opt.minimize(
        lambda v: ((v - d) ** 2).sum(), np.zeros(7), jac=lambda v: 2 * (v - d),
        constraints=[{"type": "ineq", "fun": lambda v: rho**2 - ((v / c) ** 2).sum()}],
        method="SLSQP", options={"ftol": 1e-14, "maxiter": 500},
    )
    np.testing.assert_allclose(x.numpy(), res.x, rtol=1e-5, atol=1e-7)


@given(seed=st.integers(0, 10_000), rho=st.floats(1e-3, 1.0),
       norm=st.sampled_from(["linf", "l2"]), adaptive=st.booleans())
def test_random_start_is_inside(seed, rho, norm, adaptive):
    w = _tensors([(3, 2), (4,)], seed, zero_frac=0.3)
    pset = PerturbationSet(norm, rho, w, adaptive=adaptive)
    delta = pset.random_start(torch.Generator().manual_seed(seed))
    assert pset.contains(delta, rtol=1e-9)
    if adaptive:
        for t, wi in zip(delta, w):
            assert torch.all(t[wi == 0] == 0)


@pytest.mark.parametrize("adaptive", [False, True])
def test_l2_random_start_is_uniform_in_the_coordinates_that_move(adaptive):
    # the radius rho U^(1/n) counted the zero weights' coordinates, which an
    # adaptive set holds at 0: with 2 of 100 free, every start lay near the
    # boundary (mean radius 0.99 rho instead of 2/3)
    w = torch.zeros(100, dtype=torch.float64) if adaptive else torch.randn(2, dtype=torch.float64)
    w[:2] = torch.tensor([1.0, -2.0], dtype=torch.float64)
    pset = PerturbationSet("l2", 1.0, [w], adaptive=adaptive)
    gen = torch.Generator().manual_seed(0)
    # starts are in the set's scaled coordinates (APGD's): uniform in the
    # 2-d disc, (r / rho)^2 ~ U[0, 1]
    r = torch.tensor([float(pset.random_start(gen)[0].norm()) for _ in range(2000)])
    assert abs(float(r.mean()) - 2 / 3) < 0.02  # the standard error is 0.005
    assert abs(float((r < 0.5).double().mean()) - 0.25) < 0.03


def test_adaptive_scaling_zero_weights_no_nan():
    w = [torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)]
    pset = PerturbationSet("l2", 0.1, w, adaptive=True)
    g = pset.grad_to_scaled_([torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)])
    step = pset.steepest_ascent_(g)
    assert torch.isfinite(step[0]).all() and step[0][0] == 0
    sample = pset.average_case_sample(torch.Generator().manual_seed(0))
    assert sample[0][0] == 0 and torch.isfinite(sample[0]).all()


def test_checkpoints_follow_the_paper_schedule():
    # Croce & Hein (2020): p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99;
    # the reference evaluator's ceil(p * n) for n = 20.
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(20) == [5, 9, 12, 14, 16, 18, 19]
    for n in (1, 2, 5, 20, 37):
        pts = checkpoints(n)
        assert pts == sorted(set(pts)) and all(0 < p < n for p in pts)


def test_ellipsoid_projection_of_a_point_inside_the_ball_but_outside_the_ellipsoid():
    """d = (0.3, 0.1), c = (0.5, 0.1), rho = 0.5: ||d||_2 = 0.32 < rho but
    ||d / c||_2 = sqrt(0.36 + 1) > rho, so d must move.  The KKT point is
    x_i = d_i c_i^2 / (c_i^2 + lam) with lam the root of
    sum_i (d_i c_i / (c_i^2 + lam))^2 = rho^2 (scipy's brentq here)."""
    scipy_opt = pytest.importorskip("scipy.optimize")
    d = np.array([0.3, 0.1])
    c = np.array([0.5, 0.1])
    rho = 0.5
    assert np.linalg.norm(d) < rho < np.linalg.norm(d / c)
    lam = scipy_opt.brentq(lambda t: np.sum((d * c / (c**2 + t)) ** 2) - rho**2, 0.0, 10.0, xtol=1e-15)
    expected = d * c**2 / (c**2 + lam)
    (x,) = project_weight_space([torch.tensor(d)], rho, "l2", [torch.tensor(c)])
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert np.linalg.norm(x.numpy() / c) == pytest.approx(rho, rel=1e-9)
    # A point inside the ellipsoid stays where it is.
    (inside,) = project_weight_space([torch.tensor(0.5 * expected)], rho, "l2", [torch.tensor(c)])
    np.testing.assert_array_equal(inside.numpy(), 0.5 * expected)


def test_l2_projection_of_half_precision_perturbations_lands_on_the_radius():
    # The norm of bfloat16 / float16 tensors is taken in float32 and the
    # scaling done in float32: the norm and the factor rounded to bfloat16
    # (8 bits) put the projection up to 0.45% off the radius.
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        w = [torch.randn(300, generator=g).to(dtype), torch.randn(7, 11, generator=g).to(dtype)]
        pset = PerturbationSet("l2", 0.05, w, adaptive=False)
        worst = 0.0
        for _ in range(20):
            delta = [(torch.randn(t.shape, generator=g) * 3).to(dtype) for t in w]
            pset.project_(delta)
            norm = float(torch.cat([t.double().reshape(-1) for t in delta]).norm())
            worst = max(worst, abs(norm / 0.05 - 1))
        # what remains is each element's own rounding to 8 (11) bits, which
        # averages out in the norm
        assert worst < 1e-3, (dtype, worst)


# -- what rounding w + d to the weights' dtype loses ----------------------------


def _weights(dtype):
    g = torch.Generator().manual_seed(0)
    return [(0.1 * torch.randn(64, 20, generator=g)).to(dtype), (0.1 * torch.randn(5, generator=g)).to(dtype)]


def test_rounding_loss_is_zero_in_float64_and_total_below_bfloat16_resolution():
    from flatness._geometry import rounding_loss

    for norm in ("linf", "l2"):
        for adaptive in (False, True):
            for average in (False, True):
                assert rounding_loss(_weights(torch.float64), norm, 1e-3, adaptive=adaptive,
                                     average_case=average) < 1e-9
    # bfloat16 has 8 significant bits: |d_i| <= 2**-10 |w_i| is below half a
    # step everywhere, so w + d rounds back to w, all of d is lost
    assert rounding_loss(_weights(torch.bfloat16), "linf", 2.0**-10, adaptive=True, average_case=False) == 1.0
    # and a radius of many steps keeps most of it
    assert rounding_loss(_weights(torch.bfloat16), "linf", 0.25, adaptive=True, average_case=False) < 0.02


def test_rounding_loss_of_a_sphere_point_uses_the_size_of_its_coordinates():
    from flatness._geometry import rounding_loss

    w = _weights(torch.float32)
    n = sum(t.numel() for t in w)
    # coordinates of a point of the l2 sphere are about rho / sqrt(n): at
    # rho = 1e-4 * sqrt(n) they are 1e-4, far above float32's step near 0.1
    assert rounding_loss(w, "l2", 1e-4 * math.sqrt(n), adaptive=False, average_case=False) < 1e-3
    # at rho = 1e-10 * sqrt(n) they are below half a step (3.7e-9 near 0.1)
    assert rounding_loss(w, "l2", 1e-10 * math.sqrt(n), adaptive=False, average_case=False) > 0.9


def test_rounding_loss_leaves_the_global_random_stream_alone():
    from flatness._geometry import rounding_loss

    before = torch.get_rng_state()
    rounding_loss(_weights(torch.bfloat16), "l2", 0.05, adaptive=True, average_case=True)
    assert torch.equal(torch.get_rng_state(), before)


def test_block_size_keeps_small_models_scratch_small():
    # The elementwise passes' pieces: BLOCK elements on a large model, a
    # 32nd of the parameters on a small one (at least MIN_BLOCK), never more
    # than the largest tensor; the scratch blocks of a PerturbationSet have
    # that size, and a patched BLOCK still caps it.
    from flatness import _geometry
    from flatness._geometry import BLOCK, MIN_BLOCK, block_size, blocks

    large = [torch.empty(3_000_000), torch.empty(9_000_000)]
    assert block_size(large) == BLOCK
    assert block_size([torch.empty(600_000), torch.empty(10)]) == MIN_BLOCK
    assert block_size([torch.empty(1_000), torch.empty(300)]) == 1_000
    mid = [torch.empty(4_000_000)]
    assert MIN_BLOCK < block_size(mid) == 4_000_000 // 32 < BLOCK
    pset = PerturbationSet("linf", 0.1, mid, adaptive=True)
    assert pset.block == block_size(mid)
    pieces = [b.numel() for (b,) in blocks(mid, size=pset.block)]
    assert max(pieces) == pset.block and sum(pieces) == 4_000_000
    assert pset.abs_block(mid[0][: pset.block]).untyped_storage().nbytes() == 4 * pset.block
    try:
        block, _geometry.BLOCK = _geometry.BLOCK, 4
        assert block_size(large) == 4
    finally:
        _geometry.BLOCK = block
