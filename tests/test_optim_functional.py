"""The functional core of flatness.optim (ascent directions on lists of
tensors) against the formulas written out by hand on flat float64 vectors."""

import math

import pytest
import torch

from flatness.optim._functional import (
    asam_weights,
    consistent_direction,
    consistent_momentum_,
    global_norm,
    nonuniform_scale,
    safe_inv,
    sam_direction,
)

DT = torch.float64


def _groups(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [[(3, 2), (2,)], [(4,)]]
    params = [[torch.randn(s, generator=g, dtype=DT) for s in grp] for grp in shapes]
    grads = [[torch.randn(s, generator=g, dtype=DT) for s in grp] for grp in shapes]
    return params, grads


def _flat(lists):
    return torch.cat([t.reshape(-1) for t in lists])


def test_sam_direction_plain_is_rho_g_over_joint_norm():
    params, grads = _groups()
    out = sam_direction(grads, params, [0.1, 0.3])
    norm = math.sqrt(sum(float((t * t).sum()) for gs in grads for t in gs))
    for rho, d, gs in zip([0.1, 0.3], out, grads):
        for t, g in zip(d.tensors, gs):
            torch.testing.assert_close(t * d.scale, rho * g / norm, rtol=1e-14, atol=0)
    # the plain groups' tensors are the gradients themselves (no copy)
    assert out[0].tensors[0] is grads[0][0]


def test_sam_direction_adaptive_against_formula():
    params, grads = _groups(1)
    eta = [0.01, 0.0]
    out = sam_direction(grads, params, 0.05, adaptive=[True, False], eta=eta)
    T = [[p.abs() + eta[0] for p in params[0]], [torch.ones_like(p) for p in params[1]]]
    tg = _flat([t * g for ts, gs in zip(T, grads) for t, g in zip(ts, gs)])
    norm = float(tg.norm())
    for d, ts, gs in zip(out, T, grads):
        for e, t, g in zip(d.tensors, ts, gs):
            torch.testing.assert_close(e * d.scale, 0.05 * t * t * g / norm, rtol=1e-13, atol=0)
    # ASAM weights
    torch.testing.assert_close(asam_weights(params[0], 0.01)[0], params[0][0].abs() + 0.01)


def test_sam_direction_zero_gradient_gives_zero():
    params, grads = _groups()
    zeros = [[torch.zeros_like(g) for g in gs] for gs in grads]
    out = sam_direction(zeros, params, 0.1, adaptive=True, eta=0.01)
    assert all(float((e * d.scale).abs().max()) == 0 for d in out for e in d.tensors)
    assert not any(torch.isnan(d.scale).any() for d in out)


def test_sam_direction_refuses_a_wrong_number_of_settings():
    params, grads = _groups()
    with pytest.raises(ValueError, match="one value per group"):
        sam_direction(grads, params, [0.1, 0.2, 0.3])


def test_consistent_momentum_and_direction_against_formula():
    params, g1 = _groups(2)
    _, g2 = _groups(3)
    _, m = _groups(4)
    alpha = [0.9, 0.0]
    diffs = [[b - a for a, b in zip(x, y)] for x, y in zip(g1, g2)]
    want_m = [[al * mm + (1 - al) * d for mm, d in zip(ms, ds)] for al, ms, ds in zip(alpha, m, diffs)]
    want_r = [[d - mm for d, mm in zip(ds, ms)] for ds, ms in zip(diffs, want_m)]
    got_m = [consistent_momentum_(ds, ms, al) for ds, ms, al in zip(diffs, m, alpha)]
    for a, b in zip(got_m, want_m):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-15)
    for a, b in zip(diffs, want_r):  # the residual, in place
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-15)
    T = [asam_weights(params[0], 0.01), None]
    e = consistent_direction(diffs, [0.2, 0.4], T)
    Tf = [T[0], [torch.ones_like(p) for p in params[1]]]
    norm = float(_flat([t * r for ts, rs in zip(Tf, want_r) for t, r in zip(ts, rs)]).norm())
    for rho2, es, ts, rs in zip([0.2, 0.4], e, Tf, want_r):
        for x, t, r in zip(es, ts, rs):
            torch.testing.assert_close(x, rho2 * t * t * r / norm, rtol=1e-13, atol=0)


def test_consistent_momentum_with_alpha_zero_is_the_change():
    # alpha = 0: m' = g2 - g1, so nothing is left to follow
    d = [torch.tensor([1.0, -2.0], dtype=DT)]
    m = consistent_momentum_(d, [torch.tensor([5.0, 7.0], dtype=DT)], 0.0)
    torch.testing.assert_close(m[0], torch.tensor([1.0, -2.0], dtype=DT))
    assert float(d[0].abs().max()) == 0
    e = consistent_direction([d], 0.1)
    assert float(e[0][0].abs().max()) == 0


