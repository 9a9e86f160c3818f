"""The sharpness-aware optimizers as ``torch.optim`` citizens.

* ``rho=0`` is the base optimizer, bit for bit, for every ``torch.optim``
  optimizer and every variant; the wrapper never changes a base
  hyper-parameter (Adadelta's ``rho``, RMSprop's and ASGD's ``alpha``).
* Every LR scheduler of ``torch.optim.lr_scheduler`` built on the SAM object
  matches the same scheduler on the bare base optimizer.
* ``state_dict`` / ``load_state_dict`` run the hooks registered on the
  object, refuse another wrapper or base class before changing anything,
  and load flatness 0.1.0 checkpoints; pickling keeps no model.
* Optimizers whose ``step`` needs a closure (LBFGS) are refused.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import sys
import warnings
from pathlib import Path

import cases
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatness.optim import SAM, ConsistentSAM, NonuniformSAM

DATA = Path(__file__).parent / "data"

# optimizer -> keyword arguments (non-default values where it matters; the
# names a SAM variant also uses go through base_kwargs)
OPTIMIZERS = {
    "SGD": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "Adam": (torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), amsgrad=True)),
    "AdamW": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "Adamax": (torch.optim.Adamax, dict(lr=0.01)),
    "NAdam": (torch.optim.NAdam, dict(lr=0.01, momentum_decay=3e-3)),
    "RAdam": (torch.optim.RAdam, dict(lr=0.01)),
    "Adagrad": (torch.optim.Adagrad, dict(lr=0.1, lr_decay=1e-3)),
    "Adadelta": (torch.optim.Adadelta, dict(lr=1.0, base_kwargs={"rho": 0.8})),
    "RMSprop": (torch.optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True, base_kwargs={"alpha": 0.95})),
    "Rprop": (torch.optim.Rprop, dict(lr=0.01, etas=(0.4, 1.3))),
    "ASGD": (torch.optim.ASGD, dict(lr=0.05, t0=2, base_kwargs={"alpha": 0.7})),
    "SparseAdam": (torch.optim.SparseAdam, dict(lr=0.01)),
    "Adafactor": (torch.optim.Adafactor, dict(lr=0.01, beta2_decay=-0.7)),
}


def test_every_torch_optimizer_is_in_the_matrix():
    found = {
        name
        for name, obj in vars(torch.optim).items()
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer
    }
    # LBFGS: its step needs a closure (refused, see below); Muon takes 2-d weights only
    assert found - set(OPTIMIZERS) <= {"LBFGS", "Muon"}, found - set(OPTIMIZERS)


VARIANTS = {
    "SAM": lambda params, cls, model, kw: SAM(params, cls, rho=0.0, **kw),
    "ASAM": lambda params, cls, model, kw: SAM(params, cls, rho=0.0, adaptive=True, eta=0.01, **kw),
    "ConsistentSAM": lambda params, cls, model, kw: ConsistentSAM(params, cls, rho=0.0, rho2=0.0, alpha=0.5, **kw),
    # the embedding is not a Kronecker-factored layer: NonuniformSAM refuses
    # to leave it silently unperturbed, so it goes in a perturb=False group
    "NonuniformSAM": lambda params, cls, model, kw: NonuniformSAM(
        [{"params": [model.emb.weight], "sam_perturb": False},
         {"params": [p for p in params if p is not model.emb.weight]}],
        cls, rho=0.0, model=model, **kw),
}


class _Net(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.sparse = sparse
        self.emb = nn.Embedding(10, 5, sparse=sparse)
        self.fc = nn.Linear(5, 3)
        if sparse:  # SparseAdam takes sparse gradients only
            self.fc.requires_grad_(False)

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(i)))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 10, (12,), generator=g), torch.randint(0, 3, (12,), generator=g)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    for t in range(steps):
        x, y = _batch(t)
        opt.step(cases.closure_for(model, opt, x, y, zero_grad=True))


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _assert_bitwise(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_bitwise(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_bitwise(u, v)
    else:
        assert a == b


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_rho_zero_is_the_base_optimizer_bit_for_bit(name, variant):
    cls, kw = OPTIMIZERS[name]
    sparse = name == "SparseAdam"
    if sparse and variant == "NonuniformSAM":
        pytest.skip("K-FAC needs Linear/Conv2d gradients, SparseAdam takes sparse (embedding) gradients only")
    plain_kw = {k: v for k, v in kw.items() if k != "base_kwargs"} | kw.get("base_kwargs", {})
    ref = _Net(sparse)
    plain = cls(_trainable(ref), **plain_kw)
    _train(ref, plain)

    model = _Net(sparse)
    opt = VARIANTS[variant](_trainable(model), cls, model, kw)
    _train(model, opt)

    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q), (name, variant)
    # the base optimizer's hyper-parameters are its own, untouched
    for g, h in zip(opt.param_groups, plain.param_groups):
        assert {k: v for k, v in g.items() if not k.startswith("sam_") and k != "params"} == {
            k: v for k, v in h.items() if k != "params"
        }
    _assert_bitwise(
        {i: s for i, s in enumerate(opt.state[p] for p in _trainable(model))},
        {i: s for i, s in enumerate(plain.state[p] for p in _trainable(ref))},
    )


# ----------------------------------------------------------------------
# names shared by a variant and its base optimizer
# ----------------------------------------------------------------------


def _lin():
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def test_sam_keywords_never_reach_the_base_optimizer():
    model = _lin()
    opt = SAM(model.parameters(), torch.optim.Adadelta, rho=0.05, lr=1.0)
    assert opt.param_groups[0]["rho"] == 0.9  # Adadelta's default
    assert opt.param_groups[0]["sam_rho"] == 0.05
    opt = SAM(model.parameters(), torch.optim.Adadelta, rho=0.05, base_kwargs={"rho": 0.7})
    assert opt.param_groups[0]["rho"] == 0.7 and opt.param_groups[0]["sam_rho"] == 0.05
    opt = ConsistentSAM(model.parameters(), torch.optim.RMSprop, alpha=0.5, lr=0.1)
    assert opt.param_groups[0]["alpha"] == 0.99 and opt.param_groups[0]["sam_alpha"] == 0.5
    opt = ConsistentSAM(model.parameters(), torch.optim.ASGD, alpha=0.5, base_kwargs={"alpha": 0.6})
    assert opt.param_groups[0]["alpha"] == 0.6 and opt.param_groups[0]["sam_alpha"] == 0.5
    assert opt.base_optimizer.defaults["alpha"] == 0.6
    assert "SAM" not in repr(opt.base_optimizer)


def test_collisions_are_never_resolved_silently():
    model = _lin()
    with pytest.raises(TypeError, match="both"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, base_kwargs={"lr": 0.2})
    with pytest.raises(TypeError, match="base_kwargs must be a dict"):
        SAM(model.parameters(), torch.optim.SGD, base_kwargs=[("lr", 0.1)])
    # a group's bare "rho" is Adadelta's or SAM's: refused unless sam_rho says which
    group = {"params": [model.weight], "rho": 0.5}
    with pytest.raises(ValueError, match="ambiguous.*sam_rho"):
        SAM([group], torch.optim.Adadelta)
    opt = SAM([{"params": [model.weight], "rho": 0.5, "sam_rho": 0.1}], torch.optim.Adadelta)
    assert opt.param_groups[0]["rho"] == 0.5 and opt.param_groups[0]["sam_rho"] == 0.1
    with pytest.raises(ValueError, match="ambiguous"):
        opt.add_param_group({"params": [model.bias], "rho": 0.3})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="unknown param group key 'sam_alpha'"):
        SAM([{"params": [model.weight], "sam_alpha": 0.5}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="both 'rho' and 'sam_rho'"):
        SAM([{"params": [model.weight], "rho": 0.5, "sam_rho": 0.1}], torch.optim.SGD, lr=0.1)


def test_deprecated_group_spelling_still_works():
    model = _lin()
    with pytest.warns(FutureWarning, match=r"\['rho', 'adaptive'\] are deprecated.*'sam_rho', 'sam_adaptive'") as rec:
        opt = SAM([{"params": model.parameters(), "rho": 0.3, "adaptive": True}], torch.optim.SGD, lr=0.1)
    assert all(Path(r.filename).name == Path(__file__).name for r in rec)  # points at the caller
    assert opt.param_groups[0]["sam_rho"] == 0.3 and opt.param_groups[0]["sam_adaptive"]
    assert "rho" not in opt.param_groups[0]
    # an instance built with the 0.1.0 spelling
    base = torch.optim.SGD([{"params": model.parameters(), "rho": 0.2}], lr=0.1)
    with pytest.warns(FutureWarning):
        opt = SAM(None, base)
    assert opt.param_groups[0]["sam_rho"] == 0.2
    # a group added through the base optimizer in the 0.1.0 spelling
    model2 = _lin()
    opt = SAM([model2.weight], torch.optim.SGD, lr=0.1)
    opt.base_optimizer.add_param_group({"params": [model2.bias], "rho": 0.4})
    x = torch.randn(5, 3)
    model2(x).square().sum().backward()
    with pytest.warns(FutureWarning, match="sam_rho"):
        opt.first_step()
    opt.restore()
    assert opt.param_groups[1]["sam_rho"] == 0.4 and "rho" not in opt.param_groups[1]
    # old code that schedules rho by writing the 0.1.0 key: the write is honoured
    opt.param_groups[0]["rho"] = 0.7
    model2.zero_grad()
    model2(x).square().sum().backward()
    with pytest.warns(FutureWarning, match="sam_rho"):
        opt.first_step()
    opt.restore()
    assert opt.param_groups[0]["sam_rho"] == 0.7 and "rho" not in opt.param_groups[0]
    # an instance of an optimizer with its own rho keeps it
    base = torch.optim.Adadelta(model.parameters(), rho=0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = SAM(None, base, rho=0.1)
    assert opt.param_groups[0]["rho"] == 0.7 and opt.param_groups[0]["sam_rho"] == 0.1


def test_group_settings_view():
    from flatness.optim import GroupSettings

    group = {"params": [], "lr": 0.1, "rho": 0.9, "sam_rho": 0.05, "sam_adaptive": False}
    view = GroupSettings(group, ["rho", "adaptive"])
    assert view["rho"] == 0.05 and view["lr"] == 0.1  # the variant's rho hides the base's
    view["rho"] = 0.2
    assert group["sam_rho"] == 0.2 and group["rho"] == 0.9
    assert sorted(view) == ["adaptive", "lr", "params", "rho"] and len(view) == 4
    assert view.copy() == {"params": [], "lr": 0.1, "rho": 0.2, "adaptive": False}
    assert {**view, "rho": 1.0}["rho"] == 1.0 and view.get("eta", 3) == 3


def test_defaults_expose_the_base_hyper_parameters():
    model = _lin()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["sam_rho"] == 0.05
    assert SAM(model.parameters(), torch.optim.Adam).defaults["betas"] == (0.9, 0.999)
    assert opt.sam_defaults == {"rho": 0.05, "adaptive": False, "eta": 0.0, "perturb": True}


def test_closure_optimizers_are_refused_at_construction():
    model = _lin()
    with pytest.raises(TypeError, match=r"LBFGS.step\(\) requires a closure"):
        SAM(model.parameters(), torch.optim.LBFGS, lr=0.1)
    with pytest.raises(TypeError, match="closure"):
        ConsistentSAM(None, torch.optim.LBFGS(model.parameters()))

    class NeedsClosure(torch.optim.SGD):
        def step(self, closure):  # type: ignore[override]
            return super().step(closure)

    with pytest.raises(TypeError, match="NeedsClosure"):
        SAM(model.parameters(), NeedsClosure, lr=0.1)


# ----------------------------------------------------------------------
# LR schedulers
# ----------------------------------------------------------------------

S = torch.optim.lr_scheduler
SCHEDULERS = {
    "LambdaLR": lambda o: S.LambdaLR(o, lambda t: 1.0 / (1 + t)),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda t: 0.9),
    "StepLR": lambda o: S.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[4, 9], gamma=0.3),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.25, total_iters=5),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.1, total_iters=8),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.9),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=15, power=2.0),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=7, eta_min=1e-3),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=4, T_mult=2),
    "CyclicLR": lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=4, cycle_momentum=True),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=20, cycle_momentum=True),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, patience=1, factor=0.5, threshold=0.5),
    "SequentialLR": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.2, total_iters=5), S.ExponentialLR(o, gamma=0.8)], milestones=[5]
    ),
    "ChainedScheduler": lambda o: S.ChainedScheduler([S.StepLR(o, 4, 0.5), S.ExponentialLR(o, gamma=0.95)]),
}


def test_every_torch_scheduler_is_in_the_matrix():
    found = {
        name
        for name, obj in vars(S).items()
        if inspect.isclass(obj)
        and (issubclass(obj, S.LRScheduler) or obj is S.ReduceLROnPlateau)
        and obj not in (S.LRScheduler, getattr(S, "_LRScheduler", None))
        and not name.startswith("_")
    }
    assert found <= set(SCHEDULERS), found - set(SCHEDULERS)


def _mlp():
    return cases.mlp(0, (4, 6, 3), dtype=torch.float32)


def _run_schedule(opt, sched, model, style):
    torch.manual_seed(1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    trace = []
    closure = cases.closure_for(model, opt, x, y, zero_grad=True)
    for _ in range(20):
        if style in ("closure", "plain"):
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.first_step(zero_grad=True)
            closure()
            opt.second_step(zero_grad=True)
        if isinstance(sched, S.ReduceLROnPlateau):
            sched.step(float(loss.detach()))
        else:
            sched.step()
        trace.append([{k: v for k, v in g.items() if k != "params" and not k.startswith("sam_")} for g in opt.param_groups])
    return trace


@pytest.mark.parametrize("base", ["SGD", "Adam"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_on_sam_equals_scheduler_on_the_base_optimizer(name, base):
    style = ("closure", "two_step")[sorted(SCHEDULERS).index(name) % 2]  # both styles over the matrix
    cls, kw = (torch.optim.SGD, dict(lr=0.05, momentum=0.9)) if base == "SGD" else (torch.optim.Adam, dict(lr=0.01))
    ref = _mlp()
    plain = cls(ref.parameters(), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()"
        want = _run_schedule(plain, SCHEDULERS[name](plain), ref, "plain")
        model = _mlp()
        opt = SAM(model.parameters(), cls, rho=0.0, **kw)
        got = _run_schedule(opt, SCHEDULERS[name](opt), model, style)
    assert got == want
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    if name in ("CyclicLR", "OneCycleLR"):  # momentum / beta1 cycled in the base optimizer
        key = "momentum" if base == "SGD" else "betas"
        assert len({str(t[0][key]) for t in got}) > 2


# ----------------------------------------------------------------------
# state dict protocol
# ----------------------------------------------------------------------


def _trained_sam(cls=torch.optim.SGD, wrapper=SAM, **kw):
    model = _mlp()
    opt = wrapper(model.parameters(), cls, lr=0.05, **kw)
    _run_schedule(opt, S.ConstantLR(opt, factor=1.0, total_iters=1), model, "closure")
    return model, opt


def test_state_dict_hooks_run_and_see_the_whole_state():
    model, opt = _trained_sam(momentum=0.9)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("sd_pre", o)))

    def post(o, sd):
        calls.append(("sd_post", o))
        assert sd["sharpness_aware"]["base"] == "torch.optim.sgd.SGD"
        sd["mine"] = 1
        return sd

    opt.register_state_dict_post_hook(post)

    def load_pre(o, sd):
        calls.append(("load_pre", o))
        sd = dict(sd)
        sd.pop("mine")
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o)))
    sd = opt.state_dict()
    assert sd["mine"] == 1
    opt.load_state_dict(sd)
    assert [c for c, _ in calls] == ["sd_pre", "sd_post", "load_pre", "load_post"]
    assert all(o is opt for _, o in calls)
    assert opt.param_groups is opt.base_optimizer.param_groups and opt.state is opt.base_optimizer.state
    # step hooks of torch.optim.Optimizer also run on the wrapper's step
    steps = []
    opt.register_step_pre_hook(lambda o, a, k: steps.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: steps.append("post"))
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    opt.step(lambda: F.cross_entropy(model(x), y).backward())
    assert steps == ["pre", "post"]


def _snapshot(opt):
    params = [p for g in opt.param_groups for p in g["params"]]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return copy.deepcopy((groups, [opt.state.get(p) for p in params], [opt.extra_state.get(p) for p in params]))


@pytest.mark.parametrize(
    "make_other, match",
    [
        (lambda: _trained_sam(torch.optim.Adam)[1], "base optimizer torch.optim.adam.Adam"),
        (lambda: _trained_sam(wrapper=ConsistentSAM)[1], "saved by flatness.optim.consistent.ConsistentSAM"),
        (lambda: _trained_sam(torch.optim.SGD, momentum=0.9, adaptive=True)[1], None),  # same classes: loads
    ],
)
def test_mismatched_state_dict_refused_before_anything_changes(make_other, match):
    _, opt = _trained_sam(momentum=0.9)
    sd = make_other().state_dict()
    before = _snapshot(opt)
    if match is None:
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["sam_adaptive"]
        return
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _assert_bitwise(_snapshot(opt), before)


def test_state_dict_of_another_base_without_class_record_refused():
    # a plain Adam state dict, and a 0.1.0-format one, into SAM(SGD)
    model, opt = _trained_sam(momentum=0.9)
    adam = torch.optim.Adam(model.parameters())
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"lacks \['dampening', 'momentum'\]"):
        opt.load_state_dict(adam.state_dict())
    old = torch.load(DATA / "sam_checkpoint_0_1_0.pt", weights_only=True)
    net = _fixture_model()
    adam_sam = SAM(net.parameters(), torch.optim.Adam, lr=0.1)
    with pytest.raises(ValueError, match="0.1.0 state dict does not fit base optimizer Adam"):
        adam_sam.load_state_dict(old["sam"])
    with pytest.raises(ValueError, match="newer"):
        opt.load_state_dict({**opt.state_dict(), "sharpness_aware": {"version": 99}})
    _assert_bitwise(_snapshot(opt), before)


def _fixture_model():
    sys.path.insert(0, str(DATA))
    try:
        from make_sam_checkpoint_0_1_0 import model
    finally:
        sys.path.remove(str(DATA))
    return model()


def _fixture_train(opt, net):
    sys.path.insert(0, str(DATA))
    try:
        from make_sam_checkpoint_0_1_0 import train
    finally:
        sys.path.remove(str(DATA))
    train(opt, net, 1)


def test_flatness_0_1_0_checkpoints_load_and_continue_alike():
    old = torch.load(DATA / "sam_checkpoint_0_1_0.pt", weights_only=True)
    assert old["version"] == "0.1.0"
    net = _fixture_model()
    net.load_state_dict(old["sam_weights"])
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.9, lr=0.5, momentum=0.1)  # all from the file
    opt.load_state_dict(old["sam"])
    g = opt.param_groups[0]
    assert (g["sam_rho"], g["lr"], g["momentum"]) == (0.05, 0.1, 0.9) and "rho" not in g
    _fixture_train(opt, net)
    # the file's next weights were computed on another machine: float64
    # kernels may round differently (one ulp seen), so agreement to 1e-13
    # is what "continues alike" can promise across machines
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, old["sam_weights_next"][k], rtol=1e-13, atol=1e-15)

    net = _fixture_model()
    net.load_state_dict(old["consistent_weights"])
    opt = ConsistentSAM(net.parameters(), torch.optim.SGD, lr=0.1)
    opt.load_state_dict(old["consistent"])
    assert opt.param_groups[0]["sam_alpha"] == 0.5 and "alpha" not in opt.param_groups[0]
    _fixture_train(opt, net)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, old["consistent_weights_next"][k], rtol=1e-13, atol=1e-15)
    # and saved again in the current format
    assert opt.state_dict()["sharpness_aware"]["version"] == 2


def test_round_trip_through_torch_save_is_exact():
    _, opt = _trained_sam(torch.optim.Adam, wrapper=ConsistentSAM)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    model2 = _mlp()
    opt2 = ConsistentSAM(model2.parameters(), torch.optim.Adam, alpha=0.1, lr=0.05)
    opt2.load_state_dict(sd)
    got, want = opt2.state_dict(), opt.state_dict()
    # the constructor's defaults (for groups added later) are not part of the load, as in torch
    assert got["sharpness_aware"].pop("defaults")["alpha"] == 0.1
    want["sharpness_aware"].pop("defaults")
    _assert_bitwise(got, want)


def test_pickle_holds_optimizer_state_only():
    model = _mlp()
    model.register_buffer("big", torch.zeros(200_000))  # 800 kB that must not be pickled
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, model=model, freeze_bn=True)
    _run_schedule(opt, S.ConstantLR(opt, factor=1.0, total_iters=1), model, "closure")
    blob = pickle.dumps(opt)
    assert len(blob) < 100_000
    copy_ = pickle.loads(blob)
    assert copy_.model is None and type(copy_.base_optimizer) is torch.optim.SGD
    assert copy_.param_groups is copy_.base_optimizer.param_groups
    _assert_bitwise(copy_.state_dict()["param_groups"], opt.state_dict()["param_groups"])
    assert len(copy_._optimizer_state_dict_post_hooks) == 1  # the wrapper's own entry comes back
    assert "sharpness_aware" in copy_.state_dict()
    deep = copy.deepcopy(SAM(model.parameters(), torch.optim.Adam))  # a working copy
    assert isinstance(deep, SAM)
    # not in the middle of a step
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step"):
        pickle.dumps(opt)
    opt.restore()
