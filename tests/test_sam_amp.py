"""flatness.optim.SAM under mixed precision: GradScaler (also with a closure)
and bf16 autocast, against unscaled runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import assert_same, closure_for, params_of
from cases import sam_data as data
from cases import sam_mlp as mlp

from flatness.optim import SAM

# ----------------------------------------------------------------------
# AMP: GradScaler and bf16 autocast
# ----------------------------------------------------------------------


def _scaled_step(model, opt, scaler, x, y, poison=None):
    """Two-step SAM with a GradScaler; ``poison`` puts an inf into one pass."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    if poison == "first":
        model[0].weight.grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True, scaler=scaler)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    if poison == "second":
        model[2].weight.grad[0, 0] = float("nan")
    opt.second_step(zero_grad=True, scaler=scaler)
    scaler.update()


def test_grad_scaler_matches_unscaled_run():
    x, y = data(dtype=torch.float32)
    a, b = mlp(dtype=torch.float32), mlp(dtype=torch.float32)
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):
        _scaled_step(a, opt_a, scaler, x, y)
        _scaled_step(b, opt_b, disabled, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(params_of(a)[0], params_of(mlp(dtype=torch.float32))[0])


@pytest.mark.parametrize("poison", ["first", "second"])
def test_grad_scaler_inf_skips_step_and_restores_weights(poison):
    x, y = data(dtype=torch.float32)
    model = mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    w = params_of(model)
    _scaled_step(model, opt, scaler, x, y, poison=poison)
    assert_same(params_of(model), w)
    assert not opt.is_perturbed
    assert opt.state[model[0].weight] == {}  # no momentum: the step was skipped
    assert scaler.get_scale() == 2.0**9
    _scaled_step(model, opt, scaler, x, y)  # training goes on
    assert not torch.equal(params_of(model)[0], w[0])


def test_bf16_autocast_without_scaler_matches_reference():
    x, y = data(dtype=torch.float32)
    model, ref = mlp(dtype=torch.float32), mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    # reference: same autocast passes, e and the SGD step written out
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.cross_entropy(ref(x), y).backward()
    g = [p.grad.clone() for p in ref.parameters()]
    norm = torch.cat([t.flatten() for t in g]).norm()
    with torch.no_grad():
        for p, gi in zip(ref.parameters(), g):
            p.add_(0.1 * gi / norm)
            p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.cross_entropy(ref(x), y).backward()
    w0 = params_of(mlp(dtype=torch.float32))
    for p, q, w in zip(model.parameters(), ref.parameters(), w0):
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), w - 0.1 * q.grad, rtol=1e-5, atol=1e-6)


def test_step_with_closure_and_grad_scaler():
    x, y = data(dtype=torch.float32)
    a, b = mlp(dtype=torch.float32), mlp(dtype=torch.float32)
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)

    def scaled_closure():
        loss = F.cross_entropy(a(x), y)
        scaler.scale(loss).backward()
        return loss

    loss = opt_a.step(scaled_closure, scaler=scaler)
    scaler.update()
    ref_loss = opt_b.step(closure_for(b, opt_b, x, y))
    torch.testing.assert_close(loss, ref_loss)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
