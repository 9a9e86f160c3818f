"""SAM and its family on FSDP2 (``fully_shard``) models: two gloo processes on CPU.

Each rank trains on its own half of a batch; FSDP2 averages the halves'
gradients (reduce-scatter), so a few steps must give the weights of a
single-process run of the same optimizer on the whole batch (float64, up
to rounding).  The layer sizes do not divide evenly over two ranks, so the
shards have different shapes (and FSDP pads them).  Variants that need the
whole parameters refuse a sharded model at construction.
"""

from __future__ import annotations

import io

import cases
import pytest
import torch
import torch.nn.functional as F
from gloo_group import GLOO, fully_shard_linears, require_fully_shard, run_gloo
from torch import nn

from flatness.optim import (
    ESAM,
    GSAM,
    MESA,
    SAM,
    WSAM,
    BayesianSAM,
    ConsistentSAM,
    FriendlySAM,
    LookSAM,
    NonuniformSAM,
)

require_fully_shard()

pytestmark = GLOO

WORLD, STEPS = 2, 3
SUPPORTED = ["SAM", "ASAM", "GSAM", "LookSAM", "LookSAM-per-tensor", "WSAM", "FriendlySAM",
             "ConsistentSAM", "BayesianSAM", "ESAM"]


def _net() -> nn.Module:
    return cases.mlp(0, (5, 7, 3))  # 7 and 3 rows: uneven shards over 2 ranks


def _data():
    return cases.classification_batch(8, (5,), 3, seed=1)


def _make(name, model):
    sgd = {"lr": 0.1, "momentum": 0.9}
    p = model.parameters()
    if name == "SAM":
        return SAM(p, torch.optim.SGD, rho=0.2, **sgd)
    if name == "ASAM":
        return SAM(p, torch.optim.Adam, rho=0.5, adaptive=True, eta=0.01, lr=0.01)
    if name == "GSAM":
        return GSAM(p, torch.optim.SGD, rho=0.2, alpha=0.3, **sgd)
    if name == "LookSAM":
        return LookSAM(p, torch.optim.SGD, rho=0.2, k=2, **sgd)
    if name == "LookSAM-per-tensor":
        return LookSAM(p, torch.optim.SGD, rho=0.2, k=2, per_tensor=True, **sgd)
    if name == "WSAM":
        return WSAM(p, torch.optim.SGD, rho=0.2, gamma=0.8, **sgd)
    if name == "FriendlySAM":
        return FriendlySAM(p, torch.optim.SGD, rho=0.2, sigma=0.8, **sgd)
    if name == "ConsistentSAM":
        return ConsistentSAM(p, torch.optim.SGD, rho=0.2, rho2=0.1, adaptive=True, lr=0.1)
    if name == "BayesianSAM":
        return BayesianSAM(p, num_data=100, lr=0.1, rho=0.1, seed=3)
    if name == "ESAM":
        return ESAM(p, torch.optim.SGD, rho=0.2, beta=0.6, gamma=1.0, seed=3, **sgd)
    raise AssertionError(name)


def _train(opt, model, x, y, steps=STEPS):
    for _ in range(steps):
        if isinstance(opt, ESAM):
            opt.step(lambda mask=None: F.cross_entropy(model(x), y, reduction="none"))
            continue

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def _sharded(mesh) -> nn.Module:
    return fully_shard_linears(_net(), mesh)


