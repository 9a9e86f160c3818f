"""The SAM family under DistributedDataParallel: 2 processes, gloo, CPU.

Each rank trains on its own shard of equal size; the weights must equal a
single-process run of the same optimizer on the whole batch (the mean loss
over equal shards has the average of the shards' gradients), and the
replicas must stay identical.  ESAM's stochastic weight perturbation
switches ``requires_grad`` per step, so it runs with
``find_unused_parameters=True`` and the same seed on both ranks.
"""

from __future__ import annotations

import datetime
import os

import cases
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from flatness.optim import ESAM, GSAM, MESA, WSAM, BayesianSAM, FriendlySAM, LookSAM

pytestmark = [pytest.mark.distributed]

WORLD, STEPS, LR = 2, 3, 0.1
NAMES = ["GSAM", "LookSAM", "WSAM", "FriendlySAM", "BayesianSAM", "ESAM", "MESA"]


def _model():
    return cases.mlp(0, (4, 6, 3))


def _data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD * 8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (WORLD * 8,), generator=g)
    y[8:] = 0  # the replicas' gradients differ
    return x, y


def _make(name, model, net):
    sgd = {"lr": LR, "momentum": 0.9}
    p = net.parameters()
    if name == "GSAM":
        return GSAM(p, torch.optim.SGD, rho=0.2, alpha=0.3, **sgd)
    if name == "LookSAM":
        return LookSAM(p, torch.optim.SGD, rho=0.2, k=2, **sgd)
    if name == "WSAM":
        return WSAM(p, torch.optim.SGD, rho=0.2, gamma=0.8, **sgd)
    if name == "FriendlySAM":
        return FriendlySAM(p, torch.optim.SGD, rho=0.2, sigma=0.8, **sgd)
    if name == "BayesianSAM":
        return BayesianSAM(p, num_data=100, lr=0.1, rho=0.1, seed=3)
    if name == "ESAM":
        return ESAM(p, torch.optim.SGD, rho=0.2, beta=0.6, gamma=1.0, seed=3, **sgd)
    return MESA(p, torch.optim.SGD, model=model, decay=0.5, lam=0.5, tau=2.0, **sgd)


def _train(name, model, net, x, y):
    opt = _make(name, model, net)
    for _ in range(STEPS):
        if name == "ESAM":
            opt.step(lambda mask=None: F.cross_entropy(model(x), y, reduction="none"))
        elif name == "MESA":
            opt.zero_grad()
            out = model(x)
            (F.cross_entropy(out, y) + opt.trajectory_loss(out, x)).backward()
            opt.step()
        else:
            def closure():
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
    return [p.detach().clone() for p in net.parameters()]


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x, y = _data()
        x, y = x[rank * 8:(rank + 1) * 8], y[rank * 8:(rank + 1) * 8]
        results = {}
        for name in NAMES:
            net = _model()
            ddp = nn.parallel.DistributedDataParallel(net, find_unused_parameters=name == "ESAM")
            results[name] = _train(name, ddp, net, x, y)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_family_under_ddp_equals_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    x, y = _data()
    for name in NAMES:
        net = _model()
        ref = _train(name, net, net, x, y)
        for a, b, r in zip(ranks[0][name], ranks[1][name], ref, strict=True):
            assert torch.equal(a, b), name
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12, msg=name)
