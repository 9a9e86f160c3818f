"""flatness.optim.ConsistentSAM and NonuniformSAM against update rules written
out here in float64 (plain autograd gradients, dense Kronecker products and
dense solves for the K-FAC variants), plus the drop-in guarantees."""

from __future__ import annotations

import copy
import math

import cases
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from flatness.optim import ConsistentSAM, NonuniformSAM

DT = torch.float64


def mlp(seed=0):
    return cases.mlp(seed, (4, 6, 3))


def data(seed=1, n=12):
    return cases.classification_batch(n, (4,), 3, seed)


def closure_for(model, x, y, fail_on=None):
    calls = []

    def closure():
        calls.append(1)
        if fail_on is not None and len(calls) == fail_on:
            raise RuntimeError("injected failure")
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


# ----------------------------------------------------------------------
# references
# ----------------------------------------------------------------------


def grad_at(model, w, x, y):
    names = [n for n, _ in model.named_parameters()]
    vals = [v.detach().requires_grad_(True) for v in w]
    loss = F.cross_entropy(functional_call(model, dict(zip(names, vals)), (x,)), y)
    return [g.detach() for g in torch.autograd.grad(loss, vals)]


def norm(vs):
    return torch.sqrt(sum((v * v).sum() for v in vs))


def kfac_factors_ref(model, w, x, y):
    """A = mean a~ a~^T, G = mean e e^T per Linear layer, with e the gradient
    of each sample's own loss w.r.t. the layer output (computed by autograd on
    the sum of sample losses, which separates the samples)."""
    W1, b1, W2, b2 = [v.detach() for v in w]
    h = x @ W1.T + b1
    h.requires_grad_(True)
    a2 = torch.tanh(h)
    o = a2 @ W2.T + b2
    losses = F.cross_entropy(o, y, reduction="none")
    e1, e2 = torch.autograd.grad(losses.sum(), [h, o])
    ones = torch.ones(len(x), 1, dtype=DT)
    out = []
    for a, e in ((x, e1), (a2.detach(), e2)):
        at = torch.cat([a, ones], 1)
        out.append((at.T @ at / len(x), e.T @ e / len(x)))
    return out


def kfac_solve_ref(factors, vecs, damping):
    """(kron(A, G) + damping I)^-1 vec([dW | db]) by a dense solve."""
    out = []
    for (A, G), (dW, db) in zip(factors, (vecs[0:2], vecs[2:4])):
        M = torch.cat([dW, db[:, None]], 1)
        F_ = torch.kron(A, G) + damping * torch.eye(A.shape[0] * G.shape[0], dtype=DT)
        v = torch.linalg.solve(F_, M.T.flatten())  # column-major vec
        R = v.reshape(M.shape[1], M.shape[0]).T
        out += [R[:, :-1], R[:, -1]]
    return out


def ema(run, new, decay):
    if run is None:
        return [(a.clone(), g.clone()) for a, g in new]
    return [(decay * ra + (1 - decay) * a, decay * rg + (1 - decay) * g) for (ra, rg), (a, g) in zip(run, new)]


def ref_consistent(model, x, y, steps, *, rho1, rho2, alpha, lr, mu=0.0, adaptive=False, eta=0.01,
                   kfac=False, damping=1e-3, decay=0.95):
    w = [p.detach().clone() for p in model.parameters()]
    m = [torch.zeros_like(v) for v in w]
    buf = None
    run = None
    for _ in range(steps):
        g1 = grad_at(model, w, x, y)
        if kfac:
            run = ema(run, kfac_factors_ref(model, w, x, y), decay)
        n1 = norm(g1)
        e1 = [rho1 * g / n1 for g in g1]
        g2 = grad_at(model, [a + b for a, b in zip(w, e1)], x, y)
        m = [alpha * mm + (1 - alpha) * (b - a) for mm, a, b in zip(m, g1, g2)]
        d = [b - a - mm for a, b, mm in zip(g1, g2, m)]
        if kfac:
            pd = kfac_solve_ref(run, d, damping)
            q = torch.sqrt(sum((u * v).sum() for u, v in zip(d, pd)))
            e2 = [rho2 * v / q for v in pd]
        elif adaptive:
            T = [v.abs() + eta for v in w]
            nt = norm([t * v for t, v in zip(T, d)])
            e2 = [rho2 * t * t * v / nt for t, v in zip(T, d)]
        else:
            nd = norm(d)
            e2 = [rho2 * v / nd for v in d]
        g3 = grad_at(model, [a + b for a, b in zip(w, e2)], x, y)
        buf = g3 if buf is None else [mu * b + g for b, g in zip(buf, g3)]
        w = [v - lr * b for v, b in zip(w, buf)]
    return w, m


