"""Every measurement under torch.distributed: 2 and 4 gloo processes on CPU.

Each rank measures its own ``DistributedSampler`` shard (uneven: the data
size is not a multiple of ``world * batch``); the results must be identical
on every rank and equal to the single-process result on the union of the
shards' batches (the same batches, in rank-major order).  One spawned job
per world size runs every check, so the process start-up is paid once.

Kinds that draw random numbers per batch (average-case sharpness) use one
stream per rank: the reference is the size-weighted combination of
single-process runs on each shard with that rank's seed
(:func:`flatness._distributed.derive_seed`).
"""

from __future__ import annotations

import os

import pytest
import torch
from gloo_group import GLOO, run_gloo
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import flatness
from flatness import _distributed
from flatness.diversity import disagreement, disagreement_error_ratio, ensemble_metrics, prediction_variance
from flatness.hessian import spectral_density, top_eigenvalues, trace
from flatness.nonuniformity import channel_gradient_norms, class_loss_imbalance, gradient_variance, kfac_variance

pytestmark = [*GLOO, pytest.mark.slow]

N_SAMPLES, BATCH, SEED = 27, 4, 3


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double()


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(11)
    return TensorDataset(torch.randn(N_SAMPLES, 4, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (N_SAMPLES,), generator=g))


def _shard(world: int, rank: int, data: TensorDataset | None = None) -> list:
    sampler = DistributedSampler(data or _dataset(), num_replicas=world, rank=rank, shuffle=False)
    return list(DataLoader(data or _dataset(), batch_size=BATCH, sampler=sampler))


def _measure(model: nn.Module, members: list, batches, cal) -> dict:
    """Everything compared; ``batches`` is this process's data."""
    out = {}
    for kind in ("linf", "adaptive_l2"):
        r = flatness.sharpness(model, batches, kind=kind, rho=0.05, n_iters=3, m=3)
        out[f"sharp_{kind}"] = r.value
        out[f"sharp_{kind}_per_batch"] = r.per_batch
        out[f"sharp_{kind}_sizes"] = r.batch_sizes
        out[f"sharp_{kind}_clean"] = r.clean_loss
    r = flatness.sharpness(model, batches, kind="hessian_trace", method="hutchinson", n_samples=4)
    out["sharp_trace_kind"], out["sharp_trace_clean"] = r.value, r.clean_loss
    out["sharp_minimum"] = flatness.sharpness(model, batches, kind="minimum", method="exact").value
    eig = top_eigenvalues(model, batches, k=2, tol=1e-10, max_iter=20)
    out["eig"] = eig.eigenvalues
    out["trace_exact"] = trace(model, batches, method="exact").value
    out["trace_hutch"] = trace(model, batches, method="hutchinson", n_samples=6, seed=SEED).value
    out["trace_ggn"] = trace(model, batches, method="hutch++", n_samples=6, curvature="ggn").value
    out["slq_moment2"] = spectral_density(model, batches, n_vectors=2, n_steps=5).moment(2)
    out["hvp"] = flatness.hessian.hvp(model, batches, [torch.ones_like(p) for p in model.parameters()])
    out["disagreement"] = disagreement(members, batches, pairwise=True)
    out["der"] = disagreement_error_ratio(members, batches)
    out["pred_var"] = prediction_variance(members, batches)
    out["ens"] = ensemble_metrics(members, batches, calibration=cal).to_dict()
    gv = gradient_variance(model, batches, chunk_size=3)
    out["gv"] = (gv.total, gv.per_layer, gv.mean_grad_sqnorm, gv.n_samples, gv.batch_size, gv.noise)
    kv = kfac_variance(model, batches, factors=True)
    out["kfac"] = (kv.total, kv.per_layer, kv.second_moment, kv.n_samples, kv.noise)
    out["kfac_factors"] = kv.factors
    cg = channel_gradient_norms(model, batches)
    out["channel"] = (cg.variance, cg.cv, cg.norms)
    cl = class_loss_imbalance(model, batches)
    out["class"] = (cl.cv, cl.per_class, cl.counts)
    return out


