"""flatness.optim.SAM: the update against the textbook rule written out in
float64 (plain autograd gradients, hand-written SGD-momentum and AdamW), rho = 0
as the base optimizer bit for bit, gradient accumulation, a peer port.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import BASES, DT, assert_same, closure_for, params_of, ref_ascent, ref_grad
from cases import sam_data as data
from cases import sam_mlp as mlp

from flatness.optim import SAM

# ----------------------------------------------------------------------
# rho = 0 is the base optimizer, bit for bit
# ----------------------------------------------------------------------


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("style", ["closure", "two_step"])
def test_rho_zero_is_base_optimizer_bit_for_bit(base, style):
    cls, kw, _ = BASES[base]
    x, y = data()
    model, ref = mlp(), mlp()
    opt = SAM(model.parameters(), cls, rho=0.0, **kw)
    plain = cls(ref.parameters(), **kw)
    for _ in range(10):
        if style == "closure":
            opt.step(closure_for(model, opt, x, y))
        else:
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        plain.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        plain.step()
    assert_same(params_of(model), params_of(ref))
    for p, q in zip(model.parameters(), ref.parameters()):
        for key, val in plain.state[q].items():
            assert torch.equal(torch.as_tensor(opt.state[p][key]), torch.as_tensor(val))


# ----------------------------------------------------------------------
# the textbook update, 10 steps
# ----------------------------------------------------------------------


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_ten_steps_match_textbook_reference(base, adaptive, eta):
    cls, kw, make_ref = BASES[base]
    rho = 0.5 if adaptive else 0.05
    x, y = data()
    model = mlp()
    w = params_of(model)
    opt = SAM(model.parameters(), cls, rho=rho, adaptive=adaptive, eta=eta, **kw)
    ref_step = make_ref()
    for _ in range(10):
        loss = opt.step(closure_for(model, opt, x, y))
        g = ref_grad(model, w, x, y)
        e = ref_ascent(w, g, rho, adaptive, eta)
        g2 = ref_grad(model, [wi + ei for wi, ei in zip(w, e)], x, y)
        w = ref_step(w, g2)
        assert loss.dtype == DT
    for p, r in zip(model.parameters(), w):
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)
    # the trajectory really moved away from the start
    assert not torch.allclose(w[0], params_of(mlp())[0])


def test_first_step_lands_at_w_plus_e_and_second_step_restores_exactly():
    x, y = data()
    model = mlp()
    w = params_of(model)
    ptrs = [p.data_ptr() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.0)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    e = ref_ascent(w, ref_grad(model, w, x, y), 0.3)
    for p, wi, ei in zip(model.parameters(), w, e):
        torch.testing.assert_close(p.detach(), wi + ei, rtol=1e-12, atol=1e-14)
    assert opt.is_perturbed
    total = torch.cat([ei.flatten() for ei in e]).norm()
    torch.testing.assert_close(total, torch.tensor(0.3, dtype=DT))
    opt.second_step()  # lr = 0: weights are exactly w again
    assert_same(params_of(model), w)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert not opt.is_perturbed


def test_zero_gradient_gives_no_perturbation_not_nan():
    model = mlp()
    w = params_of(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.first_step()
    assert_same(params_of(model), w)
    opt.second_step()
    assert_same(params_of(model), w)


def test_base_optimizer_instance_equals_class():
    x, y = data()
    a, b = mlp(), mlp()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_b = SAM(None, torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    for _ in range(3):
        opt_a.step(closure_for(a, opt_a, x, y))
        opt_b.step(closure_for(b, opt_b, x, y))
    assert_same(params_of(a), params_of(b))


# ----------------------------------------------------------------------
# gradient accumulation
# ----------------------------------------------------------------------


def test_gradient_accumulation_equals_full_batch():
    x, y = data(n=24)
    full, acc = mlp(), mlp()
    opt_full = SAM(full.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_acc = SAM(acc.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    chunks = list(zip(x.split(8), y.split(8)))
    for _ in range(3):
        opt_full.step(closure_for(full, opt_full, x, y))
        for xi, yi in chunks:  # micro-batches before first_step
            (F.cross_entropy(acc(xi), yi) / len(chunks)).backward()
        opt_acc.first_step(zero_grad=True)
        for xi, yi in chunks:
            (F.cross_entropy(acc(xi), yi) / len(chunks)).backward()
        opt_acc.second_step(zero_grad=True)
    for p, q in zip(full.parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------
# peers and odds and ends
# ----------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_pytorch_optimizer_port_of_community_sam(adaptive):
    peer_mod = pytest.importorskip("pytorch_optimizer")
    x, y = data()
    ours, theirs = mlp(), mlp()
    rho = 0.5 if adaptive else 0.05
    opt = SAM(ours.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1, momentum=0.9)
    peer = peer_mod.SAM(theirs.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1, momentum=0.9)
    for _ in range(5):
        opt.step(closure_for(ours, opt, x, y))
        peer.zero_grad()
        closure_for(theirs, peer, x, y)()
        peer.step(closure_for(theirs, peer, x, y))
    for p, q in zip(ours.parameters(), theirs.parameters()):
        # the port adds 1e-12 to the norm; everything else is the same math
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


def test_global_rng_untouched_without_dropout():
    x, y = data()
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, same_rng=True)
    before = torch.get_rng_state()
    opt.step(closure_for(model, opt, x, y))
    assert torch.equal(torch.get_rng_state(), before)


def test_fused_and_device_paths_of_the_scaled_add_agree():
    from flatness.optim._functional import add_scaled

    torch.manual_seed(0)
    w = [torch.randn(3, 4, dtype=DT), torch.randn(5, dtype=DT)]
    g = [torch.randn(3, 4, dtype=DT), torch.randn(5, dtype=DT)]
    a, b = [t.clone() for t in w], [t.clone() for t in w]
    scale = torch.tensor(0.37, dtype=DT)
    add_scaled(a, g, scale, fused=True)
    add_scaled(b, g, scale, fused=False)  # the path taken on CUDA
    for u, v, wi, gi in zip(a, b, w, g):
        torch.testing.assert_close(u, wi + 0.37 * gi, rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(v, wi + 0.37 * gi, rtol=1e-15, atol=1e-15)
