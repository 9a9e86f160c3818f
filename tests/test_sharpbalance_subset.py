"""SAM on part of a batch (flatness.optim.subset_sam_step) against a written-out reference."""

from __future__ import annotations

import copy

import cases
import pytest
import torch
import torch.nn.functional as F

from flatness.optim import SAM, subset_sam_step


def mlp():
    return cases.mlp(0, (4, 6, 3))


def batch(n=10, seed=1):
    return cases.classification_batch(n, (4,), 3, seed)


MASK = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool)


def reference_step(model, x, y, mask, rho, lr, momentum, steps, adaptive=False):
    """Mixed gradient written out from its definition, then plain SGD with
    momentum by hand:  g = |P|/|B| grad L_P(w) + |S|/|B| grad L_S(w + e)."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    buf = [torch.zeros_like(p) for p in params]
    fs = mask.double().mean().item()
    for step in range(steps):
        w = [p.detach().clone() for p in params]
        g_plain = [torch.zeros_like(p) for p in params]
        if (~mask).any():
            g_plain = torch.autograd.grad(F.cross_entropy(model(x[~mask]), y[~mask]), params)
        g_s = torch.autograd.grad(F.cross_entropy(model(x[mask]), y[mask]), params)
        t = [p.detach().abs() if adaptive else torch.ones_like(p) for p in params]
        norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g_s)))
        with torch.no_grad():
            for p, ti, gi in zip(params, t, g_s):
                p.add_(rho * ti**2 * gi / norm)
        g_pert = torch.autograd.grad(F.cross_entropy(model(x[mask]), y[mask]), params)
        with torch.no_grad():
            for i, p in enumerate(params):
                g = (1 - fs) * g_plain[i] + fs * g_pert[i]
                # torch.optim.SGD: the first step seeds the buffer with g
                buf[i] = g.clone() if step == 0 else momentum * buf[i] + g
                p.copy_(w[i] - lr * buf[i])
    return model


@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_written_out_reference(adaptive):
    model = mlp()
    x, y = batch()
    ref = reference_step(model, x, y, MASK, rho=0.1, lr=0.1, momentum=0.9, steps=3, adaptive=adaptive)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.1, momentum=0.9)
    losses = [subset_sam_step(opt, model, x, y, MASK) for _ in range(3)]
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    assert all(p.grad is None for p in model.parameters())
    # the returned loss is the batch mean at w (before the step)
    with torch.no_grad():
        assert losses[0] == pytest.approx(F.cross_entropy(mlp()(x), y).item(), rel=1e-12)


def test_all_true_mask_is_sam():
    x, y = batch()
    a, b = mlp(), mlp()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    def closure():
        loss = F.cross_entropy(b(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        subset_sam_step(opt_a, a, x, y, torch.ones(10, dtype=torch.bool))
        opt_b.step(closure)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-15)


def test_all_false_mask_is_the_base_optimizer():
    x, y = batch()
    a, b = mlp(), mlp()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        subset_sam_step(opt_a, a, x, y, torch.zeros(10, dtype=torch.bool))
        opt_b.zero_grad()
        F.cross_entropy(b(x), y).backward()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_failure_in_second_pass_restores_weights_and_drops_stash():
    model = mlp()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def flaky_loss(out, t):
        calls["n"] += 1
        if calls["n"] == 3:  # plain part, SAM part at w, then SAM part at w + e
            raise RuntimeError("nan detector")
        return F.cross_entropy(out, t)

    with pytest.raises(RuntimeError, match="nan detector"):
        subset_sam_step(opt, model, x, y, MASK, flaky_loss)
    for p, w in zip(model.parameters(), before):
        assert torch.equal(p, w)
    assert not opt.is_perturbed
    # the next step is a clean one: same as a fresh optimizer's step
    fresh = mlp()
    opt_fresh = SAM(fresh.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    subset_sam_step(opt, model, x, y, MASK)
    subset_sam_step(opt_fresh, fresh, x, y, MASK)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_bad_input():
    model = mlp()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(ValueError, match=r"bool tensor of shape \(10,\)"):
        subset_sam_step(opt, model, x, y, MASK.long())
    with pytest.raises(ValueError, match=r"bool tensor of shape \(10,\)"):
        subset_sam_step(opt, model, x, y, MASK[:5])
    with pytest.raises(TypeError, match="sharpness-aware optimizer"):
        subset_sam_step(torch.optim.SGD(model.parameters(), lr=0.1), model, x, y, MASK)
