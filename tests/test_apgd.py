"""Textbook APGD (``flatness._apgd.apgd``, the default algorithm) against
Auto-PGD written out here from Croce and Hein (2020), Algorithm 1, on flat
float64 vectors: the same evaluation points, iterate by iterate."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from flatness._apgd import apgd
from flatness._geometry import PerturbationSet

DT = torch.float64
SHAPES = [(3, 2), (4,)]
DIM = 10


def paper_checkpoints(n_iters):
    """``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``,
    checkpoints ``ceil(p_j n)`` below ``n`` (exact fractions)."""
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    return sorted({math.ceil(q * n_iters) for q in p[1:] if 0 < math.ceil(q * n_iters) < n_iters})


def paper_apgd(f, grad, x0, rho, norm, n_iters, alpha=0.75):
    """Auto-PGD (Croce and Hein, 2020, Algorithm 1) maximising ``f`` over the
    ``norm`` ball of radius ``rho`` around 0.

    Step size ``eta = 2 rho``; ``z = P(x_k + eta s(g))`` with ``s`` the
    steepest-ascent direction of the norm (``sign`` for linf, ``g / ||g||`` for
    l2); ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))``
    (plain projected step for the first iterate).  At a checkpoint ``w_j``
    (checked once ``x_{w_j}`` is known, the last iterate excepted) the step
    is halved if fewer than ``0.75 (w_j - w_{j-1})`` steps since the previous
    checkpoint increased ``f`` (condition 1) or if neither the step nor the
    best value changed since then (condition 2); a halving restarts from
    the best point with no momentum.  The best point starts at ``x0``.
    Returns the best value, the best point, every point evaluated and the
    numbers of halvings (all, and those by condition 2 alone).
    """
    def proj(x):
        if norm == "linf":
            return x.clamp(-rho, rho)
        n = x.norm()
        return x * (rho / n) if n > rho else x

    def direction(g):
        if norm == "linf":
            return g.sign()
        n = g.norm()
        return g / n if n > 0 else g

    ckpts = paper_checkpoints(n_iters)
    eta = 2 * rho
    x, x_prev = x0.clone(), x0.clone()
    fx = f(x)
    visited = [x.clone()]
    f_max, x_max = fx, x.clone()
    successes, last_ckpt = 0, 0
    eta_at_last, fmax_at_last = eta, f_max
    halvings = cond2_only = 0
    for k in range(n_iters):
        z = proj(x + eta * direction(grad(x)))
        x_new = z if k == 0 else proj(x + alpha * (z - x) + (1 - alpha) * (x - x_prev))
        f_new = f(x_new)
        visited.append(x_new.clone())
        successes += f_new > fx
        if f_new > f_max:
            f_max, x_max = f_new, x_new.clone()
        x_prev, x, fx = x, x_new, f_new
        it = k + 1
        if it in ckpts and it < n_iters:
            cond1 = successes < 0.75 * (it - last_ckpt)
            cond2 = eta_at_last == eta and fmax_at_last == f_max
            if cond1 or cond2:
                eta /= 2
                halvings += 1
                cond2_only += not cond1
                x, x_prev, fx = x_max.clone(), x_max.clone(), f_max
            successes, last_ckpt = 0, it
            eta_at_last, fmax_at_last = eta, f_max
    return f_max, x_max, visited, (halvings, cond2_only)


def _split(v):
    out, start = [], 0
    for s in SHAPES:
        n = math.prod(s)
        out.append(v[start:start + n].reshape(s).clone())
        start += n
    return out


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _wavy(seed=0):
    """A smooth non-concave objective with its gradient."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(DIM, DIM, generator=g, dtype=DT)
    b = torch.randn(DIM, generator=g, dtype=DT)
    Q = torch.randn(DIM, DIM, generator=g, dtype=DT)
    Q = Q + Q.T

    def f(v):
        return float(torch.sin(A @ v + b).sum() + 0.1 * v @ Q @ v)

    def grad(v):
        return A.T @ torch.cos(A @ v + b) + 0.2 * Q @ v

    return f, grad


