"""flatness.optim.SAM state: state_dict round trips and resumption, and the
saved weights restored when a pass raises or a step is abandoned.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from cases import BASES, Boom, assert_same, closure_for, params_of
from cases import sam_data as data
from cases import sam_mlp as mlp

from flatness.optim import SAM

# ----------------------------------------------------------------------
# state_dict round trip
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
# exceptions restore the weights
# ----------------------------------------------------------------------


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
