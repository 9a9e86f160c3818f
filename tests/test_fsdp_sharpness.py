"""``flatness.sharpness`` on FSDP2 (``fully_shard``) models: two gloo processes on CPU.

Each rank holds its half of every batch; the ranks' ``k``-th batches
together are one batch of the measurement, so every perturbation kind must
give the single-process value on the concatenated batches (float64, same
seed: the random starts and samples are drawn on the full shapes and
sharded).  The layer sizes do not divide evenly over two ranks, and one
weight is exactly zero (the adaptive sets keep it unperturbed).  The model
comes back bit for bit (shards, ``.grad``, modes), also after an exception
half-way, and ranks with different numbers of batches fail together.
"""

from __future__ import annotations

import cases
import pytest
import torch
from gloo_group import GLOO, fully_shard_linears, require_fully_shard, run_gloo
from torch import nn

import flatness

require_fully_shard()

pytestmark = GLOO

WORLD = 2
KINDS = ["linf", "l2", "adaptive_linf", "adaptive_l2", "avg_linf", "avg_l2", "avg_adaptive_linf", "avg_adaptive_l2"]


def _net() -> nn.Module:
    model = cases.mlp(0, (5, 7, 3))  # 7 and 3 rows: uneven shards over 2 ranks
    with torch.no_grad():
        model[0].weight[6, 2] = 0.0  # on rank 1's shard
    return model


def _batches():
    """The global batches: 8 samples (4 per rank) and 7 (4 and 3: the
    ranks' losses are weighted by their sizes)."""
    return cases.classification_batches((8, 7), (5,), 3, seed=1)


def _options(kind):
    if kind.startswith("avg"):
        return {"rho": 0.05, "n_samples": 3, "seed": 3}
    return {"rho": 0.05, "n_iters": 5, "restarts": 1, "seed": 3}


def _sharded(mesh) -> nn.Module:
    return fully_shard_linears(_net(), mesh)


def _snapshot(model):
    return [(p.to_local().clone(), p.to_local().data_ptr(), p.grad, p.requires_grad) for p in model.parameters()]


def _same(before, model) -> bool:
    return all(torch.equal(v, p.to_local()) and ptr == p.to_local().data_ptr() and g is p.grad and r == p.requires_grad
               for (v, ptr, g, r), p in zip(before, model.parameters(), strict=True))


def _worker(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model = _sharded(mesh)
    data = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in _batches()]
    # a gradient of the user's own, which the measurements must leave alone
    nn.functional.cross_entropy(model(data[0][0]), data[0][1]).backward()
    model.train()
    before = _snapshot(model)
    results = {}
    for kind in KINDS:
        r = flatness.sharpness(model, data, kind=kind, **_options(kind))
        results[kind] = (r.value, r.per_batch, r.batch_sizes, r.clean_loss, r.settings["sharded"])
        assert _same(before, model) and model.training, kind
    # The fused elementwise passes run block by block on each rank's shard;
    # blocks of 4 elements split every shard and give the same values bit for bit.
    from flatness import _geometry

    block, _geometry.BLOCK = _geometry.BLOCK, 4
    for kind in KINDS:
        r = flatness.sharpness(model, data, kind=kind, **_options(kind))
        assert (r.value, r.per_batch, r.clean_loss) == (results[kind][0], results[kind][1], results[kind][3]), kind
    _geometry.BLOCK = block

    calls = 0

    def failing_loss(out, y):  # fails in the middle of an APGD run, on every rank
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("loss failed")
        return nn.functional.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="loss failed"):
        flatness.sharpness(model, data, kind="l2", rho=0.05, n_iters=5, loss_fn=failing_loss)
    assert _same(before, model)
    # rank 1 has one batch more: both ranks raise instead of hanging
    with pytest.raises(ValueError, match="same number of batches"):
        flatness.sharpness(model, data[: 1 + rank], kind="avg_l2", rho=0.05, n_samples=2)
    assert _same(before, model)
    torch.save(results, out / f"rank{rank}.pt")


def test_sharpness_on_fsdp2_equals_one_process_on_the_concatenated_batches(tmp_path):
    run_gloo(_worker, WORLD, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for kind in KINDS:
        ref = flatness.sharpness(_net(), _batches(), kind=kind, **_options(kind))
        assert ref.value != 0, kind
        for got in ranks:
            value, per_batch, sizes, clean, sharded = got[kind]
            assert sharded == "fsdp2"
            assert sizes == ref.batch_sizes == [8, 7]
            assert value == pytest.approx(ref.value, rel=1e-9, abs=1e-14), kind
            assert per_batch == pytest.approx(ref.per_batch, rel=1e-9, abs=1e-14), kind
            assert clean == pytest.approx(ref.clean_loss, rel=1e-12), kind
        assert ranks[0][kind] == ranks[1][kind]  # every rank returns the same result
