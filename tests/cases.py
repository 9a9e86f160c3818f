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


#: Curvature cases, served by the ``curvature_case`` fixture (conftest.py):
#: name -> (model factory, input shape, number of classes).
CURVATURE_CASES = {
    "mlp": (lambda: mlp(sizes=(5, 8, 4)), (5,), 4),
    "cnn": (cnn, (1, 6, 6), 3),
}


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


def recomputed_bn_loss(model: nn.Module, directions, a: float, b: float, bn_inputs, batches) -> float:
    """Reference for a loss-landscape point with recomputed BatchNorm
    statistics: a copy of ``model`` moved to ``w + a d1 + b d2``, its
    BatchNorm statistics reset and recomputed as the equal-weight mean over
    one training-mode pass per input of ``bn_inputs``, then the
    size-weighted mean cross-entropy over ``batches`` in eval mode."""
    import copy

    m = copy.deepcopy(model)
    params = list(m.parameters())
    with torch.no_grad():
        for k, p in enumerate(params):
            p.add_(a * directions[0][k] + b * directions[1][k])
        m.train()
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.reset_running_stats()
                mod.momentum = None  # cumulative: the equal-weight mean over passes
        for x in bn_inputs:
            m(x)
        m.eval()
        total = sum(F.cross_entropy(m(x), y).item() * len(y) for x, y in batches)
    return total / sum(len(y) for _, y in batches)


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


# ----------------------------------------------------------------------
# SAM (test_sam_*.py): model, data, closure, gradients by plain autograd
# and the update rules written out
# ----------------------------------------------------------------------


def sam_mlp(seed=0, dtype=DT, width=8):
    """The SAM tests' MLP: 5 -> width -> 3, tanh."""
    return mlp(seed, (5, width, 3), dtype=dtype)


def sam_data(seed=1, n=24, dtype=DT):
    """The SAM tests' batch: 24 samples of 5 features, 3 classes."""
    return classification_batch(n, (5,), 3, seed, dtype)


def closure_for(model, opt, x, y, zero_grad=False):
    """A SAM closure: the cross-entropy of ``model(x)`` and its backward
    pass, after ``opt.zero_grad()`` when ``zero_grad``."""

    def closure():
        if zero_grad:
            opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def ref_grad(model, values, x, y):
    names = [n for n, _ in model.named_parameters()]
    vals = [v.detach().requires_grad_(True) for v in values]
    out = functional_call(model, dict(zip(names, vals)), (x,))
    return list(torch.autograd.grad(F.cross_entropy(out, y), vals))


def ref_ascent(w, g, rho, adaptive=False, eta=0.0):
    if not adaptive:
        norm = torch.cat([t.flatten() for t in g]).norm()
        return [rho * t / norm for t in g]
    T = [wi.abs() + eta for wi in w]
    norm = torch.cat([(ti * gi).flatten() for ti, gi in zip(T, g)]).norm()
    return [rho * ti**2 * gi / norm for ti, gi in zip(T, g)]


def ref_sgd_momentum(lr, mu, wd=0.0):
    bufs = []

    def step(w, g):
        g = [gi + wd * wi for gi, wi in zip(g, w)]
        if not bufs:
            bufs.extend(gi.clone() for gi in g)
        else:
            for b, gi in zip(bufs, g):
                b.mul_(mu).add_(gi)
        return [wi - lr * b for wi, b in zip(w, bufs)]

    return step


def ref_adamw(lr, b1, b2, eps, wd):
    m, v, t = [], [], [0]

    def step(w, g):
        t[0] += 1
        if not m:
            m.extend(torch.zeros_like(gi) for gi in g)
            v.extend(torch.zeros_like(gi) for gi in g)
        out = []
        for i, (wi, gi) in enumerate(zip(w, g)):
            wi = wi * (1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            mhat = m[i] / (1 - b1 ** t[0])
            vhat = v[i] / (1 - b2 ** t[0])
            out.append(wi - lr * mhat / (vhat.sqrt() + eps))
        return out

    return step


#: base optimizer name -> (class, kwargs, reference step factory)
BASES = {
    "sgd_momentum": (
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.9, weight_decay=1e-3),
        lambda: ref_sgd_momentum(0.1, 0.9, 1e-3),
    ),
    "adamw": (
        torch.optim.AdamW,
        dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
        lambda: ref_adamw(1e-2, 0.9, 0.99, 1e-8, 0.1),
    ),
}


class Boom(RuntimeError):
    """An exception injected into a pass."""


def counting_loss(calls: list):
    """Mean cross-entropy that appends to ``calls`` each time it runs: a
    test that bad input is refused before any work asserts ``calls == []``."""

    def loss(outputs, targets):
        calls.append(1)
        return F.cross_entropy(outputs, targets)

    return loss


def peak_allocated(fn) -> int:
    """Peak bytes of live CPU tensors while ``fn`` runs, from the profiler's
    allocation records (deterministic, unlike the process RSS)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


class LinearLayouts(nn.Module):
    """One Linear layer over the T positions of batch-first inputs
    ``(B, T, D)``, applied in one of three layouts: ``"batch-first"``,
    ``"sequence-first"`` (``(T, B, D)``, as after ``nn.LSTM`` or
    ``nn.MultiheadAttention`` without ``batch_first``) or positions
    flattened into rows ``(B * T, D)`` (any other value).  The samples are
    the B sequences whatever the layout."""

    def __init__(self, layout: str, bias: bool = True) -> None:
        super().__init__()
        self.layout = layout
        self.lin = nn.Linear(4, 3, bias=bias)

    def forward(self, x):
        b, t, d = x.shape
        if self.layout == "batch-first":
            h = self.lin(x)
        elif self.layout == "sequence-first":
            h = self.lin(x.transpose(0, 1)).transpose(0, 1)
        else:
            h = self.lin(x.reshape(b * t, d)).reshape(b, t, -1)
        return torch.tanh(h).sum(1)
