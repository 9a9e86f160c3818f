"""The SAM family in flatness.optim: GSAM, LookSAM, WSAM, FriendlySAM, ESAM,
MESA and BayesianSAM.

Each update is written out here in float64 (gradients by plain autograd on
the flattened weights, SGD with momentum by hand) and compared with the
optimizer over 5 steps on a small MLP and a small CNN, in both call styles
(rel 1e-10).  Degenerate settings equal SAM or the base optimizer bit for
bit.  Where ``pytorch_optimizer`` implements the same method its trajectory
is compared over 10 steps; the tolerance and any difference is explained
at each test.
"""

from __future__ import annotations

import copy
import io
import types

import cases
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from flatness.optim import ESAM, GSAM, MESA, SAM, WSAM, BayesianSAM, ConsistentSAM, FriendlySAM, LookSAM

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
# pytorch_optimizer takes its gradient norms in float32 and adds 1e-12 /
# 1e-8 to denominators: its trajectories agree with ours to ~1e-7 relative.
PEER_TOL = dict(rtol=1e-5, atol=1e-7)
LR, MU = 0.1, 0.9


def mlp(seed=0):
    return cases.mlp(seed, (5, 8, 3))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).to(DT)


MODELS = {"mlp": (mlp, (5,)), "cnn": (cnn, (1, 6, 6))}


def batches(kind, steps, n=12, seed=1):
    return cases.classification_batches((n,) * steps, MODELS[kind][1], 3, seed)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_close_lists(a, b, tol=TOL):
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, **tol)


def assert_same(a, b):
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


# ----------------------------------------------------------------------
# references: flat vectors, plain autograd, SGD with momentum by hand
# ----------------------------------------------------------------------


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def unflat(v, like):
    out, i = [], 0
    for t in like:
        out.append(v[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def per_sample_loss(model, w, x, y):
    """Per-sample cross-entropy at the flat weights ``w``."""
    like = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    return F.cross_entropy(functional_call(model, dict(zip(names, unflat(w, like))), (x,)), y, reduction="none")


def grad(model, w, x, y):
    w = w.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(per_sample_loss(model, w, x, y).mean(), w)
    return g


class SGDRef:
    """torch.optim.SGD(lr, momentum) written out (no dampening)."""

    def __init__(self, lr=LR, mu=MU):
        self.lr, self.mu, self.buf = lr, mu, None

    def __call__(self, w, d, lr=None):
        self.buf = d.clone() if self.buf is None else self.mu * self.buf + d
        return w - (self.lr if lr is None else lr) * self.buf


def sam_e(g, rho, mask=None):
    """SAM's ascent; ``mask`` (0/1 per coordinate) leaves the coordinates
    of ``perturb=False`` groups at zero."""
    g = g if mask is None else mask * g
    n = g.norm()
    return rho * g / n if n > 0 else torch.zeros_like(g)


def still_mask(model, still):
    """1 on the coordinates of all parameters but the last ``still``."""
    like = list(model.parameters())
    return flat([torch.full_like(t, float(i < len(like) - still)) for i, t in enumerate(like)])


def two_groups(model, still):
    """The last ``still`` parameters in a group with ``sam_perturb=False``."""
    ps = list(model.parameters())
    return [{"params": ps[:len(ps) - still]}, {"params": ps[len(ps) - still:], "sam_perturb": False}]


# ----------------------------------------------------------------------
# running our optimizers in both call styles
# ----------------------------------------------------------------------


def closure_for(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def step_two_style(opt, model, x, y):
    """The documented two-step loop (the second pass only when perturbed)."""
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    if opt.is_perturbed:
        F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def run(make, kind, data, style):
    model = MODELS[kind][0]()
    opt = make(model)
    for x, y in data:
        if style == "closure":
            opt.step(closure_for(model, x, y))
        else:
            step_two_style(opt, model, x, y)
    return model, opt


STYLES = ["closure", "two_step"]


def sam_run(kind, data, rho, style="closure"):
    return run(lambda m: SAM(m.parameters(), torch.optim.SGD, rho=rho, lr=LR, momentum=MU), kind, data, style)[0]


# ======================================================================
# GSAM
# ======================================================================


def ref_gsam(kind, data, rho, alpha, lrs=None, rho_min=None, lr_min=0.0, still=0):
    model = MODELS[kind][0]()
    mask = still_mask(model, still)
    w = flat(weights(model))
    sgd = SGDRef()
    lr_max = LR if lrs is None else lrs[0]
    for t, (x, y) in enumerate(data):
        lr = LR if lrs is None else lrs[t]
        rho_t = rho if rho_min is None else rho_min + (rho - rho_min) * (lr - lr_min) / (lr_max - lr_min)
        g = grad(model, w, x, y)
        gp = grad(model, w + sam_e(g, rho_t, mask), x, y)
        g_perp = g - (g @ gp) / (gp @ gp) * gp
        w = sgd(w, gp - alpha * g_perp, lr)
    return unflat(w, list(model.parameters()))


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("style", STYLES)
def test_gsam_matches_written_out_update(kind, style):
    data = batches(kind, 5)
    model, _ = run(lambda m: GSAM(m.parameters(), torch.optim.SGD, rho=0.1, alpha=0.3, lr=LR, momentum=MU),
                   kind, data, style)
    assert_close_lists(weights(model), ref_gsam(kind, data, 0.1, 0.3))


@pytest.mark.parametrize("style", STYLES)
def test_gsam_rho_follows_the_learning_rate(style):
    data = batches("mlp", 5)
    lrs = [0.1, 0.08, 0.05, 0.03, 0.01]
    model = mlp()
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.2, alpha=0.2, rho_min=0.02, lr=LR, momentum=MU)
    for (x, y), lr in zip(data, lrs):
        opt.param_groups[0]["lr"] = lr
        if style == "closure":
            opt.step(closure_for(model, x, y))
        else:
            step_two_style(opt, model, x, y)
    assert_close_lists(weights(model), ref_gsam("mlp", data, 0.2, 0.2, lrs=lrs, rho_min=0.02))


def test_gsam_rho_never_exceeds_rho_under_a_warmup():
    """Without ``lr_max`` the radius is scaled by the largest lr seen so far:
    under OneCycleLR's warmup (first lr = max_lr / 25) the first lr gave a
    radius ~25 rho at the peak."""
    data = batches("mlp", 12)
    model = mlp()
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.1, rho_min=0.01, lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=len(data), pct_start=0.5)
    radii = []
    for x, y in data:
        w = weights(model)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        radii.append(float(flat([p.detach() - u for p, u in zip(model.parameters(), w)]).norm()))
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        sched.step()
    assert max(radii) <= 0.05 * (1 + 1e-9)
    assert radii[-1] < 0.02  # and it still follows the decay (lr near 0: rho_min)
    assert opt.param_groups[0]["gsam_lr_max"] == pytest.approx(LR)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("style", STYLES)
def test_gsam_alpha_zero_is_sam_bit_for_bit(kind, style):
    data = batches(kind, 5)
    model, _ = run(lambda m: GSAM(m.parameters(), torch.optim.SGD, rho=0.1, alpha=0.0, lr=LR, momentum=MU),
                   kind, data, style)
    assert_same(weights(model), weights(sam_run(kind, data, 0.1, style)))


def test_gsam_matches_pytorch_optimizer():
    """``pytorch_optimizer.GSAM`` implements the same update; it adds
    ``1e-12`` to its denominators and takes ``||g||`` and ``||g_p||`` in
    float32 (``get_global_gradient_norm``): agreement to ~1e-7."""
    po = pytest.importorskip("pytorch_optimizer")
    data = batches("mlp", 10)
    ours, _ = run(lambda m: GSAM(m.parameters(), torch.optim.SGD, rho=0.1, alpha=0.3, lr=LR, momentum=MU),
                  "mlp", data, "closure")
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MU)
    sched = po.ProportionScheduler(types.SimpleNamespace(last_lr=[LR]), max_lr=LR, min_lr=LR,
                                   max_value=0.1, min_value=0.1)
    peer = po.GSAM(model.parameters(), base, model, sched, alpha=0.3)
    for x, y in data:
        def closure():
            base.zero_grad()
            with torch.enable_grad():  # the peer's step runs under no_grad
                out = model(x)
                loss = F.cross_entropy(out, y)
            loss.backward()
            return out, loss.detach()
        peer.step(closure)
    assert_close_lists(weights(ours), weights(model), PEER_TOL)


