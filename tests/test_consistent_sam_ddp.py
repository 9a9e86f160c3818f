"""ConsistentSAM / NonuniformSAM under DistributedDataParallel (2 gloo
processes on CPU): the ranks stay identical and equal the single-process run
on the union of their shards (equal shard sizes, so DDP's averaged gradient
and the pooled Kronecker factors are those of the whole batch)."""

from __future__ import annotations

import os

import cases
import pytest
import torch
from gloo_group import GLOO, run_gloo
from torch import nn

from flatness.optim import ConsistentSAM, NonuniformSAM

pytestmark = [*GLOO, pytest.mark.slow]

WORLD, STEPS = 2, 3


def _net():
    return cases.mlp(0, (4, 6, 3))


def _data():
    return cases.classification_batch(8, (4,), 3, seed=1)


def _opt(name, model, inner):
    if name == "consistent-kfac":
        return ConsistentSAM(model.parameters(), torch.optim.SGD, rho=0.2, rho2=0.1, lr=0.1,
                             preconditioner="kfac", model=inner, stat_decay=0.5)
    if name == "consistent":
        return ConsistentSAM(model.parameters(), torch.optim.SGD, rho=0.2, rho2=0.1, lr=0.1)
    return NonuniformSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=inner, stat_decay=0.5)


def _train(name, model, opt, x, y):
    for _ in range(STEPS):
        opt.step(cases.closure_for(model, opt, x, y))


def _worker(rank, world, out_dir):
    x, y = _data()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    out = {}
    for name in ("consistent", "consistent-kfac", "nonuniform"):
        inner = _net()
        ddp = nn.parallel.DistributedDataParallel(inner)
        _train(name, ddp, _opt(name, ddp, ddp), xs, ys)
        out[name] = [p.detach().clone() for p in inner.parameters()]
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_matches_single_process(tmp_path):
    run_gloo(_worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, y = _data()
    for name in ("consistent", "consistent-kfac", "nonuniform"):
        for a, b in zip(ranks[0][name], ranks[1][name]):
            assert torch.equal(a, b), name
        model = _net()
        _train(name, model, _opt(name, model, model), x, y)
        for p, q in zip(model.parameters(), ranks[0][name]):
            torch.testing.assert_close(p.detach(), q, rtol=1e-9, atol=1e-11, msg=name)
