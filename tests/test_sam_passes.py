"""flatness.optim.SAM across its two passes: the same dropout masks (same_rng)
and BatchNorm running statistics frozen in the second pass.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import DT, Boom, assert_same, closure_for, params_of
from cases import sam_data as data
from cases import sam_mlp as mlp
from torch import nn

from flatness.optim import SAM, disable_running_stats

# ----------------------------------------------------------------------
# dropout: same masks in both passes
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
# BatchNorm running statistics
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
