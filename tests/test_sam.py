"""flatness.optim.SAM: behaviours 1-5 and 7-12 of issue 4 (DDP is in
test_sam_ddp.py).  Math is checked in float64 against references written out
here (plain autograd gradients, hand-written SGD-momentum and AdamW)."""

from __future__ import annotations

import copy
import io

import cases
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from flatness.optim import SAM, AscentGroup, SharpnessAwareOptimizer, disable_running_stats

DT = torch.float64


def mlp(seed=0, dtype=DT, width=8):
    return cases.mlp(seed, (5, width, 3), dtype=dtype)


def data(seed=1, n=24, dtype=DT):
    return cases.classification_batch(n, (5,), 3, seed, dtype)


def closure_for(model, opt, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


# ----------------------------------------------------------------------
# reference: gradients by plain autograd, optimizers written out
# ----------------------------------------------------------------------


def ref_grad(model, values, x, y):
    names = [n for n, _ in model.named_parameters()]
    vals = [v.detach().requires_grad_(True) for v in values]
    out = functional_call(model, dict(zip(names, vals)), (x,))
    return list(torch.autograd.grad(F.cross_entropy(out, y), vals))


def ref_ascent(w, g, rho, adaptive=False, eta=0.0):
    if not adaptive:
        norm = torch.cat([t.flatten() for t in g]).norm()
        return [rho * t / norm for t in g]
    T = [wi.abs() + eta for wi in w]
    norm = torch.cat([(ti * gi).flatten() for ti, gi in zip(T, g)]).norm()
    return [rho * ti**2 * gi / norm for ti, gi in zip(T, g)]


def ref_sgd_momentum(lr, mu, wd=0.0):
    bufs = []

    def step(w, g):
        g = [gi + wd * wi for gi, wi in zip(g, w)]
        if not bufs:
            bufs.extend(gi.clone() for gi in g)
        else:
            for b, gi in zip(bufs, g):
                b.mul_(mu).add_(gi)
        return [wi - lr * b for wi, b in zip(w, bufs)]

    return step


def ref_adamw(lr, b1, b2, eps, wd):
    m, v, t = [], [], [0]

    def step(w, g):
        t[0] += 1
        if not m:
            m.extend(torch.zeros_like(gi) for gi in g)
            v.extend(torch.zeros_like(gi) for gi in g)
        out = []
        for i, (wi, gi) in enumerate(zip(w, g)):
            wi = wi * (1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            mhat = m[i] / (1 - b1 ** t[0])
            vhat = v[i] / (1 - b2 ** t[0])
            out.append(wi - lr * mhat / (vhat.sqrt() + eps))
        return out

    return step


BASES = {
    "sgd_momentum": (
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.9, weight_decay=1e-3),
        lambda: ref_sgd_momentum(0.1, 0.9, 1e-3),
    ),
    "adamw": (
        torch.optim.AdamW,
        dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
        lambda: ref_adamw(1e-2, 0.9, 0.99, 1e-8, 0.1),
    ),
}


# ----------------------------------------------------------------------
# 1. rho = 0 is the base optimizer, bit for bit
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
# 2. the textbook update, 10 steps
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
# 3. param groups: own rho / adaptive / perturb=False; shared with the base
# ----------------------------------------------------------------------


def test_param_groups_own_rho_adaptive_and_perturb_false():
    x, y = data()
    model = mlp()
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    opt = SAM(
        [
            {"params": [weights[0]], "sam_rho": 0.2, "sam_adaptive": True, "sam_eta": 0.01},
            {"params": [weights[1]]},
            {"params": biases, "sam_perturb": False},
        ],
        torch.optim.SGD,
        rho=0.05,
        lr=0.0,
    )
    w = params_of(model)
    g = ref_grad(model, w, x, y)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    # joint norm over the perturbed parameters only: ||(T g_W1, g_W2)||
    t = w[0].abs() + 0.01
    norm = torch.cat([(t * g[0]).flatten(), g[2].flatten()]).norm()
    torch.testing.assert_close(model[0].weight.detach(), w[0] + 0.2 * t**2 * g[0] / norm)
    torch.testing.assert_close(model[2].weight.detach(), w[2] + 0.05 * g[2] / norm)
    assert torch.equal(model[0].bias, w[1]) and torch.equal(model[2].bias, w[3])
    F.cross_entropy(model(x), y).backward()
    opt.second_step()
    assert_same(params_of(model), w)


def test_schedulers_and_add_param_group_work_on_either_object():
    model = mlp()
    opt = SAM([model[0].weight], torch.optim.SGD, rho=0.1, lr=1.0)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = data()
    opt.step(closure_for(model, opt, x, y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5
    sched2 = torch.optim.lr_scheduler.ExponentialLR(opt.base_optimizer, gamma=0.5)
    opt.step(closure_for(model, opt, x, y))
    sched2.step()
    assert opt.param_groups[0]["lr"] == 0.25
    # add_param_group on SAM fills SAM's defaults and the base optimizer's
    opt.add_param_group({"params": [model[0].bias], "sam_rho": 0.3})
    assert opt.base_optimizer.param_groups[1]["sam_rho"] == 0.3
    assert opt.base_optimizer.param_groups[1]["momentum"] == 0
    # add_param_group on the base optimizer is seen by SAM (defaults apply)
    opt.base_optimizer.add_param_group({"params": [model[2].weight]})
    assert len(opt.param_groups) == 3
    opt.step(closure_for(model, opt, x, y))  # group 3 uses SAM's default rho


def test_two_step_style_with_scheduler_does_not_warn(recwarn):
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    sched.step()
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


# ----------------------------------------------------------------------
# 4. AMP: GradScaler and bf16 autocast
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


# ----------------------------------------------------------------------
# 5. gradient accumulation
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
# 7. state_dict round trip
# ----------------------------------------------------------------------


@pytest.mark.parametrize("base", sorted(BASES))
def test_state_dict_resume_equals_uninterrupted(base):
    cls, kw, _ = BASES[base]
    x, y = data()

    def make(model, rho0=0.2):
        return SAM(
            [
                {"params": [model[0].weight], "sam_rho": rho0, "sam_adaptive": True},
                {"params": list(model.parameters())[1:]},
            ],
            cls,
            rho=0.05,
            **kw,
        )

    straight = mlp()
    opt = make(straight)
    for _ in range(6):
        opt.step(closure_for(straight, opt, x, y))

    first = mlp()
    opt1 = make(first)
    for _ in range(3):
        opt1.step(closure_for(first, opt1, x, y))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["opt"]["param_groups"][0]["sam_rho"] == 0.2
    assert ckpt["opt"]["state"]  # momentum / Adam moments are in it

    resumed = mlp(seed=5)  # different init: everything comes from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(resumed, rho0=0.9)  # the group settings come from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.state is opt2.base_optimizer.state
    assert opt2.param_groups[0]["sam_rho"] == 0.2 and opt2.param_groups[0]["sam_adaptive"]
    for _ in range(3):
        opt2.step(closure_for(resumed, opt2, x, y))
    assert_same(params_of(resumed), params_of(straight))


class _CountingSAM(SAM):
    """A variant with persistent per-parameter state (like consistent SAM's m)."""

    def ascent_direction(self, groups):
        for g in groups:
            for p, grad in zip(g.params, g.grads):
                s = self.extra_state[p]
                s["m"] = 0.5 * s.get("m", torch.zeros_like(grad)) + grad
        return super().ascent_direction(groups)


def test_extra_state_round_trips():
    x, y = data()
    model = mlp()
    opt = _CountingSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt.step(closure_for(model, opt, x, y))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    other = _CountingSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    other.load_state_dict(torch.load(buf, weights_only=True))
    for p in model.parameters():
        assert torch.equal(other.extra_state[p]["m"], opt.extra_state[p]["m"])


def test_loaded_extra_state_does_not_alias_the_source():
    """Loading copies: in-place updates of one optimizer's state must not
    leak into the state dict it was loaded from (or into another optimizer)."""
    x, y = data()
    model = mlp()
    opt = _CountingSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt.step(closure_for(model, opt, x, y))
    other = _CountingSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    other.load_state_dict(opt.state_dict())  # live tensors, no save/load
    before = {p: opt.extra_state[p]["m"].clone() for p in model.parameters()}
    for p in model.parameters():
        other.extra_state[p]["m"].mul_(3)
    for p in model.parameters():
        assert torch.equal(opt.extra_state[p]["m"], before[p])


# ----------------------------------------------------------------------
# 8. exceptions restore the weights
# ----------------------------------------------------------------------


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fail_on_call", [1, 2])
def test_closure_raising_restores_weights(fail_on_call):
    x, y = data()
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    w = params_of(model)
    ptrs = [p.data_ptr() for p in model.parameters()]
    calls = [0]

    def closure():
        calls[0] += 1
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if calls[0] == fail_on_call:
            raise Boom
        return loss

    with pytest.raises(Boom):
        opt.step(closure)
    assert_same(params_of(model), w)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert not opt.is_perturbed and opt.state[model[0].weight] == {}
    opt.step(closure_for(model, opt, x, y))  # usable afterwards
    assert not torch.equal(params_of(model)[0], w[0])


def test_second_pass_context_restores_on_exception():
    x, y = data()
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    w = params_of(model)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(params_of(model)[0], w[0])
    with pytest.raises(KeyboardInterrupt), opt.second_pass():
        raise KeyboardInterrupt
    assert_same(params_of(model), w)
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()


def test_restore_abandons_a_step():
    x, y = data()
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    w = params_of(model)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    opt.restore()
    assert_same(params_of(model), w)
    opt.restore()  # idempotent


# ----------------------------------------------------------------------
# 9. dropout: same masks in both passes
# ----------------------------------------------------------------------


class MaskRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 16).to(DT)
        self.out = nn.Linear(16, 3).to(DT)
        self.masks = []

    def forward(self, x):
        h = F.dropout(torch.ones(x.shape[0], 16, dtype=x.dtype), 0.5, self.training)
        self.masks.append(h != 0)
        return self.out(torch.tanh(self.lin(x)) * h)


@pytest.mark.parametrize("style", ["closure", "two_step"])
def test_same_rng_gives_identical_dropout_masks(style):
    x, y = data()
    torch.manual_seed(123)
    model = MaskRecorder()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, same_rng=True)
    before = torch.get_rng_state()
    if style == "closure":
        opt.step(closure_for(model, opt, x, y))
    else:
        with opt.first_pass():
            F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with opt.second_pass():
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    assert torch.equal(model.masks[0], model.masks[1])
    # the global RNG advanced by exactly one forward pass
    torch.set_rng_state(before)
    model.masks.clear()
    model(x)
    after_one = torch.get_rng_state()
    torch.set_rng_state(before)
    opt2 = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.0, same_rng=True)
    opt2.step(closure_for(model, opt2, x, y))
    assert torch.equal(torch.get_rng_state(), after_one)