def test_gsam_bad_settings():
    m = mlp()
    with pytest.raises(ValueError, match="alpha"):
        GSAM(m.parameters(), torch.optim.SGD, alpha=1.5, lr=0.1)
    with pytest.raises(TypeError, match="rho_min"):
        GSAM(m.parameters(), torch.optim.SGD, rho_min="a", lr=0.1)
    with pytest.raises(ValueError, match=r"rho_min \(0.5\) must be <= rho"):
        GSAM(m.parameters(), torch.optim.SGD, rho=0.05, rho_min=0.5, lr=0.1)
    with pytest.raises(ValueError, match=r"lr_max \(0.01\) must be > lr_min"):
        GSAM(m.parameters(), torch.optim.SGD, rho_min=0.01, lr_max=0.01, lr_min=0.1, lr=0.1)
    with pytest.raises(ValueError, match="rho_min"):
        GSAM([{"params": list(m.parameters()), "sam_rho_min": 0.2}], torch.optim.SGD, rho=0.1, lr=0.1)


def test_gsam_rho_stays_between_its_ends_outside_the_lr_range():
    # the linear map extrapolated: lr below lr_min gave a negative radius,
    # and the "ascent" went downhill
    m = mlp()
    opt = GSAM(m.parameters(), torch.optim.SGD, rho=0.05, rho_min=0.01, lr_max=0.1, lr_min=0.05, lr=0.1)
    radius = {}
    for lr in (0.2, 0.1, 0.075, 0.05, 0.01, 0.0):
        opt.param_groups[0]["lr"] = lr
        radius[lr] = opt.rho_t(opt.sam_settings(opt.param_groups[0]))
    assert radius[0.2] == radius[0.1] == 0.05
    assert radius[0.075] == pytest.approx(0.03)
    assert radius[0.05] == radius[0.01] == radius[0.0] == 0.01
    (x, y), = batches("mlp", 1)
    before = F.cross_entropy(m(x), y).item()
    F.cross_entropy(m(x), y).backward()
    opt.first_step(zero_grad=True)
    assert F.cross_entropy(m(x), y).item() > before  # an ascent
    opt.restore()


# ======================================================================
# LookSAM
# ======================================================================


def ref_looksam(kind, data, rho, k, alpha, per_tensor=False, still=0):
    model = MODELS[kind][0]()
    mask = still_mask(model, still)
    like = list(model.parameters())
    w = flat(weights(model))
    sgd = SGDRef()
    gv = None
    for t, (x, y) in enumerate(data):
        g = grad(model, w, x, y)
        if t % k == 0:
            gs = grad(model, w + sam_e(g, rho, mask), x, y)
            if per_tensor:
                gv = flat([b - (a @ b) / (a @ a) * a for a, b in
                           zip([u.reshape(-1) for u in unflat(g, like)], [u.reshape(-1) for u in unflat(gs, like)])])
            else:
                gv = gs - (g @ gs) / (g @ g) * g
            d = gs
        elif per_tensor:
            d = flat([a + alpha * a.norm() / v.norm() * v for a, v in zip(unflat(g, like), unflat(gv, like))])
        else:
            d = g + alpha * g.norm() / gv.norm() * gv
        w = sgd(w, d)
    return unflat(w, like)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_looksam_matches_written_out_update(kind, style, per_tensor):
    data = batches(kind, 5)
    model, opt = run(lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=2, alpha=0.7,
                                       per_tensor=per_tensor, lr=LR, momentum=MU), kind, data, style)
    assert opt.looksam_step == 5
    assert_close_lists(weights(model), ref_looksam(kind, data, 0.1, 2, 0.7, per_tensor))


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("style", STYLES)
def test_looksam_k1_alpha0_is_sam_bit_for_bit(kind, style):
    data = batches(kind, 5)
    model, _ = run(lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=1, alpha=0.0, lr=LR, momentum=MU),
                   kind, data, style)
    assert_same(weights(model), weights(sam_run(kind, data, 0.1, style)))


def test_looksam_reuse_steps_take_one_pass():
    model = mlp()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=5, lr=LR)
    calls = []
    x, y = batches("mlp", 1)[0]

    def closure():
        calls.append(1)
        return closure_for(model, x, y)()

    for _ in range(10):
        opt.step(closure)
    assert len(calls) == 12  # 2 full steps (2 passes) + 8 reuse steps (1 pass)


@pytest.mark.parametrize("name", ["SAM", "GSAM", "WSAM", "FriendlySAM", "LookSAM", "ESAM", "BayesianSAM", "ConsistentSAM"])
def test_step_without_a_closure_is_a_type_error_on_every_step(name):
    """The same mistake gives the same error: SAM's step() raised a
    RuntimeError, ESAM's and LookSAM's on its reuse steps a TypeError.  It
    is both now (code written against 0.1.0 caught the RuntimeError)."""
    makers = {
        "SAM": lambda ps: SAM(ps, torch.optim.SGD, lr=LR),
        "GSAM": lambda ps: GSAM(ps, torch.optim.SGD, lr=LR),
        "WSAM": lambda ps: WSAM(ps, torch.optim.SGD, lr=LR),
        "FriendlySAM": lambda ps: FriendlySAM(ps, torch.optim.SGD, lr=LR),
        "LookSAM": lambda ps: LookSAM(ps, torch.optim.SGD, k=2, lr=LR),
        "ESAM": lambda ps: ESAM(ps, torch.optim.SGD, beta=1.0, gamma=1.0, lr=LR),
        "BayesianSAM": lambda ps: BayesianSAM(ps, seed=0, **BSAM_KW),
        "ConsistentSAM": lambda ps: ConsistentSAM(ps, torch.optim.SGD, lr=LR),
    }
    (x, y), = batches("mlp", 1)
    model = mlp()
    opt = makers[name](model.parameters())
    for _ in range(2):  # LookSAM: a full step, then a reuse step
        w = weights(model)
        with pytest.raises(TypeError, match="closure") as raised:
            opt.step()
        assert isinstance(raised.value, RuntimeError)
        assert_same(weights(model), w)
        if name == "ESAM":
            opt.step(lambda mask=None: F.cross_entropy(model(x), y, reduction="none"))
        else:
            opt.step(closure_for(model, x, y))


