"""flatness.optim.SAM: parameter groups (own rho / adaptive / perturb=False),
schedulers and add_param_group on either object.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from cases import assert_same, closure_for, params_of, ref_grad
from cases import sam_data as data
from cases import sam_mlp as mlp

from flatness.optim import SAM

# ----------------------------------------------------------------------
# param groups: own rho / adaptive / perturb=False; shared with the base
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
