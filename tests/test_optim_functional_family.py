"""The SAM family's arithmetic (flatness.optim._family_functional, and
natural_ascent_ of flatness.optim._functional) on hand-made tensors: small
cases computed by hand, and the formulas written out on flat float64 vectors."""

import math

import pytest
import torch

from flatness.optim._family_functional import (
    bsam_direction,
    bsam_noise,
    bsam_update_,
    ema_update_,
    esam_select,
    esam_swp_mask,
    friendly_direction_,
    friendly_momentum_,
    gsam_rho,
    inner,
    looksam_gradient_,
    looksam_orthogonal_,
    mesa_trajectory_loss,
    wsam_gradient_,
)
from flatness.optim._functional import natural_ascent_, nonuniform_scale

DT = torch.float64


def t(*xs):
    return torch.tensor(xs, dtype=DT)


def _groups(seed=0, shapes=(((3, 2), (2,)), ((4,),))):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=DT) for s in grp] for grp in shapes]


def _flat(groups):
    return torch.cat([x.reshape(-1) for grp in groups for x in grp])


def _copy(groups):
    return [[x.clone() for x in grp] for grp in groups]


def test_inner_over_groups():
    a, b = _groups(0), _groups(1)
    torch.testing.assert_close(inner(a, b), _flat(a) @ _flat(b), rtol=1e-14, atol=0)
    assert inner([], []) == 0


# -- WSAM ---------------------------------------------------------------------------


def test_wsam_coupled_by_hand():
    # gamma = 0.2: a = 0.25, the base step gets 0.75 g + 0.25 g_s
    gs, g = [t(3.0, -1.0)], [t(1.0, 2.0)]
    assert wsam_gradient_(gs, g, 0.25, decouple=False) is None
    torch.testing.assert_close(gs[0], t(1.5, 1.25), rtol=1e-15, atol=0)
    # gamma = 1/2 (a = 1), coupled: SAM's gradient g_s
    gs = [t(3.0, -1.0)]
    wsam_gradient_(gs, [t(1.0, 2.0)], 1.0, decouple=False)
    torch.testing.assert_close(gs[0], t(3.0, -1.0), rtol=0, atol=0)


@pytest.mark.parametrize("decouple", [False, True])
def test_wsam_a_zero_is_the_plain_gradient(decouple):
    gs, g = [t(3.0, -1.0)], [t(1.0, 2.0)]
    assert wsam_gradient_(gs, g, 0.0, decouple=decouple) is None
    assert torch.equal(gs[0], t(1.0, 2.0))


def test_wsam_decoupled_by_hand_with_a_grad_scaler_scale():
    # g_s = (3, -1) carried at scale 4, g = (1, 2) unscaled
    gs, g = [t(12.0, -4.0)], [t(1.0, 2.0)]
    sharp = wsam_gradient_(gs, g, 9.0, decouple=True, scale=4.0)
    torch.testing.assert_close(sharp[0], t(2.0, -3.0), rtol=0, atol=0)  # g_s - g, unscaled
    torch.testing.assert_close(gs[0], t(4.0, 8.0), rtol=0, atol=0)  # g in the scaler's units
    torch.testing.assert_close(g[0], t(4.0, 8.0), rtol=0, atol=0)


def test_wsam_total_gradient_against_formula():
    """Coupled: (1 - a) g + a g_s; decoupled: g for the base step plus a (g_s - g)."""
    (gs0,), (g0,) = _groups(2, shapes=(((5,),),)), _groups(3, shapes=(((5,),),))
    a = 0.9 / 0.1
    gs = [x.clone() for x in gs0]
    wsam_gradient_(gs, [x.clone() for x in g0], a, decouple=False)
    torch.testing.assert_close(_flat([gs]), _flat([g0]) + a * (_flat([gs0]) - _flat([g0])), rtol=1e-13, atol=0)
    gs = [x.clone() for x in gs0]
    sharp = wsam_gradient_(gs, [x.clone() for x in g0], a, decouple=True)
    torch.testing.assert_close(_flat([gs]) + a * _flat([sharp]), _flat([g0]) + a * (_flat([gs0]) - _flat([g0])),
                               rtol=1e-13, atol=0)


# -- Friendly SAM ---------------------------------------------------------------------


def test_friendly_direction_and_momentum_by_hand():
    d, m = [t(1.0, 2.0)], [t(0.5, -1.0)]
    friendly_direction_(d, m, 1.0)
    assert torch.equal(d[0], t(0.5, 3.0))  # g - m
    friendly_momentum_(m, d, 0.9, 1.0)
    torch.testing.assert_close(m[0], t(0.55, -0.7), rtol=1e-15, atol=0)  # 0.9 m + 0.1 g


