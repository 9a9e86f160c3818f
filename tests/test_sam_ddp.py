"""SAM under DistributedDataParallel: 2 processes, gloo, CPU (behaviour 6).

Each rank trains on its own shard; the result is compared with a
single-process reference written out here:
* default: one global perturbation from the all-reduced gradient,
* ``per_replica=True``: each replica perturbs with its own gradient
  (m-sharpness with m = the local batch), the second-pass gradients are
  averaged as usual.
"""

from __future__ import annotations

import os

import cases
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo_group import run_gloo
from torch import nn
from torch.func import functional_call

from flatness.optim import SAM

pytestmark = [pytest.mark.distributed]

WORLD = 2
RHO, LR, STEPS = 0.2, 0.1, 2


def _model():
    return cases.mlp(0, (4, 6, 3))


def _shards():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD, 10, 4, generator=g, dtype=torch.float64)
    # different label distributions make the replicas' gradients differ
    y = torch.stack([torch.randint(0, 3, (10,), generator=g), torch.zeros(10, dtype=torch.long)])
    return x, y


def _worker(rank, world, out_dir):
    x, y = _shards()
    x, y = x[rank], y[rank]
    results = {}
    for mode in ("global", "per_replica", "per_replica_two_step"):
        ddp = nn.parallel.DistributedDataParallel(_model())
        per_replica = mode != "global"
        opt = SAM(
            ddp.parameters(), torch.optim.SGD, rho=RHO, lr=LR, per_replica=per_replica, model=ddp
        )
        for _ in range(STEPS):
            if mode == "per_replica_two_step":
                with opt.first_pass():  # runs inside ddp.no_sync()
                    F.cross_entropy(ddp(x), y).backward()
                opt.first_step(zero_grad=True)
                F.cross_entropy(ddp(x), y).backward()
                opt.second_step(zero_grad=True)
            else:

                def closure():
                    loss = F.cross_entropy(ddp(x), y)
                    loss.backward()
                    return loss

                opt.step(closure)
        results[mode] = [p.detach().clone() for p in ddp.module.parameters()]
        # the variants' hook for locally computed quantities
        local = [torch.full((2, 3), float(rank + 1), dtype=torch.float64), torch.tensor([rank * 4.0])]
        opt.all_reduce_(local)
        results[mode + "_all_reduce"] = local
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _grad(model, values, x, y):
    names = [n for n, _ in model.named_parameters()]
    vals = [v.detach().requires_grad_(True) for v in values]
    return list(torch.autograd.grad(F.cross_entropy(functional_call(model, dict(zip(names, vals)), (x,)), y), vals))


def _ascent(g):
    norm = torch.cat([t.flatten() for t in g]).norm()
    return [RHO * t / norm for t in g]


def _reference(per_replica):
    model = _model()
    x, y = _shards()
    w = [p.detach().clone() for p in model.parameters()]
    for _ in range(STEPS):
        grads = [_grad(model, w, x[r], y[r]) for r in range(WORLD)]
        if per_replica:
            es = [_ascent(g) for g in grads]
        else:
            mean = [sum(gs) / WORLD for gs in zip(*grads)]
            es = [_ascent(mean)] * WORLD
        g2 = [_grad(model, [a + b for a, b in zip(w, es[r])], x[r], y[r]) for r in range(WORLD)]
        w = [wi - LR * sum(gs) / WORLD for wi, gs in zip(w, zip(*g2))]
    return w


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_global_and_per_replica_perturbations(tmp_path):
    run_gloo(_worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    expected = {"global": _reference(False), "per_replica": _reference(True)}
    expected["per_replica_two_step"] = expected["per_replica"]
    for mode, ref in expected.items():
        # replicas stay identical (the base step uses the all-reduced gradient)
        for a, b in zip(ranks[0][mode], ranks[1][mode]):
            assert torch.equal(a, b)
        for p, r in zip(ranks[0][mode], ref):
            torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)
    # all_reduce_ averages over replicas; per_replica keeps local values
    for r in range(WORLD):
        mean = ranks[r]["global_all_reduce"]
        assert torch.equal(mean[0], torch.full((2, 3), 1.5, dtype=torch.float64))
        assert torch.equal(mean[1], torch.tensor([2.0]))
        local = ranks[r]["per_replica_all_reduce"]
        assert torch.equal(local[1], torch.tensor([r * 4.0]))
    # the two modes really differ on this data
    assert not torch.allclose(ranks[0]["global"][0], ranks[0]["per_replica"][0])
