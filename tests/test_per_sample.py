"""Per-sample gradients (flatness._per_sample) against single-sample autograd loops."""

from __future__ import annotations

import cases
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatness._guard import ModelGuard
from flatness._params import select_params
from flatness._per_sample import iter_per_sample_grads, per_sample_grads


def _mlp() -> nn.Module:
    return cases.mlp(0, (5, 7, 3))


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4),
    ).double()
    # Non-trivial running statistics, so eval-mode BatchNorm is not the identity.
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def _loop(model, params, x, y, loss_fn=F.cross_entropy):
    """Reference: one autograd.grad call per sample, on a batch of one."""
    rows = []
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.autograd.grad(loss, params.params))
    return [torch.stack(col) for col in zip(*rows, strict=True)]


@pytest.mark.parametrize(
    "make, shape, classes",
    [(_mlp, (9, 5), 3), (_cnn, (6, 2, 7, 7), 4)],
    ids=["mlp", "cnn-batchnorm-eval"],
)
def test_matches_single_sample_loop(make, shape, classes):
    model = make()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (shape[0],), generator=gen)
    params = select_params(model)
    with ModelGuard(model):
        grads, losses = per_sample_grads(model, params, x, y)
        ref = _loop(model, params, x, y)
        ref_losses = F.cross_entropy(model(x), y, reduction="none")
    assert len(grads) == len(params.params)
    for g, r, p in zip(grads, ref, params.params, strict=True):
        assert g.shape == (shape[0], *p.shape)
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
    torch.testing.assert_close(losses, ref_losses.detach(), rtol=0, atol=1e-12)


def test_streaming_chunks_cover_loader_in_order():
    model = _mlp()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=gen)
    loader = [(x[:7], y[:7]), (x[7:], y[7:])]
    params = select_params(model)
    chunks = list(iter_per_sample_grads(model, params, loader, chunk_size=3))
    # 7 -> 3 + 3 + 1, 4 -> 3 + 1
    assert [c[2].shape[0] for c in chunks] == [3, 3, 1, 3, 1]
    streamed = [torch.cat([c[0][k] for c in chunks]) for k in range(len(params.params))]
    ref = _loop(model, params, x, y)
    for g, r in zip(streamed, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat([c[2] for c in chunks]), y)


def test_subset_of_params_and_tuple_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(2, 4)

        def forward(self, u, v):
            return self.a(u) * torch.tanh(self.b(v))

    torch.manual_seed(4)
    model = TwoInputs().double()
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (5,), generator=gen)
    params = select_params(model, ["b.weight"])
    grads, _ = per_sample_grads(model, params, (u, v), y)
    ref = [
        torch.autograd.grad(F.cross_entropy(model(u[i : i + 1], v[i : i + 1]), y[i : i + 1]),
                            model.b.weight)[0]
        for i in range(5)
    ]
    torch.testing.assert_close(grads[0], torch.stack(ref), rtol=0, atol=1e-10)


def test_model_and_grads_untouched():
    model = _mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    ptrs = [p.data_ptr() for p in model.parameters()]
    params = select_params(model)
    per_sample_grads(model, params, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_chunk_size(bad):
    model = _mlp()
    params = select_params(model)
    data = (torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="chunk_size"):
        next(iter_per_sample_grads(model, params, data, chunk_size=bad))