@pytest.mark.parametrize("sigma, lmbda", [(1.0, 0.9), (0.5, 0.6), (0.0, 0.95), (2.0, 1.0)])
def test_friendly_momentum_is_the_moving_average_of_g(sigma, lmbda):
    g, m0 = _groups(4)[0], _groups(5)[0]
    d, m = [x.clone() for x in g], [x.clone() for x in m0]
    friendly_direction_(d, m, sigma)
    for x, gx, mx in zip(d, g, m0):
        torch.testing.assert_close(x, gx - sigma * mx, rtol=1e-15, atol=0)
    friendly_momentum_(m, d, lmbda, sigma)
    for x, gx, mx in zip(m, g, m0):
        torch.testing.assert_close(x, lmbda * mx + (1 - lmbda) * gx, rtol=1e-13, atol=1e-15)


# -- GSAM -----------------------------------------------------------------------------


def test_gsam_rho_schedule_by_hand():
    assert gsam_rho(0.5, 0.1, 0.01, 0.0, 1.0) == pytest.approx(0.055, rel=1e-15)
    assert gsam_rho(1.0, 0.1, 0.01, 0.0, 1.0) == pytest.approx(0.1, rel=1e-15)  # lr_max: rho
    assert gsam_rho(0.2, 0.1, 0.01, 0.2, 1.0) == pytest.approx(0.01, rel=1e-15)  # lr_min: rho_min
    assert gsam_rho(0.6, 0.1, 0.01, 0.2, 1.0) == pytest.approx(0.055, rel=1e-14)  # halfway from lr_min
    assert gsam_rho(0.3, 0.1, None, 0.0, 1.0) == 0.1  # no schedule
    assert gsam_rho(0.3, 0.1, 0.01, 1.0, 1.0) == 0.1  # lr_max <= lr_min: constant


# -- LookSAM -------------------------------------------------------------------------


def test_looksam_orthogonal_by_hand():
    first = [[t(1.0, 0.0)]]
    out = looksam_orthogonal_(first, [[t(2.0, 3.0)]])
    assert torch.equal(out[0][0], t(0.0, 3.0))
    assert out[0] is first[0]  # jointly: computed in the buffers of g
    # a zero g: nothing to remove, g_v = g_s (no NaN)
    out = looksam_orthogonal_([[t(0.0, 0.0)]], [[t(2.0, 3.0)]])
    assert torch.equal(out[0][0], t(2.0, 3.0))


def test_looksam_orthogonal_joint_against_formula():
    g, gs = _groups(6), _groups(7)
    out = looksam_orthogonal_(_copy(g), gs)
    fg, fgs = _flat(g), _flat(gs)
    ref = fgs - (fg @ fgs) / (fg @ fg) * fg
    torch.testing.assert_close(_flat(out), ref, rtol=1e-13, atol=1e-15)
    assert abs(float(_flat(out) @ fg)) < 1e-12


def test_looksam_orthogonal_per_tensor_against_formula():
    g, gs = _groups(8), _groups(9)
    out = looksam_orthogonal_(_copy(g), gs, per_tensor=True)
    for vs, xs, ys in zip(out, g, gs):
        for v, x, y in zip(vs, xs, ys):
            x, y = x.reshape(-1), y.reshape(-1)
            torch.testing.assert_close(v.reshape(-1), y - (x @ y) / (x @ x) * x, rtol=1e-13, atol=1e-15)


def test_looksam_gradient_by_hand():
    # g = (3, 4), ||g|| = 5; g_v = (0, 2), ||g_v|| = 2; alpha = 0.5: g + 0.5 * 5/2 * g_v
    g = [[t(3.0, 4.0)]]
    looksam_gradient_(g, [[t(0.0, 2.0)]], [0.5])
    torch.testing.assert_close(g[0][0], t(3.0, 6.5), rtol=1e-15, atol=0)
    g = [[t(3.0, 4.0)]]
    looksam_gradient_(g, [[t(0.0, 0.0)]], [0.5])  # g_v = 0: g unchanged
    assert torch.equal(g[0][0], t(3.0, 4.0))


def test_looksam_gradient_joint_and_per_tensor_against_formula():
    g, gv, alpha = _groups(10), _groups(11), [0.7, 0.2]
    ratio = float(_flat(g).norm() / _flat(gv).norm())
    out = _copy(g)
    looksam_gradient_(out, gv, alpha)
    for a, xs, ys, zs in zip(alpha, out, g, gv):
        for x, y, z in zip(xs, ys, zs):
            torch.testing.assert_close(x, y + a * ratio * z, rtol=1e-13, atol=1e-15)
    given = _copy(g)  # a given ||g_v|| is the one used (here twice the true one: half the term)
    looksam_gradient_(given, gv, alpha, gv_norm=2 * _flat(gv).norm())
    for a, xs, ys, zs in zip(alpha, given, g, gv):
        for x, y, z in zip(xs, ys, zs):
            torch.testing.assert_close(x, y + a * ratio / 2 * z, rtol=1e-13, atol=1e-15)
    out = _copy(g)
    looksam_gradient_(out, gv, alpha, per_tensor=True)
    for a, xs, ys, zs in zip(alpha, out, g, gv):
        for x, y, z in zip(xs, ys, zs):
            torch.testing.assert_close(x, y + a * float(y.norm() / z.norm()) * z, rtol=1e-13, atol=1e-15)



