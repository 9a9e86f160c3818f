"""``torch.compile`` and the sharpness-aware optimizers.

The stages that move the weights (``first_step``, ``middle_step``,
``second_step``, ``restore``, ...) run eagerly (``torch.compiler.disable``);
the model's forward and backward inside a compiled training step are
compiled.  Checked over 5 steps against the eager loop: same weights (rel
1e-6 in float32), and the base optimizer always steps from the exact ``w``.

Compiling is slow on a small CPU machine: a tiny MLP, the ``aot_eager``
backend (Dynamo and AOTAutograd, where side effects are traced) for most
tests and the default inductor backend once.
"""

from __future__ import annotations

import cases
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatness.optim import SAM, ConsistentSAM

STEPS = 5


def _model():
    return cases.mlp(0, (4, 8, 3), dtype=torch.float32)


def _data():
    return cases.classification_batch(16, (4,), 3, seed=1, dtype=torch.float32)


def _make_opt(model, variant):
    if variant == "SAM":
        return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    return ConsistentSAM(model.parameters(), torch.optim.SGD, rho=0.05, rho2=0.1, alpha=0.5, lr=0.1, momentum=0.9)


def _train(style, variant="SAM", backend=None, compile_model=False):
    """Weights after STEPS steps; asserts that every base step starts at w."""
    torch._dynamo.reset()
    model = _model()
    opt = _make_opt(model, variant)
    net = torch.compile(model, backend=backend or "inductor") if compile_model else model
    at_base_step = []
    opt.base_optimizer.register_step_pre_hook(
        lambda o, a, k: at_base_step.append([p.detach().clone() for p in model.parameters()])
    )
    x, y = _data()

    def loss_of():
        return F.cross_entropy(net(x), y)

    if style == "closure":

        def train_step():
            def closure():
                loss = loss_of()
                loss.backward()
                return loss

            return opt.step(closure)

    else:

        def train_step():
            loss = loss_of()
            loss.backward()
            opt.first_step(zero_grad=True)
            if variant == "ConsistentSAM":
                loss_of().backward()
                opt.middle_step(zero_grad=True)
            loss_of().backward()
            opt.second_step(zero_grad=True)
            return loss.detach()

    if backend is not None and not compile_model:
        train_step = torch.compile(train_step, backend=backend)
    for _ in range(STEPS):
        w = [p.detach().clone() for p in model.parameters()]
        train_step()
        assert not opt.is_perturbed
        assert all(torch.equal(a, b) for a, b in zip(at_base_step[-1], w)), "the base step did not start at w"
    assert len(at_base_step) == STEPS
    return [p.detach().clone() for p in model.parameters()]


def _assert_close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize(
    "style, variant",
    [("closure", "SAM"), ("two_step", "SAM"), ("closure", "ConsistentSAM"), ("two_step", "ConsistentSAM")],
)
def test_compiled_training_step_equals_eager(style, variant):
    _assert_close(_train(style, variant, backend="aot_eager"), _train(style, variant))


@pytest.mark.slow
def test_with_inductor_compiled_model_in_eager_loop_and_compiled_step():
    # the default backend: C++ code generation, float32 results within 1e-6
    _assert_close(_train("closure", compile_model=True), _train("closure"))
    _assert_close(_train("two_step", backend="inductor"), _train("two_step"))


def test_stages_run_eagerly_in_subclasses():
    # a subclass that overrides a stage is also excluded from the graph
    class Counting(SAM):
        def first_step(self, zero_grad=False, **kw):
            self.count = getattr(self, "count", 0) + 1
            super().first_step(zero_grad, **kw)

    assert getattr(Counting.first_step, "_flatness_eager", False)
    assert getattr(Counting.__dict__["first_step"], "_flatness_eager", False)
    # and stages inherited from a mixin (NonuniformSAM's K-FAC bookkeeping)
    from flatness.optim import NonuniformSAM

    for name in ("first_step", "second_step", "restore", "step"):
        assert getattr(getattr(NonuniformSAM, name), "_flatness_eager", False), name


def test_compiled_step_with_passes_dropout_and_kfac():
    # first_pass / second_pass (RNG replay, K-FAC capture) inside the compiled step
    from flatness.optim import NonuniformSAM

    x, y = _data()

    def run(compiled):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3))
        opt = NonuniformSAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1, same_rng=True)

        def train_step():
            with opt.first_pass():
                F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            with opt.second_pass():
                F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)

        if compiled:
            train_step = torch.compile(train_step, backend="aot_eager")
        torch.manual_seed(3)
        for _ in range(3):
            train_step()
            assert not opt.is_perturbed
        return [p.detach().clone() for p in model.parameters()], torch.rand(3)

    (got, rng_got), (want, rng_want) = run(True), run(False)
    _assert_close(got, want)
    assert torch.equal(rng_got, rng_want)  # dropout drew the same numbers