def _run_library(f, grad, norm, rho, n_iters, start=None):
    weights = [torch.ones(s, dtype=DT) for s in SHAPES]
    pset = PerturbationSet(norm, rho, weights, adaptive=False)
    visited = []

    def objective(delta, need_grad):
        v = _flat(delta)
        visited.append(v.clone())
        return f(v), (_split(grad(v)) if need_grad else None)

    res = apgd(objective, pset, n_iters, start=None if start is None else _split(start))
    return res, visited


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("n_iters", [7, 20])
@pytest.mark.parametrize("random_start", [False, True], ids=["centre", "start"])
def test_apgd_follows_the_paper_iterate_by_iterate(norm, n_iters, random_start):
    f, grad = _wavy()
    rho = 0.7
    x0 = torch.zeros(DIM, dtype=DT)
    if random_start:
        x0 = torch.randn(DIM, generator=torch.Generator().manual_seed(5), dtype=DT)
        x0 = x0 * (0.5 * rho / x0.abs().max())
    f_ref, x_ref, visited_ref, _ = paper_apgd(f, grad, x0, rho, norm, n_iters)
    res, visited = _run_library(f, grad, norm, rho, n_iters, start=x0 if random_start else None)
    assert len(visited) == len(visited_ref) == n_iters + 1
    for k, (a, b) in enumerate(zip(visited, visited_ref)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"iterate {k}")
    assert res.best_value == pytest.approx(f_ref, rel=1e-13, abs=1e-13)
    assert res.start_value == f(x0)
    torch.testing.assert_close(_flat(res.best_delta), x_ref, rtol=1e-12, atol=1e-12)


def test_the_comparison_exercises_momentum_and_halving():
    # The reference run above must restart at least once and move with
    # momentum, or the comparison would not pin those parts.
    f, grad = _wavy()
    x0 = torch.zeros(DIM, dtype=DT)
    for norm in ("l2", "linf"):
        _, _, plain, _ = paper_apgd(f, grad, x0, 0.7, norm, 20, alpha=1.0)
        _, _, heavy, halvings = paper_apgd(f, grad, x0, 0.7, norm, 20)
        assert max(float((a - b).abs().max()) for a, b in zip(plain, heavy)) > 1e-3
        assert halvings[0] >= 1