def test_looksam_backward_on_a_reuse_step_is_a_clear_error():
    model = mlp()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=2, lr=LR)
    (x, y), = batches("mlp", 1)
    step_two_style(opt, model, x, y)
    assert not opt.is_full_step
    w = weights(model)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert not opt.is_perturbed
    F.cross_entropy(model(x), y).backward()  # should have been skipped
    with pytest.raises(RuntimeError, match="skipped the second pass"):
        opt.second_step()
    assert_same(weights(model), w)
    assert opt.looksam_step == 1


def test_looksam_matches_pytorch_optimizer_per_tensor():
    """``pytorch_optimizer.LookSAM`` takes the norms and projections per
    parameter tensor (we follow the paper's global ones by default;
    ``per_tensor=True`` matches it), adds ``1e-12`` (float32 norm) to the
    ascent and ``1e-8`` to ``||g_v||``.  Its ``step(closure)`` always runs
    two passes (the closure re-evaluates ``w`` on reuse steps), so only the
    trajectory, not the cost, is compared."""
    po = pytest.importorskip("pytorch_optimizer")
    data = batches("mlp", 10)
    ours, _ = run(lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=3, alpha=0.7, per_tensor=True,
                                    lr=LR, momentum=MU), "mlp", data, "closure")
    model = mlp()
    peer = po.LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=3, alpha=0.7, lr=LR, momentum=MU)
    for x, y in data:
        peer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        peer.step(closure_for(model, x, y))
    assert_close_lists(weights(ours), weights(model), PEER_TOL)


def test_looksam_state_dict_resume_equals_uninterrupted():
    data = batches("mlp", 7)

    def make(m):
        return LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=3, alpha=0.5, lr=LR, momentum=MU)

    straight, _ = run(make, "mlp", data, "closure")
    first, opt1 = run(make, "mlp", data[:4], "closure")
    buf = io.BytesIO()
    torch.save({"m": first.state_dict(), "o": opt1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    resumed = mlp(seed=3)
    resumed.load_state_dict(ck["m"])
    opt2 = make(resumed)
    opt2.load_state_dict(ck["o"])
    assert opt2.looksam_step == 4
    for x, y in data[4:]:
        opt2.step(closure_for(resumed, x, y))
    assert_same(weights(resumed), weights(straight))


def test_gsam_and_looksam_differ_from_sam():
    """The peer comparisons above are not SAM-vs-SAM: the variants move
    elsewhere by far more than the tolerance."""
    data = batches("mlp", 10)
    sam = weights(sam_run("mlp", data, 0.1))
    gsam, _ = run(lambda m: GSAM(m.parameters(), torch.optim.SGD, rho=0.1, alpha=0.3, lr=LR, momentum=MU),
                  "mlp", data, "closure")
    look, _ = run(lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=3, lr=LR, momentum=MU),
                  "mlp", data, "closure")
    for other in (weights(gsam), weights(look)):
        assert (flat(other) - flat(sam)).abs().max() > 1e-3


# ======================================================================
# WSAM
# ======================================================================


def ref_wsam(kind, data, rho, gamma, decouple, still=0):
    model = MODELS[kind][0]()
    mask = still_mask(model, still)
    w = flat(weights(model))
    sgd = SGDRef()
    a = gamma / (1 - gamma)
    for x, y in data:
        g = grad(model, w, x, y)
        gs = grad(model, w + sam_e(g, rho, mask), x, y)
        if decouple:
            w = sgd(w, g) - LR * a * (gs - g)
        else:
            w = sgd(w, (1 - a) * g + a * gs)
    return unflat(w, list(model.parameters()))


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_matches_written_out_update(kind, style, decouple):
    data = batches(kind, 5)
    model, _ = run(lambda m: WSAM(m.parameters(), torch.optim.SGD, rho=0.1, gamma=0.8, decouple=decouple,
                                  lr=LR, momentum=MU), kind, data, style)
    assert_close_lists(weights(model), ref_wsam(kind, data, 0.1, 0.8, decouple))


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", ["WSAM", "WSAM-coupled", "GSAM", "LookSAM", "LookSAM-per-tensor"])
def test_group_without_perturbation_follows_the_variants_rule(name, style):
    # perturb=False is e = 0 on the group; the variant's rule still combines
    # its gradients.  They were stepped with the gradient at w + e alone
    # (WSAM with gamma = 0 was then not the base optimizer).
    data = batches("mlp", 4)
    still = 2
    make, ref = {
        "WSAM": (lambda m: WSAM(two_groups(m, still), torch.optim.SGD, rho=0.1, gamma=0.8, lr=LR, momentum=MU),
                 lambda: ref_wsam("mlp", data, 0.1, 0.8, True, still=still)),
        "WSAM-coupled": (lambda m: WSAM(two_groups(m, still), torch.optim.SGD, rho=0.1, gamma=0.8, decouple=False,
                                        lr=LR, momentum=MU),
                         lambda: ref_wsam("mlp", data, 0.1, 0.8, False, still=still)),
        "GSAM": (lambda m: GSAM(two_groups(m, still), torch.optim.SGD, rho=0.1, alpha=0.3, lr=LR, momentum=MU),
                 lambda: ref_gsam("mlp", data, 0.1, 0.3, still=still)),
        "LookSAM": (lambda m: LookSAM(two_groups(m, still), torch.optim.SGD, rho=0.1, k=2, alpha=0.7, lr=LR,
                                      momentum=MU),
                    lambda: ref_looksam("mlp", data, 0.1, 2, 0.7, still=still)),
        "LookSAM-per-tensor": (lambda m: LookSAM(two_groups(m, still), torch.optim.SGD, rho=0.1, k=2, alpha=0.7,
                                                 per_tensor=True, lr=LR, momentum=MU),
                               lambda: ref_looksam("mlp", data, 0.1, 2, 0.7, per_tensor=True, still=still)),
    }[name]
    model, _ = run(make, "mlp", data, style)
    assert_close_lists(weights(model), ref())


@pytest.mark.parametrize("kind, still", [*((k, 0) for k in sorted(MODELS)), ("mlp", 2)])
@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_gamma_zero_is_the_base_optimizer_bit_for_bit(kind, still, decouple):
    # still=2: the last two parameters in a perturb=False group
    data = batches(kind, 5)
    model, _ = run(lambda m: WSAM(two_groups(m, still) if still else m.parameters(), torch.optim.SGD, rho=0.1,
                                  gamma=0.0, decouple=decouple, lr=LR, momentum=MU), kind, data, "two_step")
    plain = MODELS[kind][0]()
    opt = torch.optim.SGD(plain.parameters(), lr=LR, momentum=MU)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
    assert_same(weights(model), weights(plain))


def test_wsam_gamma_half_coupled_is_sam():
    data = batches("mlp", 5)
    model, _ = run(lambda m: WSAM(m.parameters(), torch.optim.SGD, rho=0.1, gamma=0.5, decouple=False,
                                  lr=LR, momentum=MU), "mlp", data, "closure")
    assert_close_lists(weights(model), weights(sam_run("mlp", data, 0.1)))


@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_matches_pytorch_optimizer(decouple):
    """``pytorch_optimizer.WSAM``: same update (decoupled by default); its
    ascent norm is float32 plus ``1e-12``: agreement to ~1e-7."""
    po = pytest.importorskip("pytorch_optimizer")
    data = batches("mlp", 10)
    ours, _ = run(lambda m: WSAM(m.parameters(), torch.optim.SGD, rho=0.1, gamma=0.8, decouple=decouple,
                                 lr=LR, momentum=MU), "mlp", data, "closure")
    model = mlp()
    peer = po.WSAM(model, model.parameters(), torch.optim.SGD, rho=0.1, gamma=0.8, decouple=decouple,
                   lr=LR, momentum=MU)
    for x, y in data:
        peer.zero_grad()
        peer.step(closure_for(model, x, y))
    assert_close_lists(weights(ours), weights(model), PEER_TOL)
    assert (flat(weights(ours)) - flat(weights(sam_run("mlp", data, 0.1)))).abs().max() > 1e-3


def test_wsam_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        WSAM(mlp().parameters(), torch.optim.SGD, gamma=1.0, lr=0.1)


# ======================================================================
# FriendlySAM
# ======================================================================


def ref_fsam(kind, data, rho, sigma, lmbda):
    model = MODELS[kind][0]()
    w = flat(weights(model))
    sgd = SGDRef()
    m = None
    for x, y in data:
        g = grad(model, w, x, y)
        if m is None:
            d, m = g, g.clone()
        else:
            d, m = g - sigma * m, lmbda * m + (1 - lmbda) * g
        w = sgd(w, grad(model, w + sam_e(d, rho), x, y))
    return unflat(w, list(model.parameters()))


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("style", STYLES)
def test_fsam_matches_written_out_update(kind, style):
    data = batches(kind, 5)
    model, _ = run(lambda m: FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.1, sigma=0.8, lmbda=0.6,
                                         lr=LR, momentum=MU), kind, data, style)
    assert_close_lists(weights(model), ref_fsam(kind, data, 0.1, 0.8, 0.6))