def dense_kfac(factors, damping):
    """blockdiag(kron(A, G)) + damping I over all parameters, in the order of
    :func:`to_vec`."""
    return torch.block_diag(*[torch.kron(A, G) for A, G in factors]) + damping * torch.eye(
        sum(A.shape[0] * G.shape[0] for A, G in factors), dtype=DT)


def to_vec(vs):
    """[W1, b1, W2, b2] -> column-major vec([W1 | b1]) then vec([W2 | b2])."""
    return torch.cat([torch.cat([W, b[:, None]], 1).T.flatten() for W, b in (vs[0:2], vs[2:4])])


def from_vec(v, like):
    out, start = [], 0
    for W, _ in (like[0:2], like[2:4]):
        rows, cols = W.shape[0], W.shape[1] + 1
        M = v[start:start + rows * cols].reshape(cols, rows).T
        out += [M[:, :-1], M[:, -1]]
        start += rows * cols
    return out


def ref_nonuniform_ascent(run, g, *, rho, damping, mode):
    """The ascent written out with dense matrices: ``second_moment`` solves
    with F, ``centered`` with Sigma = F - g g^T directly (no Sherman-Morrison),
    (or, where q = g^T F^-1 g >= 1 and Sigma is indefinite, F^-1 g / sqrt(q (1 -
    exp(-q)))), ``gam`` follows the authors' GAM.ascent_step line by line."""
    Fd = dense_kfac(run, damping)
    gv = to_vec(g)
    fvp = torch.linalg.solve(Fd, gv)
    factor = gv @ fvp
    if mode == "centered":
        if factor < 1:
            sol = torch.linalg.solve(Fd - torch.outer(gv, gv), gv)
            return from_vec(rho * sol / torch.sqrt(gv @ sol), g)
        # Sigma is not positive definite: 1 - q -> 1 - exp(-q)
        return from_vec(rho * fvp / torch.sqrt(factor * (1 - torch.exp(-factor))), g)
    if mode == "second_moment":
        return from_vec(rho * fvp / torch.sqrt(factor), g)
    fvp_norm = float(torch.sqrt(factor)) + 1e-16  # GAM: torch.sqrt_(fvp_factor) also overwrites it
    factor = torch.sqrt(factor)
    if 1.0 - factor < 0:
        scaling = float(torch.sqrt(1.0 - torch.exp(-factor))) + 1e-16
    else:
        scaling = float(torch.sqrt(1.0 - factor)) + 1e-16
    return from_vec(fvp * rho / (fvp_norm * scaling), g)


def ref_nonuniform(model, x, y, steps, *, rho, lr, damping, decay, mode="second_moment"):
    w = [p.detach().clone() for p in model.parameters()]
    run = None
    for _ in range(steps):
        g = grad_at(model, w, x, y)
        run = ema(run, kfac_factors_ref(model, w, x, y), decay)
        if mode == "second_moment":  # block by block, as K-FAC solves it
            pg = kfac_solve_ref(run, g, damping)
            q = torch.sqrt(sum((u * v).sum() for u, v in zip(g, pg)))
            e = [rho * v / q for v in pg]
        else:
            e = ref_nonuniform_ascent(run, g, rho=rho, damping=damping, mode=mode)
        g2 = grad_at(model, [a + v for a, v in zip(w, e)], x, y)
        w = [v - lr * gg for v, gg in zip(w, g2)]
    return w


def assert_close(params, ref, tol=1e-11):
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach(), r, rtol=tol, atol=tol)