def test_condition_two_alone_halves_the_step():
    # Enough steps increase f, but none beats the best point: only the
    # paper's condition 2 (step and best value unchanged) halves here.
    f, grad = _wavy(seed=12)
    x0 = torch.zeros(DIM, dtype=DT)
    f_ref, _, visited_ref, (_, cond2_only) = paper_apgd(f, grad, x0, 0.3, "linf", 20)
    assert cond2_only >= 1
    res, visited = _run_library(f, grad, "linf", 0.3, 20)
    for k, (a, b) in enumerate(zip(visited, visited_ref, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"iterate {k}")
    assert res.best_value == pytest.approx(f_ref, rel=1e-13, abs=1e-13)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_start_point_wins_when_every_step_loses(norm):
    # f(v) = 3 + a.v - 100 ||v||^2: the gradient at 0 points along a, but
    # f > 3 only within |v| < |a| / 100 = 0.01 along a, and no step of APGD
    # (eta >= 2 rho / 8 = 0.25 with rho = 1 over 5 iterations) lands there.
    a = torch.linspace(-1, 1, DIM, dtype=DT) / math.sqrt(DIM)

    def f(v):
        return float(3.0 + a @ v - 100.0 * v @ v)

    def grad(v):
        return a - 200.0 * v

    res, visited = _run_library(f, grad, norm, 1.0, 5)
    assert res.start_value == 3.0
    assert res.best_value == 3.0  # the clean value, never below
    assert all(f(v) < 3.0 for v in visited[1:])
    assert all(float(t.abs().max()) == 0.0 for t in res.best_delta)


# --------------------------------------------------------------------------
# The fused form: linf steps taken tensor by tensor in the backward pass
# --------------------------------------------------------------------------


def _both_forms(f, grad, weights, rho, n_iters, *, adaptive, start=None, unused=None):
    """APGD on ``f(w + c * delta)`` through the plain objective and through
    the fused one, with the points each evaluated (flat, weight space).
    ``grad`` is the gradient with respect to the weights; tensor ``unused``
    gets no gradient (``None``), as a parameter the loss does not use."""
    runs = {}
    for form in ("plain", "fused"):
        pset = PerturbationSet("linf", rho, weights, adaptive=adaptive)
        visited = []

        def gradients(v):
            g = _split(grad(v))
            return [None if i == unused else t for i, t in enumerate(g)]

        def objective(delta, need_grad, pset=pset, visited=visited):
            values = pset.perturbed(delta)
            v = _flat(values)
            visited.append(v.clone())
            if not need_grad:
                return f(v), None
            g = [torch.zeros_like(w) if t is None else t for w, t in zip(weights, gradients(v))]
            return f(v), pset.grad_to_scaled_(g)

        def fused(values, plan, visited=visited):
            v = _flat(values)
            visited.append(v.clone())
            if plan is None:
                return f(v)
            consume = plan(f(v))
            g = gradients(v)
            for i in reversed(range(len(g))):  # in any order, as backpropagation completes them
                consume(i, g[i], values[i])
            return f(v)

        start_ = None if start is None else _split(start)
        if form == "plain":
            runs[form] = apgd(objective, pset, n_iters, start=start_), visited
        else:
            runs[form] = apgd(objective, pset, n_iters, start=start_, fused=fused), visited
    return runs["plain"], runs["fused"]


@pytest.mark.parametrize("adaptive", [False, True], ids=["linf", "adaptive_linf"])
@pytest.mark.parametrize("n_iters", [7, 20])
@pytest.mark.parametrize("random_start", [False, True], ids=["centre", "start"])
def test_fused_steps_are_the_plain_steps_bit_for_bit(adaptive, n_iters, random_start):
    f, grad = _wavy()
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(s, generator=g, dtype=DT) for s in SHAPES]
    if adaptive:
        weights[0][1, 0] = 0.0  # a coordinate that cannot move
    start = None
    if random_start:
        start = 0.3 * (2 * torch.rand(DIM, generator=g, dtype=DT) - 1)
        if adaptive:
            start[2] = 0.0
    (plain, seen_plain), (fused, seen_fused) = _both_forms(
        lambda v: f(v - _flat(weights)), lambda v: grad(v - _flat(weights)), weights, 0.7, n_iters,
        adaptive=adaptive, start=start)
    assert len(seen_fused) == len(seen_plain) == n_iters + 1
    for k, (a, b) in enumerate(zip(seen_fused, seen_plain)):
        assert torch.equal(a, b), f"iterate {k}"
    assert fused.best_value == plain.best_value and fused.start_value == plain.start_value
    assert all(torch.equal(a, b) for a, b in zip(fused.best_delta, plain.best_delta))
    if adaptive:
        assert float(fused.best_delta[0][1, 0]) == 0.0  # never moved
    # the runs restart and move: the comparison covers the saved directions
    assert len({tuple(v.tolist()) for v in seen_plain}) > n_iters // 2


def test_fused_steps_of_a_tensor_without_gradient():
    # a tensor the loss does not use steps with a zero gradient: it keeps
    # its value under momentum, as in the plain form
    f, grad = _wavy()
    weights = [torch.ones(s, dtype=DT) for s in SHAPES]
    start = 0.2 * torch.linspace(-1, 1, DIM, dtype=DT)
    (plain, seen_plain), (fused, seen_fused) = _both_forms(
        f, grad, weights, 0.5, 9, adaptive=False, start=start, unused=1)
    for a, b in zip(seen_fused, seen_plain, strict=True):
        assert torch.equal(a, b)
    assert fused.best_value == plain.best_value