def test_fsam_sigma_zero_is_sam_bit_for_bit():
    data = batches("cnn", 5)
    model, _ = run(lambda m: FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.1, sigma=0.0,
                                         lr=LR, momentum=MU), "cnn", data, "closure")
    assert_close_lists(weights(model), weights(sam_run("cnn", data, 0.1)), dict(rtol=0, atol=0))


def test_fsam_matches_pytorch_optimizer():
    """``pytorch_optimizer.FriendlySAM`` follows the authors' code as we do
    (first step: ``m = g``, no subtraction); its ascent norm is float32 plus
    ``1e-12``: agreement to ~1e-7."""
    po = pytest.importorskip("pytorch_optimizer")
    data = batches("mlp", 10)
    ours, _ = run(lambda m: FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.1, sigma=1.0, lmbda=0.9,
                                        lr=LR, momentum=MU), "mlp", data, "closure")
    model = mlp()
    peer = po.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.1, sigma=1.0, lmbda=0.9, lr=LR, momentum=MU)
    for x, y in data:
        peer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        peer.step(closure_for(model, x, y))
    assert_close_lists(weights(ours), weights(model), PEER_TOL)
    assert (flat(weights(ours)) - flat(weights(sam_run("mlp", data, 0.1)))).abs().max() > 1e-3


def test_fsam_abandoned_step_keeps_the_moving_average():
    model = mlp()
    opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=LR)
    (x, y), = batches("mlp", 1)
    step_two_style(opt, model, x, y)
    m = opt.extra_state[model[0].weight]["fsam_momentum"].clone()
    F.cross_entropy(model(x * 2), y).backward()
    opt.first_step(zero_grad=True)
    opt.restore()
    torch.testing.assert_close(opt.extra_state[model[0].weight]["fsam_momentum"], m, rtol=0, atol=0)


# ======================================================================
# ESAM
# ======================================================================


def esam_closure(model, x, y):
    def closure(mask=None):
        xb, yb = (x, y) if mask is None else (x[mask], y[mask])
        return F.cross_entropy(model(xb), yb, reduction="none")

    return closure


def esam_two_step(opt, model, x, y):
    with opt.first_pass():
        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
    opt.first_step(zero_grad=True, losses=losses)
    with torch.no_grad(), opt.second_pass():
        mask = opt.select(F.cross_entropy(model(x), y, reduction="none"))
    with opt.second_pass():
        F.cross_entropy(model(x[mask]), y[mask]).backward()
    opt.second_step(zero_grad=True)


def run_esam(kind, data, style, **kw):
    model = MODELS[kind][0]()
    opt = ESAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MU, seed=3, **kw)
    masks, samples = [], []
    for x, y in data:
        if style == "closure":
            opt.step(esam_closure(model, x, y))
        else:
            esam_two_step(opt, model, x, y)
        masks.append(opt.swp_mask)
        samples.append(opt.sample_mask)
    return model, masks, samples


def ref_esam(kind, data, rho, beta, gamma, masks):
    """``masks``: the SWP draw of each step (the optimizer's private
    generator; its statistics are tested separately)."""
    model = MODELS[kind][0]()
    like = list(model.parameters())
    w = flat(weights(model))
    sgd = SGDRef()
    chosen = []
    for (x, y), keep in zip(data, masks):
        keep = [True] * len(like) if keep is None else keep
        sel = flat([torch.full_like(t, float(k)) for t, k in zip(like, keep)])
        g = grad(model, w, x, y) * sel
        e = sam_e(g, rho / beta)
        sharp = per_sample_loss(model, w + e, x, y) - per_sample_loss(model, w, x, y)
        k = max(1, int(gamma * len(y)))
        idx = torch.sort(sharp, descending=True).indices[:k]
        chosen.append(set(idx.tolist()))
        w = sgd(w, grad(model, w + e, x[idx], y[idx]))
    return unflat(w, like), chosen


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("style", STYLES)
def test_esam_matches_written_out_update(kind, style):
    data = batches(kind, 5)
    model, masks, samples = run_esam(kind, data, style, rho=0.1, beta=0.6, gamma=0.5)
    assert any(not all(m) for m in masks)  # SWP did leave tensors out
    ref, chosen = ref_esam(kind, data, 0.1, 0.6, 0.5, masks)
    assert [set(torch.nonzero(s).flatten().tolist()) for s in samples] == chosen
    assert all(int(s.sum()) == 6 for s in samples)
    assert_close_lists(weights(model), ref)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("style", STYLES)