# ----------------------------------------------------------------------
# update rules
# ----------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True], ids=["identity", "adaptive"])
def test_consistent_matches_reference(adaptive):
    model = mlp()
    x, y = data()
    kw = dict(rho1=0.3, rho2=0.2, alpha=0.7, lr=0.1, mu=0.9, adaptive=adaptive, eta=0.05)
    w_ref, m_ref = ref_consistent(model, x, y, 5, **kw)
    opt = ConsistentSAM(model.parameters(), torch.optim.SGD, rho=0.3, rho2=0.2, alpha=0.7,
                        adaptive=adaptive, eta=0.05, lr=0.1, momentum=0.9)
    for _ in range(5):
        opt.step(closure_for(model, x, y))
    assert_close(model.parameters(), w_ref)
    assert_close([opt.extra_state[p]["consistent_momentum"] for p in model.parameters()], m_ref)


def test_consistent_alpha_zero_written_out():
    """alpha = 0: m = g2 - g1 at every step, so d = g2 - g1 - m = 0, e2 = 0
    (a zero direction, not NaN) and the third pass is at w itself: the base
    optimizer steps with g1 = grad L(w); m keeps g2 - g1 of the last step."""
    model = mlp()
    x, y = data()
    lr, mu, rho1 = 0.1, 0.9, 0.3
    w = [p.detach().clone() for p in model.parameters()]
    buf = None
    for _ in range(3):
        g1 = grad_at(model, w, x, y)
        n1 = norm(g1)
        g2 = grad_at(model, [a + rho1 * g / n1 for a, g in zip(w, g1)], x, y)
        m = [b - a for a, b in zip(g1, g2)]
        buf = g1 if buf is None else [mu * b + g for b, g in zip(buf, g1)]
        w = [v - lr * b for v, b in zip(w, buf)]
    opt = ConsistentSAM(model.parameters(), torch.optim.SGD, rho=rho1, rho2=0.2, alpha=0.0,
                        lr=lr, momentum=mu)
    seen = []
    inner = closure_for(model, x, y)

    def closure():
        seen.append([p.detach().clone() for p in model.parameters()])
        return inner()

    for _ in range(3):
        opt.step(closure)
    assert_close(model.parameters(), w)
    assert_close([opt.extra_state[p]["consistent_momentum"] for p in model.parameters()], m)
    for step in range(3):  # the third pass of each step runs at w
        assert_close(seen[3 * step + 2], seen[3 * step], tol=0)


def test_consistent_kfac_matches_dense_reference():
    model = mlp()
    x, y = data()
    w_ref, _ = ref_consistent(model, x, y, 3, rho1=0.2, rho2=0.1, alpha=0.5, lr=0.1, kfac=True,
                              damping=1e-2, decay=0.6)
    opt = ConsistentSAM(model.parameters(), torch.optim.SGD, rho=0.2, rho2=0.1, alpha=0.5, lr=0.1,
                        preconditioner="kfac", model=model, damping=1e-2, stat_decay=0.6)
    for _ in range(3):
        opt.step(closure_for(model, x, y))
    assert_close(model.parameters(), w_ref, tol=1e-10)
    assert all(not m._forward_hooks for m in model.modules())


MODES = {
    "second_moment": dict(centered_covariance=False),
    "centered": dict(gam_scaling=False),
    "gam": dict(),  # the default
}


@pytest.mark.parametrize("damping", [1e-2, 0.3])  # q = g^T F^-1 g above / below 1
@pytest.mark.parametrize("mode", sorted(MODES))
def test_nonuniform_sam_matches_dense_reference(mode, damping):
    model = mlp()
    x, y = data()
    w_ref = ref_nonuniform(model, x, y, 3, rho=0.1, lr=0.1, damping=damping, decay=0.6, mode=mode)
    opt = NonuniformSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=model,
                        damping=damping, stat_decay=0.6, **MODES[mode])
    for _ in range(3):
        opt.step(closure_for(model, x, y))
    assert_close(model.parameters(), w_ref, tol=1e-10)
    assert all(not m._forward_hooks for m in model.modules())


def first_ascent(model, x, y, **kw):
    """The perturbation NonuniformSAM applies in its first step."""
    opt = NonuniformSAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model, **kw)
    w = [p.detach().clone() for p in model.parameters()]
    with opt.first_pass():
        F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    e = [p.detach() - v for p, v in zip(model.parameters(), w)]
    opt.restore()
    return e