def test_without_same_rng_masks_differ():
    x, y = data()
    torch.manual_seed(123)
    model = MaskRecorder()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt.step(closure_for(model, opt, x, y))
    assert not torch.equal(model.masks[0], model.masks[1])


def test_same_rng_two_step_without_first_pass_is_a_clear_error():
    x, y = data()
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, same_rng=True)
    w = params_of(model)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_pass"), opt.second_pass():
        pass
    assert_same(params_of(model), w)


# ----------------------------------------------------------------------
# 10. BatchNorm running statistics
# ----------------------------------------------------------------------


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(DT)


@pytest.mark.parametrize("style", ["freeze_bn", "helper"])
def test_batchnorm_running_stats_frozen_in_second_pass(style):
    x, y = data()
    model, ref = bn_model(), bn_model()
    ref(x)  # one training-mode forward: the statistics of the first pass only
    if style == "freeze_bn":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=model, freeze_bn=True)
        opt.step(closure_for(model, opt, x, y))
    else:
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with disable_running_stats(model):
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    bn, bn_ref = model[1], ref[1]
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)
    assert int(bn.num_batches_tracked) == 1
    assert bn.track_running_stats


def test_disable_running_stats_keeps_batch_statistics_and_restores_after_error():
    x, _ = data()
    model = bn_model()
    expected = model(x)  # training mode: batch statistics
    buffers = [b.clone() for b in model.buffers()]
    with pytest.raises(Boom), disable_running_stats(model):
        out = model(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        raise Boom
    assert model[1].track_running_stats
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    with pytest.raises(TypeError):
        with disable_running_stats("model"):
            pass


# ----------------------------------------------------------------------
# 11. foreach perturb / restore, one saved copy reused
# ----------------------------------------------------------------------


def _count_foreach_calls(depth, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(5, 5).to(DT) for _ in range(depth)])
    x = torch.randn(4, 5, dtype=DT)
    # plain SGD without momentum, per-tensor (foreach=False): every foreach
    # call counted below is SAM's own
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, foreach=False)
    names = ["_foreach_copy_", "_foreach_add_", "_foreach_mul", "_foreach_norm"]
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(torch, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(torch, name, counted)

    def closure():
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    saved = [b.data_ptr() for b in opt._saved_w]
    assert len(saved) == 2 * depth  # exactly one copy of w
    opt.step(closure)
    assert [b.data_ptr() for b in opt._saved_w] == saved  # reused, not reallocated
    monkeypatch.undo()
    return calls


def test_perturb_and_restore_are_multi_tensor_ops(monkeypatch):
    shallow = _count_foreach_calls(2, monkeypatch)
    deep = _count_foreach_calls(12, monkeypatch)
    # per step: save + restore, one fused perturb, one norm; the count does
    # not grow with the number of parameters
    assert shallow == deep == {
        "_foreach_copy_": 4,
        "_foreach_add_": 2,
        "_foreach_mul": 0,
        "_foreach_norm": 2,
    }


# ----------------------------------------------------------------------
# 12. clear errors
# ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(rho=-0.1), ValueError, "rho"),
        (dict(rho=float("nan")), ValueError, "rho"),
        (dict(rho="0.1"), TypeError, "rho"),
        (dict(eta=-1.0), ValueError, "eta"),
        (dict(adaptive=1), TypeError, "adaptive"),
        (dict(same_rng="yes"), TypeError, "same_rng"),
        (dict(per_replica=True), ValueError, "model"),
        (dict(freeze_bn=True), ValueError, "model"),
    ],
)
def test_bad_settings_raise(kwargs, exc, match):
    model = mlp()
    with pytest.raises(exc, match=match):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