def test_esam_beta1_gamma1_is_sam_bit_for_bit(kind, style):
    data = batches(kind, 5)
    model, _, _ = run_esam(kind, data, style, rho=0.1, beta=1.0, gamma=1.0)
    sam = MODELS[kind][0]()
    opt = SAM(sam.parameters(), torch.optim.SGD, rho=0.1, lr=LR, momentum=MU)
    for x, y in data:
        def closure():
            loss = F.cross_entropy(sam(x), y, reduction="none").mean()
            loss.backward()
            return loss
        opt.step(closure)
    assert_same(weights(model), weights(sam))


def test_esam_swp_mask_frequency_and_private_rng():
    model = mlp()
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.1, beta=0.3, gamma=1.0, seed=0, lr=0.01)
    (x, y), = batches("mlp", 1)
    state = torch.get_rng_state()
    kept = []
    for _ in range(200):
        opt.step(esam_closure(model, x, y))
        kept.append(sum(opt.swp_mask))
    assert torch.equal(torch.get_rng_state(), state)
    assert min(kept) >= 1  # at least one tensor is perturbed
    assert 0.2 < sum(kept) / (200 * 4) < 0.45
    assert all(p.requires_grad for p in model.parameters())  # switched back on


def test_esam_errors_and_requires_grad_restored_after_a_failing_first_pass():
    model = mlp()
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.1, beta=0.5, gamma=0.5, lr=0.1, seed=0)
    (x, y), = batches("mlp", 1)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="first_pass"):
        opt.first_step()
    opt.zero_grad()
    with pytest.raises(ValueError, match="per-sample"):
        opt.step(lambda mask=None: F.cross_entropy(model(x), y))
    assert all(p.requires_grad for p in model.parameters())
    assert not opt.is_perturbed
    with opt.first_pass():
        F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)  # no losses given
    with pytest.raises(RuntimeError, match="per-sample losses of the first pass"):
        opt.select(F.cross_entropy(model(x), y, reduction="none"))
    assert not opt.is_perturbed  # restored
    with pytest.raises(ValueError, match="beta"):
        ESAM(model.parameters(), torch.optim.SGD, beta=0.0, lr=0.1)


# ======================================================================
# MESA
# ======================================================================


def logits_at(model, w, x):
    names = [n for n, _ in model.named_parameters()]
    return functional_call(model, dict(zip(names, unflat(w, list(model.parameters())))), (x,))


def ref_mesa(kind, data, decay, lam, tau, start):
    model = MODELS[kind][0]()
    w = flat(weights(model))
    ema = w.clone()
    sgd = SGDRef()
    for t, (x, y) in enumerate(data):
        wr = w.detach().requires_grad_(True)
        out = logits_at(model, wr, x)
        loss = F.cross_entropy(out, y)
        if t >= start:
            p_ema = F.softmax(logits_at(model, ema, x) / tau, dim=-1)
            kl = (p_ema * (p_ema.log() - F.log_softmax(out / tau, dim=-1))).sum(-1).mean()
            loss = loss + lam * tau**2 * kl
        (g,) = torch.autograd.grad(loss, wr)
        w = sgd(w, g)
        ema = decay * ema + (1 - decay) * w
    return unflat(w, list(model.parameters())), unflat(ema, list(model.parameters()))


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("style", ["closure", "loop"])
def test_mesa_matches_written_out_update(kind, style):
    data = batches(kind, 5)
    model = MODELS[kind][0]()
    opt = MESA(model.parameters(), torch.optim.SGD, model=model, decay=0.7, lam=0.5, tau=2.0, start_step=1,
               lr=LR, momentum=MU)
    calls = []
    for x, y in data:
        def closure():
            out = model(x)
            loss = F.cross_entropy(out, y) + opt.trajectory_loss(out, x)
            loss.backward()
            calls.append(1)
            return loss
        if style == "closure":
            opt.zero_grad()
            opt.step(closure)
        else:
            closure()
            opt.step()
            opt.zero_grad()
    assert len(calls) == 5  # one pass per step
    ref_w, ref_ema = ref_mesa(kind, data, 0.7, 0.5, 2.0, 1)
    assert_close_lists(weights(model), ref_w)
    assert_close_lists([opt.ema[n] for n, _ in model.named_parameters()], ref_ema)



def test_mesa_ema_of_bfloat16_weights_moves():
    # decay 0.9998: 0.9998 w_ema + 0.0002 w rounds back to w_ema in bfloat16
    # except near 0 (95% of the entries never moved; the EMA's change was 98%
    # off float64 over 50 updates); now a
    # float32 EMA, within 1e-6 of float64 of the same bfloat16 weights, and
    # the EMA forward runs in the model's dtype; state_dict keeps it float32
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).to(torch.bfloat16)
    opt = MESA(model.parameters(), torch.optim.SGD, model=model, lr=LR, momentum=MU)
    ref = {n: t.detach().double() for n, t in [*model.named_parameters(), *model.named_buffers()]
           if t.is_floating_point()}
    for x, y in batches("mlp", 5):
        x = x.to(torch.bfloat16)
        out = model(x)
        (F.cross_entropy(out.float(), y) + opt.trajectory_loss(out, x)).backward()
        opt.step()
        opt.zero_grad()
        now = dict([*model.named_parameters(), *model.named_buffers()])
        ref = {n: 0.9998 * r + 0.0002 * now[n].detach().double() for n, r in ref.items()}
    assert {t.dtype for t in opt.ema.values()} == {torch.float32}
    for n, r in ref.items():
        torch.testing.assert_close(opt.ema[n].double(), r, rtol=1e-6, atol=1e-7)
    assert opt.ema_forward(x).dtype == torch.bfloat16
    other = MESA(model.parameters(), torch.optim.SGD, model=model, lr=LR, momentum=MU)
    other.load_state_dict(opt.state_dict())
    assert all(torch.equal(other.ema[n], opt.ema[n]) and other.ema[n].dtype == torch.float32 for n in ref)

def test_mesa_ema_forward_restores_modes_and_bn_statistics():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3)).to(DT)
    model[2].eval()  # a mixed state must come back as it was
    opt = MESA(model.parameters(), torch.optim.SGD, model=model, lr=0.1)
    (x, y), = batches("mlp", 1)
    bn = copy.deepcopy(model[1].state_dict())
    rng = torch.get_rng_state()
    out = opt.ema_forward(x)
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    assert all(torch.equal(bn[k], v) for k, v in model[1].state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)  # eval mode: no dropout draw
    assert not out.requires_grad
    model.eval()
    torch.testing.assert_close(out, model(x))  # EMA = initial weights at step 0


