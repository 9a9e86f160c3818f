"""Minimum sharpness (Ibayashi, Hamaguchi and Imaizumi 2021).

A network made of Linear / Conv layers joined by positively homogeneous
activations (ReLU, leaky ReLU, max or average pooling, flattening) computes
the same function after a *rescaling*: multiply the output unit ``k`` of
hidden layer ``l`` (its incoming weights and its bias) by ``c_lk > 0`` and
divide the weights leaving it by ``c_lk``.  The loss is unchanged, but the
Hessian trace is not: a parameter multiplied by ``c`` has its diagonal
Hessian entry divided by ``c**2``.  Minimum sharpness is the trace
minimized over these rescalings,

    MS(w) = min_c Tr H(T_c w)
          = min_g sum_l sum_{k,j} D_l[k, j] exp(2 (g_{l-1,j} - g_{l,k}))
                  + sum_l sum_k E_l[k] exp(-2 g_{l,k}),

with ``g = log c`` (``g = 0`` for the input and the output units),
``D_l[k, j]`` the sum of the Hessian diagonal over the weights from unit
``j`` of layer ``l-1`` to unit ``k`` of layer ``l`` and ``E_l[k]`` the bias
entry.  Every term is the exponential of a linear function of ``g`` with a
non-negative coefficient (at a minimum), so the problem is convex; it is
solved with SciPy's L-BFGS on the log of the sum.

``granularity="layer"`` is the paper's per-layer version: one ``g_l`` per
hidden layer (layer ``l``'s weights scale by ``a_l = c_l / c_{l-1}``, with
``prod_l a_l = 1``).  Without biases its minimum has the closed form
``L (prod_l T_l)**(1/L)`` (AM-GM), ``T_l`` the trace of layer ``l``'s
weight block.  ``granularity="neuron"`` minimizes over one scale per hidden
unit: a larger set of function-preserving rescalings, so a value that is at
most the per-layer one and invariant to rescaling single neurons.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.optimize
import torch
from torch import Tensor, nn

from flatness._hvp import CurvatureOperator, ResultMixin, _outputs
from flatness._lanczos import exact_diagonal, rademacher
from flatness._model import LossFn, ModelGuard, check_int, iter_batches, private_rng, unwrap

__all__ = ["MinimumSharpnessResult", "minimize_rescaled_trace", "minimum_sharpness"]

GRANULARITIES = ("layer", "neuron")
METHODS = ("hutchinson", "exact")
_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class MinimumSharpnessResult(ResultMixin):
    """Outcome of :func:`minimum_sharpness`.

    Attributes
    ----------
    value : float
        Minimum sharpness: the smallest Hessian trace over the rescalings.
    trace : float
        Hessian trace of the weights as given.
    trace_std_error : float
        Standard error of ``trace`` (0 for ``method="exact"``).
    layer_traces : list of float
        Trace of each layer's weight block ``T_l``.
    bias_traces : list of float or None
        Trace of each layer's bias (``None`` without bias).
    log_scales : list of list of float
        Optimal ``g = log c`` of each hidden layer's units (one number per
        layer for ``granularity="layer"``).
    granularity, method : str
    n_hvp : int
    settings : dict
    wall_time : float
    """

    value: float
    trace: float
    trace_std_error: float
    layer_traces: list[float]
    bias_traces: list[float | None]
    log_scales: list[list[float]]
    granularity: str
    method: str
    n_hvp: int
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0

    def __float__(self) -> float:
        return float(self.value)


# --------------------------------------------------------------------------
# the convex problem
# --------------------------------------------------------------------------


def minimize_rescaled_trace(
    weight_blocks: list[Tensor],
    bias_blocks: list[Tensor | None],
    *,
    granularity: str = "neuron",
) -> tuple[float, list[Tensor]]:
    """Minimize the Hessian trace over rescalings, given the diagonal sums.

    Parameters
    ----------
    weight_blocks : list of Tensor
        ``D_l`` of shape ``(units_l, units_{l-1})``; for the first layer the
        second dimension indexes input coordinates (any number; they are not
        rescaled).
    bias_blocks : list of Tensor or None
        ``E_l`` of shape ``(units_l,)``.
    granularity : {"neuron", "layer"}

    Returns
    -------
    value : float
        The trace of the optimally rescaled network, ``sum c_i exp(a_i . g*)``
        with the coefficients as given.  Negative coefficients (not a minimum,
        or noisy estimates) would make the problem unbounded below, so ``g*``
        minimizes the sum with them set to 0; the value still counts them, so
        it is an unbiased estimate of the trace at ``g*`` when the blocks
        are (Hutchinson's estimates are noisiest for small neuron blocks).
    log_scales : list of Tensor
        Optimal ``g_l`` for each hidden layer (``units_l`` entries, or one).
    """
    L = len(weight_blocks)
    D = [torch.as_tensor(d, dtype=torch.float64) for d in weight_blocks]
    E = [None if e is None else torch.as_tensor(e, dtype=torch.float64) for e in bias_blocks]
    if granularity == "layer" or L == 1:
        D = [d.sum().reshape(1, 1) for d in D]
        E = [None if e is None else e.sum().reshape(1) for e in E]
    coef = torch.cat([d.reshape(-1) for d in D] + [e for e in E if e is not None])
    if L == 1:
        return float(coef.sum()), []
    sizes = [D[l].shape[0] for l in range(L - 1)]

    def exponents(x: Tensor) -> Tensor:
        # Exponent of each coefficient: 2 (g_{l-1,j} - g_{l,k}) for weights,
        # -2 g_{l,k} for biases; input and output units have g = 0.
        g = list(torch.split(x, sizes)) + [torch.zeros(D[-1].shape[0], dtype=torch.float64)]
        parts = []
        for l in range(L):
            inp = g[l - 1] if l > 0 else torch.zeros(D[0].shape[1], dtype=torch.float64)
            parts.append((2 * (inp[None, :] - g[l][:, None])).reshape(-1))
        parts += [-2 * g[l] for l in range(L) if E[l] is not None]
        return torch.cat(parts)

    log_coef = torch.log(coef.clamp_min(0))
    if granularity == "layer" and all(e is None for e in E) and bool((coef > 0).all()):
        # AM-GM: sum_l T_l / a_l**2 with prod a_l = 1 is smallest when all
        # terms are equal, L * (prod T_l)**(1/L): a_l**2 = T_l / geometric
        # mean, and g_l = sum_{i<=l} log a_i.
        log_a = 0.5 * (log_coef - log_coef.mean())
        x = torch.cumsum(log_a, 0)[:-1]
    else:
        if granularity == "neuron":  # warm start at the per-layer optimum
            _, g_layer = minimize_rescaled_trace(weight_blocks, bias_blocks, granularity="layer")
            x0 = torch.cat([g.expand(n) for g, n in zip(g_layer, sizes)]).numpy()
        else:
            x0 = np.zeros(sum(sizes))

        def objective(x_np: np.ndarray) -> tuple[float, np.ndarray]:
            x = torch.as_tensor(x_np, dtype=torch.float64).requires_grad_(True)
            # log of the sum: the same minimizer, better conditioned, convex.
            f = torch.logsumexp(log_coef + exponents(x), 0)
            (gx,) = torch.autograd.grad(f, x)
            return float(f.detach()), gx.numpy()

        if not np.isfinite(objective(x0)[0]):  # every coefficient <= 0
            return float(coef.sum()), [torch.zeros(n, dtype=torch.float64) for n in sizes]
        opt = scipy.optimize.minimize(
            objective, x0, jac=True, method="L-BFGS-B",
            options={"maxiter": 10000, "ftol": 1e-15, "gtol": 1e-12},
        )
        x = torch.as_tensor(opt.x, dtype=torch.float64)
    value = float((coef * torch.exp(exponents(x))).sum())
    return value, list(torch.split(x, sizes))


# --------------------------------------------------------------------------
# the network structure
# --------------------------------------------------------------------------


def _chain(model: nn.Module, layers: Iterable[nn.Module] | None) -> list[nn.Module]:
    module = unwrap(model)
    if layers is None:
        chain = [m for m in module.modules() if isinstance(m, _LAYER_TYPES)]
    else:
        chain = list(layers)
        owned = {id(m) for m in module.modules()}
        for m in chain:
            if not isinstance(m, _LAYER_TYPES):
                raise TypeError(f"layers must be Linear or Conv modules, got {type(m).__name__}")
            if id(m) not in owned:
                raise ValueError("layers= contains a module that is not part of model")
    if not chain:
        raise ValueError("minimum sharpness needs a model with Linear or Conv layers")
    for i, m in enumerate(chain):
        if getattr(m, "groups", 1) != 1:
            raise ValueError(f"layer {i} is a grouped convolution (groups={m.groups}); not supported")
        if i > 0:
            units, fan_in = chain[i - 1].weight.shape[0], m.weight.shape[1]
            if fan_in % units != 0 or (fan_in != units and not isinstance(m, nn.Linear)):
                raise ValueError(
                    f"layer {i} takes {fan_in} inputs, which do not map onto the {units} units of "
                    "layer {i - 1}; layers= must list the Linear/Conv layers in forward order"
                )
    return chain


def _unit_of_input(chain: list[nn.Module], i: int) -> int:
    """How many input coordinates of layer ``i`` belong to one unit of layer
    ``i - 1`` (> 1 when a conv feature map is flattened into a Linear)."""
    return chain[i].weight.shape[1] // chain[i - 1].weight.shape[0]


def _rescaled(chain: list[nn.Module], g: list[Tensor]) -> dict[int, Tensor]:
    """Parameters of the chain after the rescaling with log-scales ``g``
    (one tensor per hidden layer, broadcastable to its units)."""
    out: dict[int, Tensor] = {}
    L = len(chain)
    for i, m in enumerate(chain):
        w = m.weight.detach()
        units = w.shape[0]
        c_out = torch.exp(g[i]).expand(units) if i < L - 1 else torch.ones(units, dtype=w.dtype, device=w.device)
        if i > 0:
            c_in = torch.exp(g[i - 1]).expand(chain[i - 1].weight.shape[0])
            c_in = c_in.repeat_interleave(_unit_of_input(chain, i))
        else:
            c_in = torch.ones(w.shape[1], dtype=w.dtype, device=w.device)
        view = (-1,) + (1,) * (w.dim() - 1)
        factor = c_out.reshape(view) / c_in.reshape((1, -1) + (1,) * (w.dim() - 2))
        out[id(m.weight)] = w * factor.to(w.dtype)
        if m.bias is not None:
            out[id(m.bias)] = m.bias.detach() * c_out.to(w.dtype)
    return out


def _check_invariance(model: nn.Module, op: CurvatureOperator, chain: list[nn.Module],
                      granularity: str, gen: torch.Generator) -> None:
    """Raise unless the network's outputs are unchanged by a random rescaling
    of the requested granularity: the definition assumes they are."""
    ps = op.params
    L = len(chain)
    if L == 1:
        return
    g = []
    for m in chain[:-1]:
        size = m.weight.shape[0] if granularity == "neuron" else 1
        u = torch.rand(size, generator=gen, device=ps.device, dtype=torch.float64) * 2 - 1
        g.append(u.to(ps.dtype))
    scaled = _rescaled(chain, g)
    values = [scaled.get(id(p), p.detach()) for p in ps.params]
    with ModelGuard(model, train=op.train), torch.no_grad():
        inputs, _ = next(iter(iter_batches(op.data, device=ps.device, dtype=ps.dtype, n_batches=1)))
        z0 = _outputs(model, ps, ps.detached(), inputs, {})
        z1 = _outputs(model, ps, values, inputs, {})
    err = float((z1 - z0).abs().max())
    scale = float(z0.abs().max()) + 1e-30
    tol = 100 * math.sqrt(torch.finfo(ps.dtype).eps)
    if not err <= tol * scale:
        raise ValueError(
            f"the model's outputs change under a {granularity}-wise rescaling of its Linear/Conv "
            f"layers (relative change {err / scale:.2e}); minimum sharpness needs a chain of "
            "Linear/Conv layers joined by positively homogeneous activations (ReLU, max/avg "
            "pooling, flatten) in forward order, without normalization layers between them"
        )


# --------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------


def minimum_sharpness(
    model: nn.Module,
    data: Any,
    *,
    granularity: str = "layer",
    method: str = "hutchinson",
    n_samples: int = 100,
    layers: Iterable[nn.Module] | None = None,
    loss_fn: LossFn | None = None,
    params: Iterable[Any] | None = None,
    seed: int | None = 0,
    n_batches: int | None = None,
    progress: bool = False,
    train: bool = False,
    batch: int = 8,
    chunk_size: int | None = None,
) -> MinimumSharpnessResult:
    """Minimum sharpness: the Hessian trace minimized over the rescalings
    that leave a ReLU network's function unchanged (Ibayashi et al. 2021).

    Parameters
    ----------
    model : nn.Module
        Linear / Conv layers (``groups=1``) joined by positively homogeneous
        activations, listed in forward order by ``model.modules()`` (or pass
        ``layers``).  The invariance is checked on the first batch: a random
        rescaling must leave the outputs unchanged, else ``ValueError``.
    data : batch or re-iterable of batches
    granularity : {"layer", "neuron"}
        ``"layer"`` (default): one scale per layer, the paper's definition.
        ``"neuron"``: one scale per hidden unit (channel), a stricter
        minimum that is also invariant to rescaling single neurons.
    method : {"hutchinson", "exact"}
        How the Hessian diagonal is obtained: Hutchinson's estimate
        ``mean(z * Hz)`` over ``n_samples`` Rademacher vectors, or exactly
        from ``n`` products with the unit vectors (small models).  Negative
        diagonal sums (noise, or a point that is not a minimum) count as 0
        when the scales are chosen, and with their sign in the value (the
        trace of the rescaled network), which keeps the Hutchinson estimate
        free of the upward bias that clipping would add.
    n_samples : int
        Products for Hutchinson.
    layers : iterable of nn.Module, optional
        The Linear/Conv layers of the chain in forward order.
    params : None
        Minimum sharpness is defined over all weights and biases of the
        chain; only ``None`` is accepted (select layers with ``layers``).
    loss_fn, seed, n_batches, progress, train, batch, chunk_size
        As in :func:`flatness.hessian.trace`.

    Returns
    -------
    MinimumSharpnessResult
    """
    start = time.perf_counter()
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    check_int("n_samples", n_samples, 2)
    check_int("batch", batch, 1)
    if params is not None:
        raise ValueError(
            "minimum sharpness is defined over all weights and biases of the ReLU chain; "
            "pass params=None and choose the layers with layers="
        )
    chain = _chain(model, layers)
    chain_params = [t for m in chain for t in (m.weight, m.bias) if t is not None]
    op = CurvatureOperator(
        model, data, loss_fn=loss_fn, params=chain_params, n_batches=n_batches, train=train,
        chunk_size=chunk_size, seed=0 if seed is None else seed,
    )
    n = op.shape[0]
    bar = None
    if progress:
        from flatness.hessian import _bar

        bar = op.progress = _bar(True, n if method == "exact" else n_samples, "minimum sharpness")
    try:
        with private_rng(seed, op.device) as gen:
            _check_invariance(model, op, chain, granularity, gen)
            diag, samples = _diagonal(op, method, n_samples, batch, gen)
    finally:
        if bar is not None:
            bar.close()
    parts = op.unflatten(diag)
    by_id = {id(p): part for p, part in zip(op.params.params, parts)}
    weight_blocks, bias_blocks = [], []
    for i, m in enumerate(chain):
        d = by_id[id(m.weight)].reshape(m.weight.shape[0], m.weight.shape[1], -1).sum(-1)
        if i > 0:
            r = _unit_of_input(chain, i)
            d = d.reshape(d.shape[0], -1, r).sum(-1)
        weight_blocks.append(d.cpu())
        bias_blocks.append(None if m.bias is None else by_id[id(m.bias)].cpu())
    blocks = weight_blocks + [b for b in bias_blocks if b is not None]
    if granularity == "layer":
        blocks = [b.sum() for b in blocks]
    clipped = sum(float(b.clamp_max(0).sum()) for b in blocks)
    if method == "exact" and clipped < 0:
        warnings.warn(
            f"the Hessian diagonal has negative entries (sum {clipped:.3g}): the point is not a "
            "minimum and the rescaled trace is unbounded below; the scales are chosen with negative "
            "sums set to 0",
            RuntimeWarning, stacklevel=2,
        )
    value, g = minimize_rescaled_trace(weight_blocks, bias_blocks, granularity=granularity)
    total = float(diag.sum())
    std_error = 0.0 if samples is None else float(samples.std(unbiased=True) / math.sqrt(len(samples)))
    return MinimumSharpnessResult(
        value=value,
        trace=total,
        trace_std_error=std_error,
        layer_traces=[float(b.sum()) for b in weight_blocks],
        bias_traces=[None if b is None else float(b.sum()) for b in bias_blocks],
        log_scales=[t.tolist() for t in g],
        granularity=granularity,
        method=method,
        n_hvp=op.n_hvp,
        settings={
            "granularity": granularity, "method": method,
            "n_samples": n_samples if method == "hutchinson" else None,
            "layers": [type(m).__name__ for m in chain], "n_params": n,
            "n_batches": n_batches, "train": bool(train), "seed": seed,
            "loss_fn": getattr(op.loss_fn, "__name__", type(op.loss_fn).__name__),
        },
        wall_time=time.perf_counter() - start,
    )


def _diagonal(op: CurvatureOperator, method: str, n_samples: int, batch: int,
              gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """The Hessian diagonal (float64, flat), exactly or by Hutchinson's
    ``mean(z * Hz)``; with Hutchinson also the per-sample traces ``z^T H z``."""
    n = op.shape[0]
    if method == "exact":
        return exact_diagonal(op.matmat, n, batch=batch, device=op.device), None
    acc = torch.zeros(n, dtype=torch.float64, device=op.device)
    traces = []
    for i in range(0, n_samples, batch):
        Z = rademacher(n, min(batch, n_samples - i), generator=gen, device=op.device)
        P = Z * op.matmat(Z)
        acc += P.sum(1)
        traces.append(P.sum(0))
    return acc / n_samples, torch.cat(traces).cpu()