def test_inner_of_half_precision_tensors_in_float32():
    # bfloat16 per-tensor dots were rounded to 3 digits before the sum over
    # tensors: +300.75 - 298.8 = 1.953 came out 2.0 (2.4% off); a float16
    # dot past 65504 was inf.  Now float32, against float64 of the same inputs
    a = [[torch.ones(1000, dtype=torch.bfloat16)], [torch.ones(1000, dtype=torch.bfloat16)]]
    b = [[torch.full((1000,), 0.3, dtype=torch.bfloat16)], [torch.full((1000,), -0.299, dtype=torch.bfloat16)]]
    ref = sum(float(x.double() @ y.double()) for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    got = inner(a, b)
    assert got.dtype == torch.float32
    assert abs(float(got) - ref) <= 1e-6 * abs(ref)
    x = torch.full((10000,), 30.0, dtype=torch.float16)
    assert float(inner([[x]], [[x]])) == 9e6


def test_looksam_per_tensor_half_precision_norms_in_float32():
    # float16 per-tensor ||g||^2 of a small gradient (||g|| ~ 7e-4) was 0 or
    # its inverse inf: g_v (and then the gradient) NaN; now float32 norms
    gen = torch.Generator().manual_seed(0)
    g = [[(torch.randn(50, generator=gen) * 1e-4).half()]]
    gs = [[(torch.randn(50, generator=gen) * 1e-4).half()]]
    x, y = g[0][0].double(), gs[0][0].double()
    want = y - (x @ y) / (x @ x) * x
    out = looksam_orthogonal_(_copy(g), gs, per_tensor=True)
    torch.testing.assert_close(out[0][0].double(), want, rtol=0, atol=2e-7)
    gr = _copy(gs)
    looksam_gradient_(gr, g, [0.5], per_tensor=True)
    torch.testing.assert_close(gr[0][0].double(), y + 0.5 * float(y.norm() / x.norm()) * x, rtol=0, atol=2e-7)


# -- ESAM -----------------------------------------------------------------------------


def test_esam_swp_mask_is_the_generator_draws():
    keep = esam_swp_mask(6, 0.6, torch.Generator().manual_seed(3))
    ref = (torch.rand(6, generator=torch.Generator().manual_seed(3)) < 0.6).tolist()
    assert keep == ref
    # beta so small that no tensor is kept: one more draw picks exactly one
    gen, ref_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    keep = esam_swp_mask(5, 1e-9, gen)
    torch.rand(5, generator=ref_gen)
    picked = int(torch.randint(5, (1,), generator=ref_gen))
    assert keep == [i == picked for i in range(5)]
    assert esam_swp_mask(0, 0.5, torch.Generator()) == []


def test_esam_swp_mask_keeps_a_fraction_beta():
    gen = torch.Generator().manual_seed(1)
    n, beta = 4000, 0.3
    kept = sum(esam_swp_mask(n, beta, gen))
    assert abs(kept - n * beta) < 4 * math.sqrt(n * beta * (1 - beta))


def test_esam_select_by_hand():
    before, after = t(1.0, 1.0, 1.0, 1.0), t(1.5, 3.0, 0.0, 2.0)  # rises 0.5, 2, -1, 1
    assert esam_select(before, after, 0.5).tolist() == [False, True, False, True]
    assert esam_select(before, after, 0.1).tolist() == [False, True, False, False]  # at least one
    assert esam_select(before, after, 1.0).tolist() == [True] * 4
    assert esam_select(before, after, 0.75).tolist() == [True, True, False, True]  # int(3.0)
    assert esam_select(before, after, 0.7).tolist() == [False, True, False, True]  # int(2.8): rounded down
    # the rise from w, not the loss at w + e: sample 1 has the largest loss, sample 3 the largest rise
    before = t(1.0, 2.5, 0.0, 1.0)  # rises 0.5, 0.5, 0, 1
    assert esam_select(before, after, 0.25).tolist() == [False, False, False, True]


# -- Bayesian SAM ---------------------------------------------------------------------


def test_bsam_noise_is_scaled_generator_draws():
    params = [torch.zeros(3, 2, dtype=DT), torch.zeros(4, dtype=DT)]
    s = [torch.full((3, 2), 4.0, dtype=DT), t(1.0, 2.0, 0.5, 8.0)]
    eps = bsam_noise(params, s, 100, torch.Generator().manual_seed(7))
    ref_gen = torch.Generator().manual_seed(7)
    for e, p, si in zip(eps, params, s):
        z = torch.randn(p.shape, generator=ref_gen, dtype=DT)
        torch.testing.assert_close(e, z / torch.sqrt(100 * si), rtol=1e-14, atol=0)


def test_bsam_direction_by_hand():
    e, inc = bsam_direction([t(2.0, -3.0)], [t(4.0, 9.0)], 0.1)
    torch.testing.assert_close(e.tensors[0] * e.scale, t(0.05, -1 / 30), rtol=1e-15, atol=0)
    torch.testing.assert_close(inc[0], t(4.0, 9.0), rtol=0, atol=0)  # sqrt(s) |g|


def test_bsam_update_by_hand():
    w, m, s = t(1.0), t(0.0), t(2.0)
    bsam_update_([w], [t(0.5)], [m], [s], [t(3.0)], lr=0.1, betas=(0.9, 0.99), weight_decay=0.01, damping=0.1)
    # g_m = 0.1 (0.5 + 0.01 * 1); w = 1 - 0.1 g_m / 2 (the old s); s = 0.99 * 2 + 0.01 (3 + 0.01 + 0.1)
    torch.testing.assert_close(m, t(0.051), rtol=1e-14, atol=0)
    torch.testing.assert_close(w, t(1 - 0.1 * 0.051 / 2), rtol=1e-14, atol=0)
    torch.testing.assert_close(s, t(0.99 * 2 + 0.01 * 3.11), rtol=1e-14, atol=0)


# -- MESA -----------------------------------------------------------------------------


def test_mesa_trajectory_loss_against_formula():
    g = torch.Generator().manual_seed(12)
    out = torch.randn(3, 4, 5, generator=g, dtype=DT, requires_grad=True)
    teacher = torch.randn(3, 4, 5, generator=g, dtype=DT)
    tau, lam = 2.0, 0.3
    loss = mesa_trajectory_loss(out, teacher, tau, lam)
    q = torch.exp(teacher / tau) / torch.exp(teacher / tau).sum(-1, keepdim=True)
    p = torch.exp(out / tau) / torch.exp(out / tau).sum(-1, keepdim=True)
    ref = lam * tau**2 * (q * (q.log() - p.log())).sum(-1).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    loss.backward()  # differentiable in the outputs
    assert out.grad is not None and out.grad.abs().sum() > 0
    same = mesa_trajectory_loss(teacher, teacher, tau, lam)
    torch.testing.assert_close(same, torch.zeros((), dtype=DT), rtol=0, atol=1e-14)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mesa_trajectory_loss_of_half_precision_logits_in_float32(dtype):
    # teacher and student logits close (KL ~1.5e-3): in bfloat16 the loss was
    # 109% and its gradient 60% off float64 on the same logits (float16: 15%,
    # 8%); now a float32 loss within 1e-3, the gradient within its rounding
    gen = torch.Generator().manual_seed(0)
    out = (torch.randn(64, 100, generator=gen) * 3).to(dtype).requires_grad_()
    teacher = (out.detach().float() + torch.randn(64, 100, generator=gen) * 0.1).to(dtype)
    loss = mesa_trajectory_loss(out, teacher, 5.0, 0.3)
    loss.backward()
    ref_out = out.detach().double().requires_grad_()
    ref = mesa_trajectory_loss(ref_out, teacher.double(), 5.0, 0.3)
    ref.backward()
    assert loss.dtype == torch.float32 and out.grad.dtype == dtype
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-3 * float(ref.detach())
    assert float((out.grad.double() - ref_out.grad).norm() / ref_out.grad.norm()) < 5e-3

def test_ema_update_by_hand():
    ema = [t(1.0, 2.0)]
    ema_update_(ema, [t(3.0, 4.0)], 0.9)
    torch.testing.assert_close(ema[0], t(1.2, 2.2), rtol=1e-15, atol=0)
    ema_update_([], [], 0.9)  # nothing to average


# -- NonuniformSAM / consistent SAM's K-FAC ascent ---------------------------------------


@pytest.mark.parametrize("mode", ["second_moment", "centered", "gam"])
def test_natural_ascent_against_formula(mode):
    solved, rho = _groups(13), [0.05, 0.2]
    norm = torch.tensor(0.6, dtype=DT)
    out = _copy(solved)
    natural_ascent_(out, norm, rho, mode)
    c = float(nonuniform_scale(norm, mode))
    for r, es, xs in zip(rho, out, solved):
        for e, x in zip(es, xs):
            torch.testing.assert_close(e, r * c * x, rtol=1e-14, atol=0)
    zero = _copy(solved)
    natural_ascent_(zero, torch.zeros((), dtype=DT), rho, mode)  # q = 0: a zero ascent
    assert all(bool((e == 0).all()) for es in zero for e in es)