def test_mesa_state_dict_resume_and_errors():
    data = batches("mlp", 6)

    def train(model, opt, part):
        for x, y in part:
            opt.zero_grad()
            out = model(x)
            (F.cross_entropy(out, y) + opt.trajectory_loss(out, x)).backward()
            opt.step()

    a = mlp()
    oa = MESA(a.parameters(), torch.optim.SGD, model=a, decay=0.5, lr=LR, momentum=MU)
    train(a, oa, data)
    b = mlp()
    ob = MESA(b.parameters(), torch.optim.SGD, model=b, decay=0.5, lr=LR, momentum=MU)
    train(b, ob, data[:3])
    buf = io.BytesIO()
    torch.save({"m": b.state_dict(), "o": ob.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    c = mlp(seed=4)
    c.load_state_dict(ck["m"])
    oc = MESA(c.parameters(), torch.optim.SGD, model=c, decay=0.5, lr=LR, momentum=MU)
    oc.load_state_dict(ck["o"])
    assert oc.mesa_step == 3
    train(c, oc, data[3:])
    assert_same(weights(c), weights(a))
    with pytest.raises(RuntimeError, match="one pass"):
        oc.first_step()
    with pytest.raises(ValueError, match="decay"):
        MESA(c.parameters(), torch.optim.SGD, model=c, decay=1.0, lr=0.1)


# ======================================================================
# BayesianSAM
# ======================================================================

BSAM_KW = dict(num_data=50, lr=0.05, betas=(0.8, 0.9), weight_decay=0.01, rho=0.1, damping=0.1, s_init=2.0)


def ref_bsam(kind, data, seed, num_data, lr, betas, weight_decay, rho, damping, s_init, still=0):
    """The authors' ``build_bsam_optimizer`` written out; the noise is
    drawn as documented (``torch.randn`` per parameter, param order).  The
    last ``still`` parameters are not perturbed (no noise, no ascent) but
    updated as the others."""
    model = MODELS[kind][0]()
    like = list(model.parameters())
    moved = like[:len(like) - still]
    mask = flat([torch.full_like(t, float(i < len(moved))) for i, t in enumerate(like)])
    w = flat(weights(model))
    s = torch.full_like(w, s_init)
    gm = torch.zeros_like(w)
    gen = torch.Generator().manual_seed(seed)
    b1, b2 = betas
    for x, y in data:
        draws = [torch.randn(t.shape, generator=gen, dtype=DT) for t in moved]
        draws += [torch.zeros_like(t) for t in like[len(moved):]]
        eps = flat(draws) / (num_data * s).sqrt()
        g = grad(model, w + eps, x, y)
        ge = grad(model, w + mask * rho * g / s, x, y)
        gm = b1 * gm + (1 - b1) * (ge + weight_decay * w)
        w = w - lr * gm / s
        s = b2 * s + (1 - b2) * ((s * g**2).sqrt() + damping + weight_decay)
    return unflat(w, like), unflat(1 / (num_data * s), like)


def bsam_two_step(opt, model, x, y):
    with opt.first_pass():
        F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with opt.second_pass():
        F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("style", STYLES)
def test_bsam_matches_written_out_update(kind, style):
    data = batches(kind, 5)
    model = MODELS[kind][0]()
    opt = BayesianSAM(model.parameters(), seed=7, **BSAM_KW)
    rng = torch.get_rng_state()
    for x, y in data:
        if style == "closure":
            opt.step(closure_for(model, x, y))
        else:
            bsam_two_step(opt, model, x, y)
    assert torch.equal(torch.get_rng_state(), rng)
    ref_w, ref_var = ref_bsam(kind, data, 7, **BSAM_KW)
    assert_close_lists(weights(model), ref_w)
    assert_close_lists(opt.posterior_variance(), ref_var)



@pytest.mark.parametrize("style", STYLES)
def test_bsam_group_without_perturbation_is_still_updated(style):
    # a perturb=False group was never stepped: the update read the
    # precision's increment, which only the perturbed groups got
    data = batches("mlp", 4)
    model = mlp()
    ps = list(model.parameters())
    opt = BayesianSAM([{"params": ps[:2]}, {"params": ps[2:], "sam_perturb": False}], seed=3, **BSAM_KW)
    for x, y in data:
        if style == "closure":
            opt.step(closure_for(model, x, y))
        else:
            bsam_two_step(opt, model, x, y)
    ref_w, ref_var = ref_bsam("mlp", data, 3, **BSAM_KW, still=len(ps) - 2)
    assert_close_lists(weights(model), ref_w)
    assert_close_lists(opt.posterior_variance(), ref_var)


def test_bsam_precision_of_bfloat16_parameters_is_float32():
    # s <- 0.999 s + 0.001 (sqrt(s)|g| + delta + gamma) rounds back to s in
    # bfloat16 (spacing 2^-8 below 1): s stayed 1.0 where float64 of the same
    # increments reaches 0.9955 after 5 steps; now a float32 s within 1e-6
    data = batches("mlp", 5)
    model = mlp().to(torch.bfloat16)
    kw = dict(BSAM_KW, betas=(0.9, 0.999), s_init=1.0)
    opt = BayesianSAM(model.parameters(), seed=0, **kw)
    params = list(model.parameters())
    ref = [torch.ones(p.shape, dtype=DT) for p in params]
    b2, decay = kw["betas"][1], kw["damping"] + kw["weight_decay"]
    for x, y in data:
        x = x.to(torch.bfloat16)
        with opt.first_pass():
            F.cross_entropy(model(x).float(), y).backward()
        opt.first_step(zero_grad=True)
        ref = [b2 * r + (1 - b2) * (opt.base_optimizer.state[p]["gs"].double() + decay) for r, p in zip(ref, params)]
        with opt.second_pass():
            F.cross_entropy(model(x).float(), y).backward()
        opt.second_step(zero_grad=True)
    s = [opt.base_optimizer.state[p]["s"] for p in params]
    assert all(t.dtype == torch.float32 for t in s)
    assert_close_lists([t.double() for t in s], ref, dict(rtol=1e-6, atol=0))
    assert all(p.dtype == torch.bfloat16 for p in opt.sample())
    other = BayesianSAM(mlp().to(torch.bfloat16).parameters(), seed=0, **kw)
    other.load_state_dict(opt.state_dict())  # torch.optim would cast s to bfloat16
    assert_same([other.base_optimizer.state[p]["s"] for p in other.param_groups[0]["params"]], s)

def test_bsam_state_dict_resume_and_errors():
    data = batches("mlp", 6)
    a = mlp()
    oa = BayesianSAM(a.parameters(), seed=1, **BSAM_KW)
    for x, y in data:
        oa.step(closure_for(a, x, y))
    b = mlp()
    ob = BayesianSAM(b.parameters(), seed=1, **BSAM_KW)
    for x, y in data[:3]:
        ob.step(closure_for(b, x, y))
    buf = io.BytesIO()
    torch.save({"m": b.state_dict(), "o": ob.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    c = mlp(seed=9)
    c.load_state_dict(ck["m"])
    oc = BayesianSAM(c.parameters(), seed=2, **BSAM_KW)  # the noise stream comes from the checkpoint
    oc.load_state_dict(ck["o"])
    for x, y in data[3:]:
        oc.step(closure_for(c, x, y))
    assert_same(weights(c), weights(a))
    (x, y), = data[:1]
    F.cross_entropy(c(x), y).backward()
    w = weights(c)
    with pytest.raises(RuntimeError, match="first_pass"):
        oc.first_step()
    assert_same(weights(c), w)
    with pytest.raises(ValueError, match="num_data"):
        BayesianSAM(c.parameters(), num_data=0)


# ======================================================================
# all variants: AMP, accumulation, resume, exceptions
# ======================================================================

TWO_PASS = {
    "GSAM": lambda m: GSAM(m.parameters(), torch.optim.SGD, rho=0.1, alpha=0.3, lr=LR, momentum=MU),
    "LookSAM": lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=0.1, k=2, lr=LR, momentum=MU),
    "WSAM": lambda m: WSAM(m.parameters(), torch.optim.SGD, rho=0.1, gamma=0.8, lr=LR, momentum=MU),
    "FriendlySAM": lambda m: FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.1, sigma=0.8, lr=LR, momentum=MU),
    "ESAM": lambda m: ESAM(m.parameters(), torch.optim.SGD, rho=0.1, beta=1.0, gamma=1.0, lr=LR, momentum=MU),
    "BayesianSAM": lambda m: BayesianSAM(m.parameters(), seed=0, **BSAM_KW),
}


def generic_two_step(opt, model, x, y, scaler=None, chunks=1, poison=None):
    """Two-step loop with optional GradScaler (bf16 autocast) and
    micro-batches; ``poison`` puts a NaN into the second pass."""
    parts = list(zip(x.chunk(chunks), y.chunk(chunks)))

    def backward():
        for xi, yi in parts:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=scaler is not None):
                loss = F.cross_entropy(model(xi), yi) / len(parts)
            (scaler.scale(loss) if scaler is not None else loss).backward()

    with opt.first_pass():
        backward()
    opt.first_step(zero_grad=True, scaler=scaler)
    if opt.is_perturbed:
        with opt.second_pass():
            backward()
            if poison:
                model[2].weight.grad[0, 0] = float("nan")
    opt.second_step(zero_grad=True, scaler=scaler)
    if scaler is not None:
        scaler.update()


@pytest.mark.parametrize("name", sorted(TWO_PASS))
def test_gradient_accumulation_equals_full_batch(name):
    data = batches("mlp", 4)
    full, acc = mlp(), mlp()
    of, oa = TWO_PASS[name](full), TWO_PASS[name](acc)
    for x, y in data:
        generic_two_step(of, full, x, y)
        generic_two_step(oa, acc, x, y, chunks=3)
    assert_close_lists(weights(acc), weights(full), dict(rtol=1e-11, atol=1e-12))


@pytest.mark.parametrize("name", sorted(TWO_PASS))
def test_grad_scaler_matches_unscaled_and_skips_inf(name):
    data = batches("mlp", 3)
    a, b = mlp().float(), mlp().float()
    oa, ob = TWO_PASS[name](a), TWO_PASS[name](b)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    off = torch.amp.GradScaler("cpu", enabled=False)
    for x, y in data:
        generic_two_step(oa, a, x.float(), y, scaler=scaler)
        generic_two_step(ob, b, x.float(), y, scaler=off)
    assert_close_lists(weights(a), weights(b), dict(rtol=1e-4, atol=1e-5))
    w = weights(a)
    x, y = data[0]
    poisoned = name != "LookSAM" or oa.is_full_step  # a LookSAM reuse step has one pass
    generic_two_step(oa, a, x.float(), y, scaler=scaler, poison=poisoned)
    if poisoned:
        assert_same(weights(a), w)
        assert scaler.get_scale() == 2.0**9
        assert not oa.is_perturbed


@pytest.mark.parametrize("name", sorted(TWO_PASS))
def test_state_dict_resume_equals_uninterrupted(name):
    data = batches("mlp", 6)
    make = TWO_PASS[name]
    straight, first = mlp(), mlp()
    opt0, opt1 = make(straight), make(first)
    for x, y in data:
        generic_two_step(opt0, straight, x, y)
    for x, y in data[:3]:
        generic_two_step(opt1, first, x, y)
    buf = io.BytesIO()
    torch.save({"m": first.state_dict(), "o": opt1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    resumed = mlp(seed=8)
    resumed.load_state_dict(ck["m"])
    opt2 = make(resumed)
    opt2.load_state_dict(ck["o"])
    for x, y in data[3:]:
        generic_two_step(opt2, resumed, x, y)
    assert_same(weights(resumed), weights(straight))


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("name", sorted(TWO_PASS))
def test_closure_raising_in_the_second_pass_restores_weights(name):
    model = mlp()
    opt = TWO_PASS[name](model)
    (x, y), = batches("mlp", 1)
    w = weights(model)
    calls = []

    def closure(mask=None):
        calls.append(1)
        if len(calls) == 2:
            raise Boom
        out = F.cross_entropy(model(x), y, reduction="none" if name == "ESAM" else "mean")
        if name != "ESAM":
            out.backward()
        return out

    with pytest.raises(Boom):
        opt.step(closure)
    assert_same(weights(model), w)
    assert not opt.is_perturbed
    opt.zero_grad()
    calls.append(1)  # the next step runs normally
    opt.step(closure)
    assert not torch.equal(weights(model)[0], w[0])


def test_bsam_pytorch_optimizer_departs_from_the_paper():
    """Why ``pytorch_optimizer.BSAM`` is not compared step by step: with
    ``lr=0`` bSAM must leave the mean ``w`` where it is (the noise and the
    ascent are only evaluation points), as ours does; the peer's weights
    keep its noise and ascent."""
    po = pytest.importorskip("pytorch_optimizer")
    (x, y), = batches("mlp", 1)
    ours = mlp()
    w = weights(ours)
    opt = BayesianSAM(ours.parameters(), num_data=50, lr=0.0, rho=0.1, seed=0)
    opt.step(closure_for(ours, x, y))
    assert_same(weights(ours), w)
    peer_model = mlp()
    peer = po.BSAM(peer_model.parameters(), num_data=50, lr=0.0, rho=0.1)
    F.cross_entropy(peer_model(x), y).backward()  # its state is created from existing gradients

    def closure():
        peer.zero_grad()
        return closure_for(peer_model, x, y)()

    peer.step(closure)
    assert (flat(weights(peer_model)) - flat(w)).abs().max() > 1e-3


def test_esam_gradient_accumulation_as_documented():
    data = batches("mlp", 3)
    full, _, _ = run_esam("mlp", data, "closure", rho=0.1, beta=1.0, gamma=0.5)
    model = mlp()
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.1, beta=1.0, gamma=0.5, lr=LR, momentum=MU)
    for x, y in data:
        parts = list(zip(x.chunk(2), y.chunk(2)))
        before = []
        with opt.first_pass():
            for xi, yi in parts:
                li = F.cross_entropy(model(xi), yi, reduction="none")
                (li.sum() / len(y)).backward()
                before.append(li.detach())
        opt.first_step(zero_grad=True, losses=torch.cat(before))
        with torch.no_grad(), opt.second_pass():
            mask = opt.select(torch.cat([F.cross_entropy(model(xi), yi, reduction="none") for xi, yi in parts]))
        n_sel = int(mask.sum())
        with opt.second_pass():
            for (xi, yi), mi in zip(parts, mask.chunk(2)):
                (F.cross_entropy(model(xi[mi]), yi[mi], reduction="sum") / n_sel).backward()
        opt.second_step(zero_grad=True)
    assert_close_lists(weights(model), weights(full))


# --------------------------------------------------------------------------
# Sparse gradients (nn.Embedding(sparse=True))
# --------------------------------------------------------------------------


class _Bag(nn.Module):
    def __init__(self, sparse):
        super().__init__()
        self.emb = nn.Embedding(12, 4, sparse=sparse)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens).mean(dim=1)))


