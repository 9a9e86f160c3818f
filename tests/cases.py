"""Shared test cases: small models, data and dense float64 references.

The factories are seeded, so a test file that asks for
``mlp(0, (5, 7, 3))`` gets the same weights wherever it asks.  The dense
references are computed independently of ``flatness._hvp``: the loss is a
plain function of one flat parameter vector evaluated with
``torch.func.functional_call``, differentiated by
``torch.autograd.functional.hessian`` / ``jacobian``.  The architecture zoo
(models of every kind the library supports) is ``zoo.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

DT = torch.float64


def mlp(seed: int = 0, sizes: tuple[int, ...] = (5, 6, 4), act: type[nn.Module] = nn.Tanh, bias: bool = True,
        dtype: torch.dtype = DT) -> nn.Module:
    """Linear layers of ``sizes`` with ``act`` between them, initialised by
    ``torch.manual_seed(seed)`` (in float32, then cast to ``dtype``)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def cnn(seed: int = 0) -> nn.Module:
    """Conv + eval-mode BatchNorm (non-trivial running statistics) + MLP head."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).to(DT)
    bn = model[1]
    bn.running_mean.copy_(torch.tensor([0.3, -0.2]))
    bn.running_var.copy_(torch.tensor([1.7, 0.6]))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.2, 0.8]))
        bn.bias.copy_(torch.tensor([0.1, -0.3]))
    return model.eval()


def classification_batches(sizes: tuple[int, ...], shape: tuple[int, ...], classes: int, seed: int = 1,
                           dtype: torch.dtype = DT):
    """Batches of ``sizes`` samples: standard normal inputs of ``shape``,
    uniform labels, all drawn from one generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g))
        for n in sizes
    ]


def classification_batch(n: int, shape: tuple[int, ...], classes: int, seed: int = 1, dtype: torch.dtype = DT):
    """One batch of :func:`classification_batches`."""
    return classification_batches((n,), shape, classes, seed, dtype)[0]


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _unflatten(model: nn.Module, w: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = w[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def outputs_at(model: nn.Module, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return functional_call(model, _unflatten(model, w), (x,))


def mean_loss(model: nn.Module, w: torch.Tensor, batches, loss_fn=F.cross_entropy) -> torch.Tensor:
    """Loss of the concatenated data (= size-weighted mean of batch means)."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return loss_fn(outputs_at(model, w, x), y)


def dense_hessian(model: nn.Module, batches, loss_fn=F.cross_entropy) -> torch.Tensor:
    """Hessian of the loss of the concatenated batches (the size-weighted
    mean of the batch losses) in the trainable parameters, in eval mode.
    Tied parameters appear once; frozen ones are held fixed."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(w: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for name, shape in zip(names, shapes):
            parts[name] = w[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return loss_fn(functional_call(model, parts, (x,)), y)

    was = model.training
    model.eval()
    try:
        flat = torch.cat([p.detach().reshape(-1) for _, p in named])
        return torch.autograd.functional.hessian(loss, flat, vectorize=True)
    finally:
        model.train(was)


def dense_ggn(model: nn.Module, batch, loss_fn=F.cross_entropy, train: bool = False) -> torch.Tensor:
    """``J^T H_z J`` for one batch, all dense (the model's mode is set)."""
    x, y = batch
    w = flat_params(model)
    model.train(train)
    z = outputs_at(model, w, x)
    J = torch.autograd.functional.jacobian(lambda v: outputs_at(model, v, x), w).reshape(z.numel(), -1)
    Hz = torch.autograd.functional.hessian(lambda zz: loss_fn(zz.reshape(z.shape), y), z.reshape(-1))
    return J.T @ Hz @ J


def snapshot(model: nn.Module):
    """Everything the restore guarantee covers."""
    return {
        "params": [(p, p.detach().clone(), p.data_ptr(), p.requires_grad, p.grad) for p in model.parameters()],
        "buffers": [(b, b.detach().clone(), b.data_ptr()) for b in model.buffers()],
        "modes": [(m, m.training) for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, snap) -> None:
    params = list(model.parameters())
    assert len(params) == len(snap["params"])
    for p, (p0, value, ptr, req, grad) in zip(params, snap["params"]):
        assert p is p0 and p.data_ptr() == ptr and p.requires_grad == req and p.grad is grad
        assert torch.equal(p.detach(), value)
    for b, (b0, value, ptr) in zip(model.buffers(), snap["buffers"]):
        assert b is b0 and b.data_ptr() == ptr and torch.equal(b, value)
    for m, mode in snap["modes"]:
        assert m.training == mode