@pytest.mark.parametrize("damping", [1e-3, 1e-1, 10.0])
def test_nonuniform_modes_by_hand(damping):
    """The three ascents of one step, from the same F^-1 g and q = g^T F^-1 g:
    the centred one is the second-moment one divided by sqrt(1 - q) (and then
    equals the dense solve with F - g g^T), by sqrt(1 - exp(-q)) where q >= 1;
    GAM's by sqrt(1 - sqrt(q)) (sqrt(1 - exp(-sqrt q)) where sqrt(q) > 1).
    K-FAC's F need not dominate g g^T: q = 2.9, 0.71, 0.015 here."""
    model = mlp()
    x, y = data()
    w = [p.detach().clone() for p in model.parameters()]
    g = grad_at(model, w, x, y)
    run = kfac_factors_ref(model, w, x, y)
    gv = to_vec(g)
    Fd = dense_kfac(run, damping)
    q = float(gv @ torch.linalg.solve(Fd, gv))
    rho = 0.3
    plain = first_ascent(model, x, y, rho=rho, damping=damping, centered_covariance=False)
    assert_close(plain, first_ascent(model, x, y, rho=rho, damping=damping, centered_covariance=False, gam_scaling=False))
    cent = first_ascent(model, x, y, rho=rho, damping=damping, gam_scaling=False)
    gam = first_ascent(model, x, y, rho=rho, damping=damping)
    r = q ** 0.5
    one_minus_q = 1 - q if q < 1 else 1 - math.exp(-q)
    s_gam = (1 - r) ** 0.5 if r <= 1 else (1 - math.exp(-r)) ** 0.5
    for a, b, c in zip(plain, cent, gam):
        torch.testing.assert_close(b, a / one_minus_q ** 0.5, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(c, a * (r / (r + 1e-16)) / (s_gam + 1e-16), rtol=1e-10, atol=1e-14)
    assert_close(cent, ref_nonuniform_ascent(run, g, rho=rho, damping=damping, mode="centered"), tol=1e-10)
    # e^T F e = rho^2 for the second moment; e^T Sigma e = rho^2 for the centred
    # covariance where it is positive definite
    ev = to_vec(plain)
    torch.testing.assert_close(ev @ Fd @ ev, torch.tensor(rho ** 2, dtype=DT), rtol=1e-10, atol=0)
    if q < 1:
        ev = to_vec(cent)
        sigma = Fd - torch.outer(gv, gv)
        torch.testing.assert_close(ev @ sigma @ ev, torch.tensor(rho ** 2, dtype=DT), rtol=1e-10, atol=0)


def test_nonuniform_scale_past_one():
    """Where q >= 1 the centred covariance is not positive definite: 1 - q
    becomes 1 - exp(-q) (and GAM's 1 - sqrt(q) becomes 1 - exp(-sqrt(q)))."""
    from flatness.optim._functional import nonuniform_scale

    for q in (0.25, 0.81, 1.0, 2.25, 9.0):
        n = torch.tensor(q, dtype=DT).sqrt()
        r = q ** 0.5
        cent = 1 / (q * (1 - q)) ** 0.5 if q < 1 else 1 / (q * (1 - torch.exp(torch.tensor(-q, dtype=DT)))) ** 0.5
        s = (1 - r) ** 0.5 if r <= 1 else float(1 - torch.exp(torch.tensor(-r, dtype=DT))) ** 0.5
        torch.testing.assert_close(nonuniform_scale(n, "second_moment"), torch.tensor(1 / r, dtype=DT))
        torch.testing.assert_close(nonuniform_scale(n, "centered"), torch.as_tensor(cent, dtype=DT))
        torch.testing.assert_close(nonuniform_scale(n, "gam"), torch.tensor(1 / ((r + 1e-16) * (s + 1e-16)), dtype=DT))
    for mode in ("second_moment", "centered", "gam"):  # a zero gradient: no move, no NaN
        assert nonuniform_scale(torch.zeros((), dtype=DT), mode) == 0


def test_update_freq_keeps_factors_between_updates():
    model = mlp()
    x, y = data()
    opt = NonuniformSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=model, update_freq=3)
    first = model[0].weight
    seen = []
    for _ in range(4):
        opt.step(closure_for(model, x, y))
        seen.append(opt.extra_state[first]["kfac_G"].clone())  # (layer 0's A is the data's)
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    assert not torch.equal(seen[2], seen[3])