@pytest.mark.parametrize("q", [0.0, 0.09, 0.64, 1.0, 2.25])
def test_nonuniform_scale_against_formula(q):
    r = math.sqrt(q)
    n = torch.tensor(r, dtype=DT)
    if q == 0:
        for mode in ("second_moment", "centered", "gam"):
            assert float(nonuniform_scale(n, mode)) == 0
        return
    assert float(nonuniform_scale(n, "second_moment")) == pytest.approx(1 / r, rel=1e-14)
    one_minus = 1 - q if q < 1 else 1 - math.exp(-q)
    assert float(nonuniform_scale(n, "centered")) == pytest.approx(1 / math.sqrt(q * one_minus), rel=1e-12)
    s = math.sqrt(max(1 - r, 0.0) if r <= 1 else 1 - math.exp(-r))
    assert float(nonuniform_scale(n, "gam")) == pytest.approx(1 / ((r + 1e-16) * (s + 1e-16)), rel=1e-12)
    with pytest.raises(ValueError, match="unknown mode"):
        nonuniform_scale(n, "nope")


def test_global_norm_and_safe_inv():
    _, grads = _groups()
    want = float(_flat([t for gs in grads for t in gs]).norm())
    assert float(global_norm(grads)) == pytest.approx(want, rel=1e-14)
    assert float(global_norm(grads, ord=float("inf"))) == float(_flat([t for gs in grads for t in gs]).abs().max())
    assert float(global_norm([])) == 0
    assert float(safe_inv(torch.tensor(0.0))) == 0 and float(safe_inv(torch.tensor(4.0))) == 0.25


@pytest.mark.parametrize("fused", [None, False], ids=["cpu-path", "device-path"])
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_gsam_gradient_against_formula(scale, fused):
    # fused=False: the per-tensor addcmul_ by an on-device coefficient that
    # runs on accelerators (never run on a GPU yet), checked here on the CPU
    from flatness.optim._functional import gsam_gradient_

    _, g = _groups(5)
    _, gp = _groups(6)
    alpha = [0.3, 0.0]
    gf, gpf = _flat([t for ts in g for t in ts]), _flat([t for ts in gp for t in ts])
    perp = gf - (gf @ gpf) / (gpf @ gpf) * gpf
    sizes = [sum(t.numel() for t in ts) for ts in g]
    perp0 = perp[: sizes[0]]
    want0 = _flat(gp[0]) - alpha[0] * scale * perp0
    want1 = _flat(gp[1]).clone()  # alpha = 0: untouched
    g1_before = _flat(g[1]).clone()
    gsam_gradient_(gp, g, alpha, scale, fused=fused)
    torch.testing.assert_close(_flat(gp[0]), want0, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(_flat(g[0]), perp0, rtol=1e-13, atol=1e-14)
    assert torch.equal(_flat(gp[1]), want1) and torch.equal(_flat(g[1]), g1_before)


def test_gsam_gradient_float16_dot_does_not_overflow():
    # <g, g_p> of float16 gradients summing past 65504 (here ~4.5e6) was an
    # inf in float16: an inf coefficient and NaN gradients; now in float32
    from flatness.optim._functional import gsam_gradient_

    gen = torch.Generator().manual_seed(0)
    g = [(torch.randn(100, 100, generator=gen) * 30).half()]
    gp = [(g[0].float() * 0.5 + torch.randn(100, 100, generator=gen)).half()]
    gf, gpf = _flat([t.double() for t in g]), _flat([t.double() for t in gp])
    perp = gf - (gf @ gpf) / (gpf @ gpf) * gpf
    gsam_gradient_([gp], [g], [0.5])
    torch.testing.assert_close(_flat(g).double(), perp, rtol=0, atol=0.05)  # float16 rounding of ~30
    torch.testing.assert_close(_flat(gp).double(), gpf - 0.5 * perp, rtol=0, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sam_direction_adaptive_half_precision_weights_in_float32(dtype):
    # ASAM's T = |w| + eta, T g and T^2 g in float16 fell into subnormals
    # for small gradients (|g| ~ 1e-5, |w| ~ 0.05): e was 2.3% off float64 on
    # the same float16 inputs (bfloat16: 4.5e-4, T rounded); now float32, 2e-8
    gen = torch.Generator().manual_seed(0)
    w = [(torch.randn(256, 64, generator=gen) * 0.05).to(dtype), (torch.randn(256, generator=gen) * 0.05).to(dtype)]
    g = [(torch.randn(256, 64, generator=gen) * 1e-5).to(dtype), (torch.randn(256, generator=gen) * 1e-5).to(dtype)]
    (out,) = sam_direction([g], [w], 0.05, adaptive=True, eta=0.01)
    e = _flat([t.double() * float(out.scale) for t in out.tensors])
    t = _flat([x.double().abs() + 0.01 for x in w])
    tg = t * _flat([x.double() for x in g])
    want = 0.05 * t * tg / tg.norm()
    assert float((e - want).norm() / want.norm()) < 1e-6