SPARSE_VARIANTS = {
    "SAM": lambda p: SAM(p, torch.optim.SGD, rho=0.1, lr=0.1),
    "GSAM": lambda p: GSAM(p, torch.optim.SGD, rho=0.1, alpha=0.2, lr=0.1),
    "LookSAM": lambda p: LookSAM(p, torch.optim.SGD, rho=0.1, k=2, alpha=0.5, lr=0.1),
    "WSAM": lambda p: WSAM(p, torch.optim.SGD, rho=0.1, gamma=0.8, lr=0.1),
    "FriendlySAM": lambda p: FriendlySAM(p, torch.optim.SGD, rho=0.1, lr=0.1),
}


@pytest.mark.parametrize("name", sorted(SPARSE_VARIANTS))
def test_sparse_embedding_gradients_step_like_dense_ones(name):
    # the variants that combine the two passes' gradients take them dense;
    # the steps equal those of the same model with a dense embedding
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 12, (8, 3), generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    models = []
    for sparse in (False, True):
        torch.manual_seed(0)
        models.append(_Bag(sparse).to(DT))
    for model in models:
        opt = SPARSE_VARIANTS[name](model.parameters())
        for x, y in data:
            opt.step(closure_for(model, x, y))
            opt.zero_grad()
    assert_close_lists(list(models[1].parameters()), list(models[0].parameters()))