@pytest.mark.parametrize("make", [
    lambda m: ConsistentSAM(m.parameters(), torch.optim.SGD, rho=0.0, rho2=0.0, lr=0.1, momentum=0.9),
    lambda m: NonuniformSAM(m.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9, model=m),
], ids=["consistent", "nonuniform"])
def test_zero_radius_is_the_base_optimizer_bit_for_bit(make):
    model, ref_model = mlp(), mlp()
    x, y = data()
    opt = make(model)
    base = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.step(closure_for(model, x, y))
        base.zero_grad()
        F.cross_entropy(ref_model(x), y).backward()
        base.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_three_step_api_equals_closure_and_clones_g1():
    model_a, model_b = mlp(), mlp()
    x, y = data()
    opt_a = ConsistentSAM(model_a.parameters(), torch.optim.SGD, rho=0.2, rho2=0.3, lr=0.1)
    opt_b = ConsistentSAM(model_b.parameters(), torch.optim.SGD, rho=0.2, rho2=0.3, lr=0.1)
    for _ in range(3):
        opt_a.step(closure_for(model_a, x, y))
        F.cross_entropy(model_b(x), y).backward()
        opt_b.first_step()
        # the classic bug: zeroing .grad in place must not wipe the kept g1
        opt_b.zero_grad(set_to_none=False)
        F.cross_entropy(model_b(x), y).backward()
        opt_b.middle_step(zero_grad=True)
        F.cross_entropy(model_b(x), y).backward()
        opt_b.second_step(zero_grad=True)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_param_groups_own_rho2_and_perturb_false():
    model = mlp()
    x, y = data()
    opt = ConsistentSAM(
        [{"params": model[0].parameters(), "sam_rho2": 0.5}, {"params": model[2].parameters(), "sam_perturb": False}],
        torch.optim.SGD, rho=0.2, rho2=0.1, lr=0.1,
    )
    # reference: only layer 0 perturbed (both ascents), with its own rho2
    w = [p.detach().clone() for p in model.parameters()]
    g1 = grad_at(model, w, x, y)
    e1 = [0.2 * g / norm(g1[:2]) for g in g1[:2]] + [torch.zeros_like(g) for g in g1[2:]]
    g2 = grad_at(model, [a + b for a, b in zip(w, e1)], x, y)
    # first step: m = 0.9 * 0 + 0.1 (g2 - g1), so d = g2 - g1 - m
    d = [(b - a) - 0.1 * (b - a) for a, b in zip(g1[:2], g2[:2])]
    e2 = [0.5 * v / norm(d) for v in d] + [torch.zeros_like(g) for g in g1[2:]]
    g3 = grad_at(model, [a + b for a, b in zip(w, e2)], x, y)
    opt.step(closure_for(model, x, y))
    assert_close(model.parameters(), [v - 0.1 * g for v, g in zip(w, g3)])
    assert model[2].weight not in opt.extra_state or not opt.extra_state[model[2].weight]


# ----------------------------------------------------------------------
# guarantees
# ----------------------------------------------------------------------


@pytest.mark.parametrize("fail_on", [2, 3], ids=["second-pass", "third-pass"])
@pytest.mark.parametrize("kfac", [False, True], ids=["identity", "kfac"])
def test_exception_restores_weights_and_momentum(fail_on, kfac):
    model = mlp()
    x, y = data()
    kw = dict(preconditioner="kfac", model=model) if kfac else {}
    opt = ConsistentSAM(model.parameters(), torch.optim.SGD, lr=0.1, **kw)
    opt.step(closure_for(model, x, y))
    before = [p.detach().clone() for p in model.parameters()]
    m_before = [opt.extra_state[p]["consistent_momentum"].clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="injected"):
        opt.step(closure_for(model, x, y, fail_on=fail_on))
    for p, b, mb in zip(model.parameters(), before, m_before):
        assert torch.equal(p, b)
        assert torch.equal(opt.extra_state[p]["consistent_momentum"], mb)
    assert not opt.is_perturbed
    assert all(not m._forward_hooks for m in model.modules())
    opt.step(closure_for(model, x, y))  # usable afterwards