@pytest.mark.parametrize("base", [nn.Linear, "SGD", lambda params, lr: None, torch.optim.SGD])
def test_base_optimizer_must_be_an_optimizer(base):
    model = mlp()
    if base is torch.optim.SGD:  # a SAM is not a base optimizer either
        base = SAM
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(model.parameters(), base, lr=0.1)


def test_instance_base_errors():
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="already constructed"):
        SAM(None, sgd, lr=0.2)
    with pytest.raises(ValueError, match="differ"):
        SAM([model[0].weight], sgd)
    SAM(model.parameters(), sgd)  # the same parameters are fine
    with pytest.raises(ValueError, match="params is required"):
        SAM(None, torch.optim.SGD, lr=0.1)


def test_bad_group_rejected_before_change():
    model = mlp()
    opt = SAM([model[0].weight], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [model[0].bias], "sam_rho": -1.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="rho"):
        SAM([{"params": [model[0].weight], "sam_rho": -1.0}], torch.optim.SGD, lr=0.1)


def test_stage_errors():
    x, y = data()
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(RuntimeError, match="no gradients"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(TypeError, match="callable"):
        opt.step(3)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="between"):
        opt.state_dict()
    opt.second_step()


def test_parameters_without_gradients_are_skipped():
    x, y = data()
    model = mlp()
    unused = nn.Linear(2, 2).to(DT)
    opt = SAM(list(model.parameters()) + list(unused.parameters()), torch.optim.SGD, rho=0.1, lr=0.1)
    u = params_of(unused)
    ref = mlp()
    ref_opt = SAM(ref.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert_same(params_of(unused), u)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    ref_opt.step(closure_for(ref, ref_opt, x, y))
    assert_same(params_of(unused), u)
    assert_same(params_of(model), params_of(ref))


# ----------------------------------------------------------------------
# extension points: gradient stash (SharpBalance) and re-perturbation
# ----------------------------------------------------------------------


def test_stash_grad_adds_a_term_taken_at_w():
    """SAM on a subset of the batch, the rest with the plain gradient at w."""
    x, y = data(n=24)
    mask = torch.arange(24) % 3 == 0
    model = mlp()
    w = params_of(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    n_s, n = int(mask.sum()), 24
    out = model(x)
    plain = F.cross_entropy(out[~mask], y[~mask]) * (n - n_s) / n
    plain.backward(retain_graph=True)
    opt.stash_grad()
    assert all(p.grad is None for p in model.parameters())
    (F.cross_entropy(out[mask], y[mask]) * n_s / n).backward()
    opt.first_step(zero_grad=True)
    (F.cross_entropy(model(x[mask]), y[mask]) * n_s / n).backward()
    opt.second_step(zero_grad=True)
    g_sam = ref_grad(model, w, x[mask], y[mask])
    e = ref_ascent(w, g_sam, 0.1)
    g2 = ref_grad(model, [a + b for a, b in zip(w, e)], x[mask], y[mask])
    g_plain = ref_grad(model, w, x[~mask], y[~mask])
    for p, wi, a, b in zip(model.parameters(), w, g2, g_plain):
        expected = wi - 0.1 * (a * n_s / n + b * (n - n_s) / n)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-13)


def test_perturb_twice_starts_from_saved_w():
    x, y = data()
    model = mlp()
    w = params_of(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.0)
    F.cross_entropy(model(x), y).backward()
    groups = opt.ascent_groups()
    assert isinstance(groups[0], AscentGroup) and len(groups[0].params) == 4
    e1 = [[torch.full_like(p, 0.5) for p in groups[0].params]]
    e2 = [[torch.full_like(p, -0.25) for p in groups[0].params]]
    opt.perturb(groups, e1)
    opt.perturb(groups, e2)
    for p, wi in zip(model.parameters(), w):
        assert torch.equal(p.detach(), wi + (-0.25))
    opt.restore()
    assert_same(params_of(model), w)


def test_base_class_needs_ascent_direction():
    model = mlp()
    opt = SharpnessAwareOptimizer(model.parameters(), torch.optim.SGD, {"rho": 0.1, "perturb": True}, lr=0.1)
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    w = params_of(model)
    with pytest.raises(NotImplementedError):
        opt.first_step()
    assert_same(params_of(model), w) and not opt.is_perturbed


def test_deepcopy_and_repr():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    assert "rho=0.1" in repr(opt) and "SGD" in repr(opt)
    clone = copy.deepcopy(opt)
    assert clone.param_groups is clone.base_optimizer.param_groups


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


def test_global_rng_untouched_without_dropout():
    x, y = data()
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, same_rng=True)
    before = torch.get_rng_state()
    opt.step(closure_for(model, opt, x, y))
    assert torch.equal(torch.get_rng_state(), before)


