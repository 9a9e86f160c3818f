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

from flatness.optim import ESAM, GSAM, MESA, WSAM, BayesianSAM, ConsistentSAM, FriendlySAM, LookSAM

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
            opt.step(cases.closure_for(model, opt, x, y))
    return [p.detach().clone() for p in net.parameters()]


def _worker(rank, init_file, out_dir, per_replica=False):
    """Train every optimizer of the test (``per_replica``: those of
    :data:`PER_REPLICA`, with ``per_replica=True``) on this rank's shard."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x, y = _data()
        x, y = x[rank * 8:(rank + 1) * 8], y[rank * 8:(rank + 1) * 8]
        results = {}
        for name in PER_REPLICA if per_replica else NAMES:
            net = _model()
            ddp = nn.parallel.DistributedDataParallel(net, find_unused_parameters=name == "ESAM")
            results[name] = (_train_per_replica if per_replica else _train)(name, ddp, net, x, y)
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


# ----------------------------------------------------------------------
# per_replica=True: each replica's own ascent, the step alike on every rank
# ----------------------------------------------------------------------
# GSAM, WSAM and LookSAM combined the first pass's gradient, taken in
# no_sync(), into their step: each rank stepped with its own, and the
# replicas' weights drifted apart (WSAM 0.16 after one step).  ConsistentSAM
# formed d from its own g1 but the averaged g2.

PER_REPLICA = ["GSAM", "WSAM", "LookSAM", "ConsistentSAM", "BayesianSAM"]
BSAM_PER_REPLICA = {"num_data": 100, "lr": 0.1, "rho": 0.05, "betas": (0.9, 0.999), "weight_decay": 1e-4,
                    "damping": 0.1, "s_init": 1.0}


def _make_per_replica(name, ddp):
    sgd = {"lr": LR, "momentum": 0.9}
    p, kw = ddp.parameters(), {"per_replica": True, "model": ddp}
    if name == "GSAM":
        return GSAM(p, torch.optim.SGD, rho=0.2, alpha=0.3, **kw, **sgd)
    if name == "WSAM":
        return WSAM(p, torch.optim.SGD, rho=0.2, gamma=0.8, **kw, **sgd)
    if name == "LookSAM":
        return LookSAM(p, torch.optim.SGD, rho=0.2, k=2, alpha=0.7, **kw, **sgd)
    if name == "BayesianSAM":  # the same seed: the same noise on every rank
        return BayesianSAM(p, seed=3, **kw, **BSAM_PER_REPLICA)
    return ConsistentSAM(p, torch.optim.SGD, rho=0.2, rho2=0.1, alpha=0.5, **kw, **sgd)


def _train_per_replica(name, ddp, net, x, y):
    opt = _make_per_replica(name, ddp)
    for _ in range(STEPS):
        opt.step(cases.closure_for(ddp, opt, x, y))
    return [p.detach().clone() for p in net.parameters()]


def _ref_per_replica(name):
    """The rules written out on flat weights: each shard's ascent from its
    own gradients, the step from the gradients averaged over the shards."""
    net = _model()
    like = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    x, y = _data()
    shards = [(x[r * 8:(r + 1) * 8], y[r * 8:(r + 1) * 8]) for r in range(WORLD)]

    def grad(w, xs, ys):
        w = w.detach().requires_grad_(True)
        split = [t.view_as(p) for t, p in zip(w.split([p.numel() for p in like]), like)]
        loss = F.cross_entropy(torch.func.functional_call(net, dict(zip(names, split)), (xs,)), ys)
        return torch.autograd.grad(loss, w)[0]

    def mean(ts):
        return sum(ts) / len(ts)

    w = torch.cat([p.detach().reshape(-1) for p in like])
    if name == "BayesianSAM":  # its own update: s and the momentum g_m
        return _ref_bsam_per_replica(w, like, shards, grad, mean)
    buf, gv, m = None, None, [torch.zeros_like(w) for _ in shards]
    for step in range(STEPS):
        g = [grad(w, *s) for s in shards]
        e = [0.2 * gr / gr.norm() for gr in g]
        if name == "LookSAM" and step % 2 == 1:  # a reuse step: one pass, DDP averages it
            gm = mean(g)
            d = gm + 0.7 * gm.norm() / gv.norm() * gv
        elif name == "ConsistentSAM":
            g2 = [grad(w + er, *s) for er, s in zip(e, shards)]
            for r in range(WORLD):
                m[r] = 0.5 * m[r] + 0.5 * (g2[r] - g[r])
            dr = [g2[r] - g[r] - m[r] for r in range(WORLD)]
            d = mean([grad(w + 0.1 * v / v.norm(), *s) for v, s in zip(dr, shards)])
        else:
            gm, gs = mean(g), mean([grad(w + er, *s) for er, s in zip(e, shards)])
            if name == "GSAM":
                d = gs - 0.3 * (gm - (gm @ gs) / (gs @ gs) * gs)
            elif name == "WSAM":
                d = gm
            else:  # LookSAM's full step
                gv, d = gs - (gm @ gs) / (gm @ gm) * gm, gs
        buf = d.clone() if buf is None else 0.9 * buf + d
        w = w - LR * buf
        if name == "WSAM":  # decoupled: the sharpness term outside the momentum
            w = w - LR * 4.0 * (gs - gm)
    return [t.view_as(p) for t, p in zip(w.split([p.numel() for p in like]), like)]


def _ref_bsam_per_replica(w, like, shards, grad, mean):
    """Bayesian SAM (as ``ref_bsam`` in test_sam_family.py) with each
    shard's ascent and precision increment, both averaged for the update."""
    kw = BSAM_PER_REPLICA
    (b1, b2), wd = kw["betas"], kw["weight_decay"]
    s, gm = torch.full_like(w, kw["s_init"]), torch.zeros_like(w)
    gen = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        eps = torch.cat([torch.randn(p.shape, generator=gen, dtype=w.dtype).reshape(-1) for p in like])
        eps = eps / (kw["num_data"] * s).sqrt()
        g = [grad(w + eps, *sh) for sh in shards]
        ge = mean([grad(w + kw["rho"] * gr / s, *sh) for gr, sh in zip(g, shards)])
        inc = mean([(s * gr**2).sqrt() for gr in g])
        gm = b1 * gm + (1 - b1) * (ge + wd * w)
        w = w - kw["lr"] * gm / s
        s = b2 * s + (1 - b2) * (inc + kw["damping"] + wd)
    return [t.view_as(p) for t, p in zip(w.split([p.numel() for p in like]), like)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_per_replica_ascent_keeps_the_replicas_identical(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), True), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name in PER_REPLICA:
        ref = _ref_per_replica(name)
        for a, b, r in zip(ranks[0][name], ranks[1][name], ref, strict=True):
            assert torch.equal(a, b), f"{name}: the replicas' weights differ"
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12, msg=name)