@pytest.mark.parametrize("kfac", [False, True], ids=["identity", "kfac"])
def test_state_dict_round_trip(kfac):
    x, y = data()

    def make(model):
        kw = dict(preconditioner="kfac", model=model, stat_decay=0.5) if kfac else {}
        return ConsistentSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, alpha=0.6, **kw)

    model = mlp()
    opt = make(model)
    for _ in range(4):
        opt.step(closure_for(model, x, y))
    final = [p.detach().clone() for p in model.parameters()]

    model_a = mlp()
    opt_a = make(model_a)
    for _ in range(2):
        opt_a.step(closure_for(model_a, x, y))
    sd = copy.deepcopy(opt_a.state_dict())
    model_b = copy.deepcopy(model_a)
    opt_b = make(model_b)
    opt_b.load_state_dict(opt_a.state_dict())
    m_a = [opt_a.extra_state[p]["consistent_momentum"].clone() for p in model_a.parameters()]
    for _ in range(2):
        opt_b.step(closure_for(model_b, x, y))
    for p, q in zip(model_b.parameters(), final):
        assert torch.equal(p, q)
    # no aliasing: stepping opt_b left opt_a's state alone
    for p, m in zip(model_a.parameters(), m_a):
        assert torch.equal(opt_a.extra_state[p]["consistent_momentum"], m)
    assert sd["sharpness_aware"]["type"] == "ConsistentSAM"


def test_kfac_needs_first_pass_in_manual_style():
    model = mlp()
    x, y = data()
    opt = ConsistentSAM(model.parameters(), torch.optim.SGD, lr=0.1, preconditioner="kfac", model=model)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="first_pass"):
        opt.middle_step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # inside first_pass it works
    with opt.first_pass():
        F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with opt.second_pass():
        F.cross_entropy(model(x), y).backward()
    opt.middle_step(zero_grad=True)
    with opt.second_pass():
        F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def test_order_errors_restore():
    model = mlp()
    x, y = data()
    opt = ConsistentSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.middle_step()
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="three passes"):
        opt.second_step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(TypeError, match="closure"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(rho2=-0.1), ValueError, "^rho2 must be finite and >= 0"),
        (dict(rho2=float("nan")), ValueError, "^rho2 must be"),
        (dict(rho2="0.1"), TypeError, "^rho2 must be a number"),
        (dict(preconditioner="fisher"), ValueError, "preconditioner"),
        (dict(preconditioner="kfac"), ValueError, "model="),
        (dict(preconditioner="kfac", adaptive=True, model=None), ValueError, "cannot be combined"),
        (dict(update_freq=0), ValueError, "update_freq"),
        (dict(damping=-1.0), ValueError, "damping"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    model = mlp()
    if kwargs.get("model", 0) is None:
        kwargs["model"] = model
    with pytest.raises(err, match=match):
        ConsistentSAM(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(centered_covariance=1), TypeError, "centered_covariance"),
        (dict(gam_scaling="yes"), TypeError, "gam_scaling"),
    ],
)
def test_nonuniform_bad_arguments(kwargs, err, match):
    model = mlp()
    with pytest.raises(err, match=match):
        NonuniformSAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model, **kwargs)


def test_nonuniform_rejects_model_without_factored_layers():
    model = nn.Sequential(nn.BatchNorm1d(3)).to(DT)
    with pytest.raises(ValueError, match="Linear or Conv2d"):
        NonuniformSAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model)
    other = mlp()
    with pytest.raises(ValueError, match="not a parameter of model"):
        NonuniformSAM(other.parameters(), torch.optim.SGD, lr=0.1, model=mlp(3))


