"""FSDP2 (``fully_shard``) on CPU: two gloo processes.

``fully_shard`` runs on CPU with the gloo backend: each parameter becomes a
``DTensor`` holding one shard per rank.  SAM and the perturbation kinds of
``sharpness`` support such models (``test_fsdp_sam.py``,
``test_fsdp_sharpness.py``); everything else refuses them up front (a
``TypeError`` naming FSDP2, nothing changed), and the documented way to
measure is an unsharded copy built from the full state dict, which gives
the single-process result.
"""

from __future__ import annotations

import pytest
import torch
from gloo_group import GLOO, require_fully_shard, run_gloo
from torch import nn

import flatness
from flatness.diversity import disagreement, ensemble_metrics, prediction_variance
from flatness.hessian import top_eigenvalues
from flatness.nonuniformity import gradient_variance
from flatness.optim import SAM

require_fully_shard()

pytestmark = GLOO


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 8, dtype=torch.float64, generator=g), torch.randint(0, 3, (6,), generator=g)


def _measures(model, batch):
    return {
        "linf": flatness.sharpness(model, batch, kind="linf", rho=1e-2, n_iters=3, seed=0).value,
        "avg_l2": flatness.sharpness(model, batch, kind="avg_l2", rho=1e-2, n_samples=3, seed=0).value,
    }


def _sam_step(model, batch):
    x, y = batch
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, world, out):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))
    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    batch = _batch()
    before = [p.full_tensor().clone() for p in model.parameters()]
    messages = []
    for call in (
        lambda: flatness.sharpness(model, batch, kind="hessian_trace"),
        lambda: flatness.sharpness(model, batch, kind="linf", rho=1e-2, n_iters=3, m=2),
        lambda: flatness.sharpness(model, batch, kind="avg_l2", rho=1e-2, device="cpu"),
        lambda: flatness.sharpness(model, batch, kind="l2", rho=1e-2, algorithm="reference"),
        lambda: top_eigenvalues(model, batch, k=1),
        lambda: gradient_variance(model, batch),
    ):
        try:
            call()
        except TypeError as exc:
            messages.append(str(exc))
        else:
            messages.append(None)
    with flatness.local_only(), pytest.raises(TypeError, match="local_only"):
        flatness.sharpness(model, batch, kind="linf", rho=1e-2, n_iters=3)
    partly = _model()
    fully_shard(partly[0], mesh=mesh)  # not the root: the last layer stays plain
    with pytest.raises(TypeError, match="mix sharded and plain"):
        flatness.sharpness(partly, batch, kind="linf", rho=1e-2, n_iters=3)
    # nothing changed: the shards hold what they held
    assert all(torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters()))
    # the documented recipe: a plain copy from the full state dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    plain = _model()
    plain.load_state_dict(full)
    with flatness.local_only():  # each rank measures its own copy on the same batch
        values = _measures(plain, batch)
    weights = _sam_step(plain, batch)
    torch.save({"messages": messages, "values": values, "weights": weights}, out / f"rank{rank}.pt")


def test_fsdp2_is_refused_clearly_and_the_full_copy_matches(tmp_path):
    run_gloo(_worker, 2, tmp_path)
    model, batch = _model(), _batch()
    ref = _measures(model, batch)
    ref_w = _sam_step(model, batch)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for msg in got["messages"]:
            assert msg is not None and "FSDP2" in msg and "full_state_dict=True" in msg, msg
        for kind, value in ref.items():
            assert got["values"][kind] == pytest.approx(value, rel=1e-6, abs=1e-12), kind
        for a, b in zip(got["weights"], ref_w):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def _members():
    return [nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3)).double() for _ in range(2)]


def _ensemble_data():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 8, dtype=torch.float64, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(2)]


def _ensemble_measures(members, data):
    metrics = ensemble_metrics(members, data)
    return [disagreement(members, data), prediction_variance(members, data),
            metrics.ensemble["nll"], metrics.ensemble["accuracy"]]


def _ensemble_worker(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    members = _members()
    for member in members:
        fully_shard(member[0], mesh=mesh)
        fully_shard(member, mesh=mesh)
    data = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in _ensemble_data()]
    torch.save(_ensemble_measures(members, data), out / f"rank{rank}.pt")


def test_ensemble_measures_of_fsdp2_members_equal_one_process(tmp_path):
    # they only call the members (FSDP's forward all-gathers the shards) and
    # sum their counts over the ranks, as for any data-parallel evaluation
    run_gloo(_ensemble_worker, 2, tmp_path)
    torch.manual_seed(0)
    ref = _ensemble_measures(_members(), _ensemble_data())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got == pytest.approx(ref, rel=1e-12)