def _full(model) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _round_trip(name, mesh, x, y):
    """Weights after 2 + 2 steps, uninterrupted and through a state dict
    (``torch.save`` of each rank's sharded state, loaded into a new model
    and optimizer)."""
    model = _sharded(mesh)
    opt = _make(name, model)
    _train(opt, model, x, y, 2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(opt, model, x, y, 2)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    again = _sharded(mesh)
    again.load_state_dict(saved["model"])
    opt2 = _make(name, again)
    opt2.load_state_dict(saved["opt"])
    _train(opt2, again, x, y, 2)
    return _full(model), _full(again)


def _checkpoint(mesh, x, y):
    """As :func:`_round_trip`, through ``torch.distributed.checkpoint``'s
    full (unsharded) state dicts of the model and of the base optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    model = _sharded(mesh)
    opt = _make("ASAM", model)
    _train(opt, model, x, y, 2)
    buf = io.BytesIO()  # as a checkpoint file: the dicts share tensors (Adam's step) with the live state
    torch.save({"model": get_model_state_dict(model, options=full),
                "opt": get_optimizer_state_dict(model, opt.base_optimizer, options=full)}, buf)
    _train(opt, model, x, y, 2)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    weights, state = saved["model"], saved["opt"]
    assert not isinstance(state["state"]["0.weight"]["exp_avg"], torch.distributed.tensor.DTensor)
    again = _sharded(mesh)
    set_model_state_dict(again, weights, options=full)
    opt2 = _make("ASAM", again)
    set_optimizer_state_dict(again, opt2.base_optimizer, state, options=full)
    # the base optimizer's load_state_dict replaced its state and groups; SAM's
    # own load_state_dict of the base's state dict shares them again
    opt2.load_state_dict(opt2.base_optimizer.state_dict())
    assert opt2.state is opt2.base_optimizer.state and opt2.param_groups is opt2.base_optimizer.param_groups
    _train(opt2, again, x, y, 2)
    return _full(model), _full(again)


def _restore(mesh, x, y) -> None:
    """``restore()`` and an exception in the second pass put every shard back bit for bit."""
    model = _sharded(mesh)
    opt = _make("SAM", model)
    before = [p.to_local().clone() for p in model.parameters()]

    def same():
        return all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters(), strict=True))

    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert opt.is_perturbed and not same()
    opt.restore()
    assert same()
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="second pass failed"), opt.second_pass():
        F.cross_entropy(model(x), y).backward()
        raise RuntimeError("second pass failed")
    assert same() and not opt.is_perturbed


def _refusals(mesh, x, y):
    model = _sharded(mesh)
    before = _full(model)
    messages = {}
    for name, make in (
        ("MESA", lambda m: MESA(m.parameters(), torch.optim.SGD, model=m, lr=0.1)),
        ("NonuniformSAM", lambda m: NonuniformSAM(m.parameters(), torch.optim.SGD, lr=0.1, model=m)),
        ("ConsistentSAM(preconditioner='kfac')",
         lambda m: ConsistentSAM(m.parameters(), torch.optim.SGD, lr=0.1, preconditioner="kfac", model=m)),
    ):
        with pytest.raises(TypeError) as info:
            make(model)
        messages[name] = str(info.value)
    after = _full(model)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    from torch.distributed.fsdp import fully_shard

    partly = _net()
    fully_shard(partly[0], mesh=mesh)  # not the root: the last layer stays plain
    with pytest.raises(TypeError, match="some parameters are sharded .* fully_shard to the root"):
        SAM(partly.parameters(), torch.optim.SGD, lr=0.1)
    return messages


def _worker(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))
    x, y = _data()
    x, y = x.chunk(world)[rank], y.chunk(world)[rank]
    weights = {}
    for name in SUPPORTED:
        model = _sharded(mesh)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        _train(_make(name, model), model, x, y)
        weights[name] = _full(model)
    trips = {name: _round_trip(name, mesh, x, y) for name in ("SAM", "ASAM", "LookSAM", "BayesianSAM")}
    trips["ASAM, torch.distributed.checkpoint"] = _checkpoint(mesh, x, y)
    _restore(mesh, x, y)
    torch.save({"weights": weights, "trips": trips, "refusals": _refusals(mesh, x, y)}, out / f"rank{rank}.pt")


def test_sam_family_on_fsdp2_equals_one_process_on_the_whole_batch(tmp_path):
    run_gloo(_worker, WORLD, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    x, y = _data()
    for name in SUPPORTED:
        model = _net()
        _train(_make(name, model), model, x, y)
        ref = [p.detach() for p in model.parameters()]
        init = list(_net().parameters())
        for got in ranks:
            for a, r, w in zip(got["weights"][name], ref, init, strict=True):
                assert not torch.equal(r, w.detach()), name  # the steps moved the weights
                torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12, msg=name)
    for got in ranks:
        for name, (uninterrupted, resumed) in got["trips"].items():
            for a, b in zip(uninterrupted, resumed, strict=True):
                assert torch.equal(a, b), name
        for name, msg in got["refusals"].items():
            assert name in msg and "FSDP2" in msg and "DTensor" in msg and "DDP" in msg, msg