def test_grad_scaler_matches_unscaled():
    model_a, model_b = mlp(), mlp()
    x, y = data()
    opt_a = ConsistentSAM(model_a.parameters(), torch.optim.SGD, lr=0.1, rho2=0.3)
    opt_b = ConsistentSAM(model_b.parameters(), torch.optim.SGD, lr=0.1, rho2=0.3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def scaled_closure():
        loss = F.cross_entropy(model_b(x), y)
        scaler.scale(loss).backward()
        return loss

    for _ in range(2):
        opt_a.step(closure_for(model_a, x, y))
        opt_b.step(scaled_closure, scaler=scaler)
        scaler.update()
    assert_close(model_b.parameters(), [p.detach() for p in model_a.parameters()], tol=1e-10)


# K-FAC under a GradScaler: the captured output gradients carry the scale s
# (G would be s^2 too large against the damping) and a skipped step must not
# change any state.

KFAC_OPTS = {
    "consistent-kfac": lambda m: ConsistentSAM(
        m.parameters(), torch.optim.SGD, rho=0.2, rho2=0.3, alpha=0.5, lr=0.1, momentum=0.9,
        preconditioner="kfac", model=m, damping=1e-2, stat_decay=0.6),
    "nonuniform": lambda m: NonuniformSAM(
        m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=m,
        damping=1e-2, stat_decay=0.6),
}


def scaled_closure_for(model, x, y, scaler, poison_on=None):
    calls = []

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if len(calls) == poison_on:
            model[0].weight.grad[0, 0] = float("inf")
        return loss

    return closure


def kfac_state(opt, model):
    keys = ("kfac_A", "kfac_G", "consistent_momentum")
    return {(k, i): opt.extra_state[p][k].clone()
            for i, p in enumerate(model.parameters()) for k in keys if k in opt.extra_state[p]}


@pytest.mark.parametrize("make", KFAC_OPTS.values(), ids=KFAC_OPTS.keys())
def test_kfac_grad_scaler_matches_unscaled(make):
    x, y = data()
    x = x.float()
    model_a, model_b = mlp().float(), mlp().float()
    opt_a, opt_b = make(model_a), make(model_b)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):
        opt_a.step(scaled_closure_for(model_a, x, y, disabled), scaler=disabled)
        opt_b.step(scaled_closure_for(model_b, x, y, scaler), scaler=scaler)
        scaler.update()
    assert scaler.get_scale() == 2.0**10  # no overflow: the scale stayed
    state_a, state_b = kfac_state(opt_a, model_a), kfac_state(opt_b, model_b)
    assert state_a.keys() == state_b.keys() and any(k[0] == "kfac_G" for k in state_a)
    for k in state_a:
        torch.testing.assert_close(state_b[k], state_a[k], rtol=1e-5, atol=1e-6, msg=str(k))
    assert opt_a.kfac.steps == opt_b.kfac.steps == 3
    for p, q in zip(model_b.parameters(), model_a.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, poison_on", [
    ("consistent-kfac", 1), ("consistent-kfac", 2), ("consistent-kfac", 3), ("nonuniform", 1), ("nonuniform", 2),
])
def test_kfac_grad_scaler_skipped_step_changes_no_state(name, poison_on):
    """An inf in pass ``poison_on``: the scaler skips the step."""
    x, y = data()
    x = x.float()
    model = mlp().float()
    opt = KFAC_OPTS[name](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt.step(scaled_closure_for(model, x, y, scaler), scaler=scaler)
    scaler.update()
    w = [p.detach().clone() for p in model.parameters()]
    state = kfac_state(opt, model)
    base = copy.deepcopy(opt.base_optimizer.state_dict())
    steps = opt.kfac.steps
    opt.step(scaled_closure_for(model, x, y, scaler, poison_on=poison_on), scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 2.0**9  # the scaler saw the inf and skipped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    after = kfac_state(opt, model)
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state), "factors or m changed"
    assert opt.kfac.steps == steps
    assert not opt.kfac.factors.pending
    now = opt.base_optimizer.state_dict()
    for k, v in base["state"].items():
        assert torch.equal(now["state"][k]["momentum_buffer"], v["momentum_buffer"])
    opt.step(scaled_closure_for(model, x, y, scaler), scaler=scaler)  # training goes on
    assert opt.kfac.steps == steps + 1


@pytest.mark.parametrize("make", [
    lambda m: ConsistentSAM(m.parameters(), torch.optim.SGD, lr=0.1, rho2=0.3),
    KFAC_OPTS["consistent-kfac"],
], ids=["plain", "kfac"])
def test_grad_scaler_lowers_scale_on_inf_in_middle_pass(make):
    # middle_step unscales g2 itself, so the scaler never saw its inf: the
    # scale stayed where it overflowed and every later step was skipped.
    # Overflow in the middle pass whenever the scale exceeds 2**8: the scale
    # must come down to it and training go on.
    x, y = data()
    model = mlp().float()
    opt = make(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    moved = 0
    for _ in range(5):
        w = [p.detach().clone() for p in model.parameters()]
        poison = 2 if scaler.get_scale() > 2.0**8 else None
        opt.step(scaled_closure_for(model, x.float(), y, scaler, poison_on=poison), scaler=scaler)
        scaler.update()
        moved += not all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    assert scaler.get_scale() == 2.0**8
    assert moved == 3


@pytest.mark.parametrize("layout", ["batch-first", "sequence-first", "flattened"])
@pytest.mark.parametrize("variant", [ConsistentSAM, NonuniformSAM])
def test_kfac_factors_count_samples_not_the_layers_leading_dimension(layout, variant):
    # The running factors took the layer's leading dimension as the batch
    # size: T sequence first, B * T flattened, so G was off by T / B or T.
    # The first update's factors are the batch's, as kfac_variance forms them.
    torch.manual_seed(0)
    model = cases.LinearLayouts(layout).to(torch.float64)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    from flatness.nonuniformity import kfac_variance

    want = kfac_variance(model, (x, y), factors=True).factors["lin"]
    kw = dict(preconditioner="kfac") if variant is ConsistentSAM else {}
    opt = variant(model.parameters(), torch.optim.SGD, lr=0.1, model=model, **kw)
    opt.step(closure_for(model, x, y))
    state = opt.extra_state[model.lin.weight]
    torch.testing.assert_close(state["kfac_A"], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["kfac_G"], want[1], rtol=1e-12, atol=1e-14)


def test_nonuniform_sam_kfac_of_bfloat16_parameters_in_float32():
    # bfloat16 parameters had bfloat16 Kronecker factors (the running
    # average rounded to 3 digits), eigenvectors and solve: F^-1 g was 1.4%
    # off float64 on the same stored factors and gradients, sqrt(g^T F^-1 g)
    # 0.34% off (a bfloat16 sum).  Now float32 factors and solve: 5e-7
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(torch.bfloat16)
    x, y = torch.randn(64, 16).to(torch.bfloat16), torch.randint(0, 4, (64,))
    opt = NonuniformSAM(m.parameters(), torch.optim.SGD, lr=0.1, model=m, damping=1e-3)
    for _ in range(3):
        opt.step(lambda: F.cross_entropy(m(x).float(), y).backward())
    with opt.first_pass():
        F.cross_entropy(m(x).float(), y).backward()
    ps = list(m.parameters())
    vs = [p.grad.clone() for p in ps]
    solved, norm = opt.kfac.solve([ps], [vs])  # with the factors of the steps before
    want = []
    for i in (0, 2):  # float64 on the stored factors: (A (x) G + damping)^-1 [dW | db]
        st = opt.extra_state[ps[i]]
        assert st["kfac_A"].dtype == st["kfac_G"].dtype == torch.float32
        da, qa = torch.linalg.eigh(st["kfac_A"].double())
        dg, qg = torch.linalg.eigh(st["kfac_G"].double())
        v = torch.cat([vs[i].double(), vs[i + 1].double()[:, None]], 1)
        r = qg @ ((qg.T @ v @ qa) / (dg.clamp_min(0)[:, None] * da.clamp_min(0)[None, :] + 1e-3)) @ qa.T
        want += [r[:, :-1], r[:, -1]]
    got = torch.cat([s.double().flatten() for s in solved[0]])
    flat_want = torch.cat([w.flatten() for w in want])
    assert float((got - flat_want).norm() / flat_want.norm()) < 1e-5
    q = sum(float((v.double() * w).sum()) for v, w in zip(vs, want))
    assert abs(float(norm) - q**0.5) < 1e-5 * q**0.5
    opt.first_step(zero_grad=True)
    F.cross_entropy(m(x).float(), y).backward()
    opt.second_step(zero_grad=True)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in m.parameters())