def _worker(rank: int, world: int, out_dir: str) -> None:
    model = _net(0)
    members = [_net(s) for s in (1, 2, 3)]
    batches = _shard(world, rank)
    cal = _shard(world, rank, TensorDataset(*_dataset()[:10]))
    out = _measure(model, members, batches, cal)
    # a DDP-wrapped model gives the same numbers
    ddp = nn.parallel.DistributedDataParallel(model)
    out["ddp_linf"] = flatness.sharpness(ddp, batches, kind="linf", rho=0.05, n_iters=3, m=3).value
    out["ddp_eig"] = top_eigenvalues(ddp, batches, k=2, tol=1e-10, max_iter=20).eigenvalues
    ddp_members = [nn.parallel.DistributedDataParallel(m) for m in members]
    out["ddp_disagreement"] = disagreement(ddp_members, batches[: rank + 1], pairwise=True)
    out["ddp_gv"] = gradient_variance(ddp, batches).total
    # per-rank random streams (average case, APGD restarts)
    avg = flatness.sharpness(model, batches, kind="avg_l2", rho=0.1, n_samples=4, seed=SEED)
    out["avg"] = (avg.value, avg.per_batch, avg.batch_sizes, avg.clean_loss)
    out["restarts"] = flatness.sharpness(model, batches, kind="l2", rho=0.1, n_iters=2, restarts=1, seed=SEED).value
    # seed=None: one seed shared by all ranks -> the same value everywhere
    out["hutch_none"] = trace(model, batches, method="hutchinson", n_samples=4, seed=None).value
    # uneven batch counts per rank: rank r has r + 1 batches
    uneven = batches[: rank + 1]
    out["uneven_trace"] = trace(model, uneven, method="hutchinson", n_samples=4).value
    out["uneven_linf"] = flatness.sharpness(model, uneven, kind="linf", rho=0.05, n_iters=2).value
    # local_only: this rank's shard alone
    with flatness.local_only():
        out["local_trace"] = trace(model, batches, method="hutchinson", n_samples=4).value
        out["local_gv"] = gradient_variance(model, batches).total
    # an error on one rank reaches every rank instead of a hang
    def bad_loss(z, y):
        if rank == 1:
            raise ArithmeticError("injected on rank 1")
        return nn.functional.cross_entropy(z, y)

    try:
        flatness.sharpness(model, batches, kind="linf", rho=0.05, n_iters=2, loss_fn=bad_loss)
        out["error"] = None
    except Exception as exc:  # noqa: BLE001 - the type is what is checked
        out["error"] = (type(exc).__name__, str(exc))
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def _run(world: int, tmp_path) -> list[dict]:
    """Run :func:`_worker` on ``world`` processes and load their results
    (:func:`gloo_group.run_gloo` frees the DDP objects before the teardown)."""
    run_gloo(_worker, world, str(tmp_path), group_timeout=30)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _close(a, b, path="", rtol=1e-7, atol=1e-10):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}", rtol, atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]", rtol, atol)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{path}: {m}")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=rtol, abs=atol, nan_ok=True), path
    else:
        assert a == b, path