@pytest.mark.parametrize("name", ["SAM", "GSAM", "WSAM", "FriendlySAM", "LookSAM", "ESAM", "ConsistentSAM"])
def test_perturbation_rounded_away_in_bfloat16_is_reported_once(name):
    """bfloat16 keeps 8 significant bits: SAM's e, rho spread over every
    coordinate, partly rounds away when w + e is stored (at rho = 0.005, a
    quarter of it along its direction on this 0.27M-parameter MLP), and the
    steps come closer to the base optimizer's.  The first perturbation is
    checked, once per optimizer; float32 parameters (mixed precision's
    master weights) are not warned about."""
    import warnings

    RHO = 0.005
    makers = {
        "SAM": lambda ps: SAM(ps, torch.optim.SGD, rho=RHO, lr=LR),
        "GSAM": lambda ps: GSAM(ps, torch.optim.SGD, rho=RHO, lr=LR),
        "WSAM": lambda ps: WSAM(ps, torch.optim.SGD, rho=RHO, lr=LR),
        "FriendlySAM": lambda ps: FriendlySAM(ps, torch.optim.SGD, rho=RHO, lr=LR),
        "LookSAM": lambda ps: LookSAM(ps, torch.optim.SGD, k=2, rho=RHO, lr=LR),
        "ESAM": lambda ps: ESAM(ps, torch.optim.SGD, beta=1.0, gamma=1.0, rho=RHO, lr=LR),
        "ConsistentSAM": lambda ps: ConsistentSAM(ps, torch.optim.SGD, rho=RHO, lr=LR),
    }
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g)

    def run(dtype):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10)).to(dtype)
        opt = makers[name](model.parameters())
        xs = x.to(dtype)
        for _ in range(3):
            if name == "ESAM":
                opt.step(lambda mask=None: F.cross_entropy(model(xs).float(), y, reduction="none"))
            else:
                opt.step(closure_for(model, xs, y))

    with pytest.warns(RuntimeWarning, match=f"{name}: storing w \\+ e in bfloat16 lost") as record:
        run(torch.bfloat16)
    assert len([w for w in record if "storing w + e" in str(w.message)]) == 1
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(torch.float32)


_FLOAT16_MAKERS = {
    "SAM": lambda ps: SAM(ps, torch.optim.SGD, rho=0.05, lr=LR, momentum=MU),
    "GSAM": lambda ps: GSAM(ps, torch.optim.SGD, rho=0.05, alpha=0.2, lr=LR, momentum=MU),
    "WSAM": lambda ps: WSAM(ps, torch.optim.SGD, rho=0.05, gamma=0.8, lr=LR, momentum=MU),
    "FriendlySAM": lambda ps: FriendlySAM(ps, torch.optim.SGD, rho=0.05, lr=LR, momentum=MU),
    "LookSAM": lambda ps: LookSAM(ps, torch.optim.SGD, rho=0.05, k=2, alpha=0.5, lr=LR, momentum=MU),
    "ESAM": lambda ps: ESAM(ps, torch.optim.SGD, rho=0.05, beta=0.6, gamma=0.5, seed=0, lr=LR, momentum=MU),
    "ConsistentSAM": lambda ps: ConsistentSAM(ps, torch.optim.SGD, rho=0.05, lr=LR, momentum=MU),
}


@pytest.mark.parametrize("name", sorted(_FLOAT16_MAKERS))
def test_float16_trajectory_follows_float32(name):
    # The same six steps (ESAM with both its selections, from one seed) on a
    # float16 copy of a float32 model: the weights end within 2% of the
    # float32 run's update (measured 0.3-0.7%; float16 keeps 11 bits; in
    # bfloat16, 8 bits, 4-5%, and 14% for ESAM, whose loss-threshold
    # selection flips samples).  Every variant runs at float16, on CPU.
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(6)]

    def run(dtype):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
        start = flat([p.detach() for p in model.parameters()])
        model.to(dtype)
        opt = _FLOAT16_MAKERS[name](model.parameters())
        for x, y in data:
            x = x.to(dtype)
            if name == "ESAM":
                def closure(mask=None, x=x, y=y):
                    losses = F.cross_entropy(model(x).float(), y, reduction="none")
                    return losses if mask is None else losses[mask]
            else:
                def closure(x=x, y=y):
                    loss = F.cross_entropy(model(x).float(), y)
                    loss.backward()
                    return loss
            opt.step(closure)
            opt.zero_grad()
        assert all(p.dtype == dtype for p in model.parameters())
        return start, flat([p.detach().float() for p in model.parameters()])

    start, want = run(torch.float32)
    _, got = run(torch.float16)
    assert torch.isfinite(got).all()
    assert float((got - want).norm() / (want - start).norm()) < 0.02