class SignSAM(SharpnessAwareOptimizer):
    """The subclass written in the base module's docstring."""

    group_defaults = {"rho": 0.05, "perturb": True}

    def ascent_direction(self, groups):
        return [torch._foreach_mul(torch._foreach_sign(g.grads), g.group["rho"]) for g in groups]


def test_subclass_overriding_only_the_ascent_direction():
    x, y = data()
    model = mlp()
    w = params_of(model)
    opt = SignSAM(model.parameters(), torch.optim.SGD, lr=0.1)  # rho from group_defaults
    assert opt.param_groups[0]["sam_rho"] == 0.05
    g = ref_grad(model, w, x, y)
    g2 = ref_grad(model, [wi + 0.05 * gi.sign() for wi, gi in zip(w, g)], x, y)
    opt.step(closure_for(model, opt, x, y))
    for p, wi, gi in zip(model.parameters(), w, g2):
        torch.testing.assert_close(p.detach(), wi - 0.1 * gi, rtol=1e-12, atol=1e-14)


def test_fused_and_device_paths_of_the_scaled_add_agree():
    from flatness.optim._base import _add_scaled

    torch.manual_seed(0)
    w = [torch.randn(3, 4, dtype=DT), torch.randn(5, dtype=DT)]
    g = [torch.randn(3, 4, dtype=DT), torch.randn(5, dtype=DT)]
    a, b = [t.clone() for t in w], [t.clone() for t in w]
    scale = torch.tensor(0.37, dtype=DT)
    _add_scaled(a, g, scale, fused=True)
    _add_scaled(b, g, scale, fused=False)  # the path taken on CUDA
    for u, v, wi, gi in zip(a, b, w, g):
        torch.testing.assert_close(u, wi + 0.37 * gi, rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(v, wi + 0.37 * gi, rtol=1e-15, atol=1e-15)


def test_plain_base_optimizer_state_dict_loads():
    x, y = data()
    model = mlp()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain.zero_grad()
    F.cross_entropy(model(x), y).backward()
    plain.step()
    opt = SAM([{"params": model.parameters(), "sam_rho": 0.3}], torch.optim.SGD, rho=0.1, lr=0.5, momentum=0.9)
    opt.load_state_dict(plain.state_dict())
    # the base optimizer's settings come from the file, the group's rho stays
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["sam_rho"] == 0.3
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], plain.state[p]["momentum_buffer"])
    with pytest.raises(ValueError, match="param_groups"):
        opt.load_state_dict({"state": {}})