def _identical(a, b, path=""):
    """Bit-for-bit equality of nested results across ranks."""
    if isinstance(a, dict):
        for k in a:
            _identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _identical(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b or (a != a and b != b), path


@pytest.mark.parametrize("world", [2, 4])
def test_every_measurement_over_ranks(tmp_path, world, one_thread):
    ranks = _run(world, tmp_path)
    for r in range(1, world):
        shared = {k: v for k, v in ranks[r].items() if not k.startswith(("local_", "error"))}
        _identical(shared, ranks[0], f"rank{r}")
    got = ranks[0]

    model = _net(0)
    members = [_net(s) for s in (1, 2, 3)]
    shards = [_shard(world, r) for r in range(world)]
    union = [b for s in shards for b in s]
    cal = [b for r in range(world) for b in _shard(world, r, TensorDataset(*_dataset()[:10]))]
    want = _measure(model, members, union, cal)
    for key, value in want.items():
        _close(value, got[key], key)
    assert got["sharp_linf_sizes"] == [len(b[1]) for b in union]  # rank-major order
    _close(want["sharp_linf"], got["ddp_linf"], "ddp_linf")
    _close(want["eig"], got["ddp_eig"], "ddp_eig")
    _close(want["gv"][0], got["ddp_gv"], "ddp_gv")
    uneven = [b for r, s in enumerate(shards) for b in s[: r + 1]]
    _close(disagreement(members, uneven, pairwise=True), got["ddp_disagreement"], "ddp_disagreement")

    # average case: rank r draws from derive_seed(SEED, r), not from SEED
    parts = [flatness.sharpness(model, s, kind="avg_l2", rho=0.1, n_samples=4,
                                seed=_distributed.derive_seed(SEED, r)) for r, s in enumerate(shards)]
    per_batch = [v for p in parts for v in p.per_batch]
    _close(per_batch, got["avg"][1], "avg.per_batch")
    sizes = [n for p in parts for n in p.batch_sizes]
    _close(sum(v * n for v, n in zip(per_batch, sizes)) / sum(sizes), got["avg"][0], "avg.value")
    same_seed = [v for s in shards for v in flatness.sharpness(
        model, s, kind="avg_l2", rho=0.1, n_samples=4, seed=SEED).per_batch]
    assert per_batch[len(shards[0]):] != same_seed[len(shards[0]):]  # not copies of rank 0's stream
    assert len({_distributed.derive_seed(SEED, r) for r in range(world)}) == world
    restarts = [flatness.sharpness(model, s, kind="l2", rho=0.1, n_iters=2, restarts=1,
                                   seed=_distributed.derive_seed(SEED, r)) for r, s in enumerate(shards)]
    _close(sum(p.value * sum(p.batch_sizes) for p in restarts) / sum(sum(p.batch_sizes) for p in restarts),
           got["restarts"], "restarts")

    _close(trace(model, uneven, method="hutchinson", n_samples=4).value, got["uneven_trace"], "uneven_trace")
    _close(flatness.sharpness(model, uneven, kind="linf", rho=0.05, n_iters=2).value, got["uneven_linf"], "uneven")
    for r in range(world):
        _close(trace(model, shards[r], method="hutchinson", n_samples=4).value, ranks[r]["local_trace"], "local_trace")
        _close(gradient_variance(model, shards[r]).total, ranks[r]["local_gv"], "local_gv")
    assert ranks[1]["error"] == ("ArithmeticError", "injected on rank 1")
    assert ranks[0]["error"][0] == "RuntimeError" and "rank(s) [1]" in ranks[0]["error"][1]


class _HiddenOnSomeData(nn.Module):
    """``b``'s weight is also used functionally, but only on batches whose
    last input column is positive: the first batch of one rank finds the
    hidden use, another rank's does not."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x[:, :3]))
        out = self.b(h)
        if bool((x[:, 3] > 0).all()):
            out = out + 0.5 * nn.functional.linear(h, self.b.weight)
        return out


def _hidden_model_and_shards(world: int) -> tuple[nn.Module, list[list]]:
    torch.manual_seed(0)
    model = _HiddenOnSomeData().double()
    g = torch.Generator().manual_seed(5)
    shards = []
    for r in range(world):
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        x[:, 3] = 1.0 if r == 0 else -1.0  # only rank 0 uses b's weight functionally
        y = torch.randint(0, 3, (8,), generator=g)
        shards.append([(x[:4], y[:4]), (x[4:], y[4:])])
    return model, shards


class _CalledOnSomeData(nn.Module):
    """``c`` is called only on batches whose last input column is negative
    (on one rank's data only)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.c = nn.Linear(3, 3)

    def forward(self, x):
        out = self.a(x[:, :3])
        return out + self.c(x[:, :3]) if bool((x[:, 3] < 0).all()) else out


def _called_model() -> nn.Module:
    torch.manual_seed(1)
    return _CalledOnSomeData().double()


def _kfac_hidden_worker(rank: int, world: int, out_dir: str) -> None:
    model, shards = _hidden_model_and_shards(world)
    out = {}
    for fallback in ("skip", "exact"):
        r = kfac_variance(model, shards[rank], fallback=fallback, factors=True)
        out[fallback] = (r.total, r.per_layer, r.unsupported, r.exact_layers, r.settings["kfac_layers"],
                         r.settings["hidden_from_hooks"], r.factors)
    r = kfac_variance(_called_model(), shards[rank], factors=True)
    out["called"] = (r.total, r.per_layer, r.factors)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_kfac_layers_hidden_on_one_rank_are_treated_alike_on_every_rank(tmp_path, one_thread):
    # The first batch of each rank decided which layers its hooks cannot
    # see; where ranks disagreed, each reduced a different set of running
    # sums (a failed or hung collective).  The first batches' findings are
    # now pooled: every rank skips (or computes exactly) the same layers,
    # as one process does on the union of the data.
    world = 2
    run_gloo(_kfac_hidden_worker, world, str(tmp_path), deadline=120, group_timeout=30)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    _identical(ranks[1], ranks[0], "rank1")
    model, shards = _hidden_model_and_shards(world)
    union = [b for s in shards for b in s]
    for fallback in ("skip", "exact"):
        want = kfac_variance(model, union, fallback=fallback, factors=True)
        got = ranks[0][fallback]
        assert got[5].keys() == {"b"} and got[4] == ["a"], fallback
        assert got[2] == (["b.weight", "b.bias"] if fallback == "skip" else [])
        assert got[3] == ([] if fallback == "skip" else ["b"])
        _close(want.total, got[0], f"{fallback}.total")
        _close(want.per_layer, got[1], f"{fallback}.per_layer")
        _close(want.factors, got[6], f"{fallback}.factors")
    # a layer that one rank's data never calls: zero factors there, not a
    # missing entry ("ranks saw different factored layers")
    want = kfac_variance(_called_model(), union, factors=True)
    _close((want.total, want.per_layer, want.factors), ranks[0]["called"], "called")
