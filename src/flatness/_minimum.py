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

The per-layer traces are exact by default (``method="gn"``), as in the
paper.  Within one layer the network is linear in that layer's weights and
bias (the activation pattern is fixed almost everywhere), so the second
derivative of the outputs along a single parameter vanishes and every
*diagonal* entry of the Hessian equals that of the generalized Gauss-Newton
matrix ``J^T H_z J``.  With ``H_z = U diag(lambda) U^T`` the Hessian of sample
``i``'s loss in its outputs,

    diag H = (1/N) sum_i sum_r lambda_{i,r} (J_i^T u_{i,r})**2,

which takes one backward pass per factor column ``r`` and sample: about
``K`` per-sample gradient passes for ``K`` outputs.  For mean cross-entropy
the factor is closed-form, ``u_k = sqrt(p_k) (e_k - p)`` (so that
``sum_k u_k u_k^T = diag(p) - p p^T``); for any other loss it comes from
``torch.func.hessian`` of the loss of one sample and ``eigh``.
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
from torch.func import hessian as func_hessian
from torch.func import vjp, vmap

from flatness._checks import check_int, maybe_progress, require_finite
from flatness._data import batch_size, iter_batches, split_batch
from flatness._distributed import sum_
from flatness._functional import LossFn, _as_args, _as_kwargs, default_loss
from flatness._guard import ModelGuard, disable_running_stats
from flatness._hvp import CurvatureOperator, _outputs, double_backward_hvp, product_bar
from flatness._lanczos import exact_diagonal, rademacher
from flatness._params import unwrap
from flatness._per_sample import _add_batch_dim
from flatness._results import ResultMixin
from flatness._rng import private_rng

__all__ = ["MinimumSharpnessResult", "minimize_rescaled_trace", "minimum_sharpness"]

GRANULARITIES = ("layer", "neuron")
METHODS = ("gn", "exact", "hutchinson")
#: Largest log-scale the solver may choose (e**100: far past any optimum).
_MAX_LOG_SCALE = 100.0
#: Bytes of per-sample gradients held at once by ``method="gn"``.
_GN_CHUNK_BYTES = 1 << 26
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
        Standard error of ``trace`` (0 for the exact methods).
    layer_traces : list of float
        Trace of each layer's weight block ``T_l``.
    bias_traces : list of float or None
        Trace of each layer's bias (``None`` without bias).
    layer_std_errors : list of float
        Standard error of each ``T_l`` (0 for the exact methods).
    bias_std_errors : list of float or None
        Standard error of each bias trace.
    log_scales : list of list of float
        Optimal ``g = log c`` of each hidden layer's units (one number per
        layer for ``granularity="layer"``).
    granularity, method : str
    n_hvp : int
        Hessian-vector products (``"exact"``, ``"hutchinson"``).
    n_backward : int
        Per-sample backward passes (``"gn"``: about ``K`` per sample).
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
    layer_std_errors: list[float] = field(default_factory=list)
    bias_std_errors: list[float | None] = field(default_factory=list)
    n_backward: int = 0

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
    clip_negative: bool = False,
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
    clip_negative : bool
        Set negative coefficients to 0 in the value too (for estimates, whose
        negative entries are noise), so that the value is never negative.

    Returns
    -------
    value : float
        The trace of the optimally rescaled network, ``sum c_i exp(a_i . g*)``.
        Negative coefficients (not a minimum, or noisy estimates) would make
        the problem unbounded below, so ``g*`` minimizes the sum with them
        set to 0.  The value counts them with their sign (the trace of the
        rescaled network) unless ``clip_negative``.  The log-scales are kept
        within +-100, so the value is always finite.
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
    if clip_negative:
        coef = coef.clamp_min(0)
    if L == 1:
        return float(coef.sum()), []
    sizes = [D[l].shape[0] for l in range(L - 1)]

    # Each coefficient's exponent is 2 (x[inp] - x[out]) with x the log-scales
    # of the hidden units and one extra slot fixed at 0 (input and output
    # units): weights from unit j of layer l-1 to unit k of layer l have
    # inp = j, out = k; a bias has inp = the 0 slot.
    zero = sum(sizes)
    first = [0] + np.cumsum(sizes).tolist()
    inp_idx, out_idx = [], []

    def unit_ids(l: int, count: int) -> np.ndarray:
        return np.full(count, zero) if l < 0 or l == L - 1 else first[l] + np.arange(count)

    for l in range(L):
        k_ids = unit_ids(l, D[l].shape[0])
        j_ids = unit_ids(l - 1, D[l].shape[1])
        inp_idx.append(np.broadcast_to(j_ids[None, :], D[l].shape).reshape(-1))
        out_idx.append(np.broadcast_to(k_ids[:, None], D[l].shape).reshape(-1))
    for l in range(L):
        if E[l] is not None:
            inp_idx.append(np.full(E[l].shape[0], zero))
            out_idx.append(unit_ids(l, E[l].shape[0]))
    inp = np.concatenate(inp_idx)
    out = np.concatenate(out_idx)

    def exponents(x: Tensor) -> Tensor:
        ext = torch.cat([x, torch.zeros(1, dtype=torch.float64)])
        return 2 * (ext[torch.as_tensor(inp)] - ext[torch.as_tensor(out)])

    log_coef = torch.log(coef.clamp_min(0))
    if granularity == "layer" and all(e is None for e in E) and bool((coef > 0).all()):
        # AM-GM: sum_l T_l / a_l**2 with prod a_l = 1 is smallest when all
        # terms are equal, L * (prod T_l)**(1/L): a_l**2 = T_l / geometric
        # mean, and g_l = sum_{i<=l} log a_i.
        log_a = 0.5 * (log_coef - log_coef.mean())
        x = torch.cumsum(log_a, 0)[:-1]
    else:
        if granularity == "neuron":  # warm start at the per-layer optimum
            _, g_layer = minimize_rescaled_trace(weight_blocks, bias_blocks, granularity="layer",
                                                 clip_negative=clip_negative)
            x0 = torch.cat([g.expand(n) for g, n in zip(g_layer, sizes)]).numpy()
        else:
            x0 = np.zeros(sum(sizes))

        lc = log_coef.numpy()

        def objective(x_np: np.ndarray) -> tuple[float, np.ndarray]:
            # log of the sum: the same minimizer, better conditioned, convex.
            ext = np.append(x_np, 0.0)
            e = lc + 2 * (ext[inp] - ext[out])
            top = e.max()
            if not np.isfinite(top):
                return math.inf, np.zeros_like(x_np)
            w = np.exp(e - top)
            total = w.sum()
            w /= total  # softmax: d f / d e
            grad = 2 * (np.bincount(inp, w, zero + 1) - np.bincount(out, w, zero + 1))
            return float(top + math.log(total)), grad[:-1]

        if not np.isfinite(objective(x0)[0]):  # every coefficient <= 0
            return float(coef.sum()), [torch.zeros(n, dtype=torch.float64) for n in sizes]
        # Bounds: with zero coefficients the infimum may lie at infinity.
        opt = scipy.optimize.minimize(
            objective, np.clip(x0, -_MAX_LOG_SCALE, _MAX_LOG_SCALE), jac=True, method="L-BFGS-B",
            bounds=[(-_MAX_LOG_SCALE, _MAX_LOG_SCALE)] * len(x0),
            options={"maxiter": 10000, "ftol": 1e-15, "gtol": 1e-12},
        )
        x = torch.as_tensor(opt.x, dtype=torch.float64)
    # Zero coefficients contribute 0 whatever their exponent (no 0 * inf).
    value = float(torch.where(coef != 0, coef * torch.exp(exponents(x)), 0.0).sum())
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


#: Activation and normalization modules that are not positively homogeneous:
#: named in the error when a rescaling changes the outputs.
_NOT_HOMOGENEOUS = (
    nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
)


def _label(names: dict[int, str], m: nn.Module) -> str:
    return f"{names.get(id(m)) or '<root>'} ({type(m).__name__})"


def _check_structure(model: nn.Module, chain: list[nn.Module], explicit: bool, method: str) -> None:
    """Refuse, before anything runs, models whose structure rules out the
    rescaling symmetry or the chosen method, naming the modules."""
    from torch.nn.utils import parametrize

    from flatness._per_sample import _no_batching_rule

    module = unwrap(model)
    names = {id(m): n for n, m in module.named_modules()}
    for m in chain:
        if parametrize.is_parametrized(m):
            tensors = ", ".join(m.parametrizations.keys())
            raise ValueError(
                f"minimum sharpness cannot use {_label(names, m)}: its {tensors} is computed by a "
                "parametrization (weight_norm, spectral_norm, ...) from other parameters, so "
                "rescaling its units does not act on the parameters; remove the parametrization "
                "first (torch.nn.utils.parametrize.remove_parametrizations)"
            )
    if not explicit:
        # Every trainable parameter must be a weight or bias of the chain:
        # the Hessian trace of the others (recurrent kernels, attention's
        # input projections, normalization, embeddings) has no rescaling
        # symmetry to minimize over.
        in_chain = {id(m) for m in chain}
        outside = []
        for m in module.modules():
            own = [n for n, p in m.named_parameters(recurse=False) if p.requires_grad]
            if own and id(m) not in in_chain:
                outside.append(f"{_label(names, m)}: {', '.join(own)}")
        if outside:
            raise ValueError(
                "minimum sharpness is defined for chains of Linear/Conv layers joined by "
                "positively homogeneous activations (ReLU), whose function is unchanged by "
                "rescaling units; these modules hold trainable parameters outside such a chain "
                "(no rescaling symmetry, or weights tied to a layer): " + "; ".join(outside)
                + ". Pass layers= to measure a chain with the other parameters held fixed"
            )
    if method == "gn":
        blocked = _no_batching_rule(model)
        if blocked:
            raise ValueError(
                "method='gn' differentiates the model sample by sample with torch.func.vmap, "
                f"which has no batching rule for {', '.join(blocked)}; use method='exact' or "
                "method='hutchinson'"
            )


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
                      granularity: str, gen: torch.Generator) -> Any:
    """Raise unless the network's outputs are unchanged by a random rescaling
    of the requested granularity: the definition assumes they are.  Returns
    the outputs on the first batch."""
    ps = op.params
    g = []
    for m in chain[:-1]:
        size = m.weight.shape[0] if granularity == "neuron" else 1
        u = torch.rand(size, generator=gen, device=ps.device, dtype=torch.float64) * 2 - 1
        g.append(u.to(ps.dtype))
    scaled = _rescaled(chain, g)
    values = [scaled.get(id(p), p.detach()) for p in ps.params]
    with ModelGuard(model, train=op.train), torch.no_grad():
        inputs, targets = next(iter(iter_batches(op.data, device=ps.device, dtype=ps.dtype, n_batches=1)))
        z0 = _outputs(model, ps, ps.detached(), inputs, {})
        z1 = _outputs(model, ps, values, inputs, {})
        if isinstance(z0, Tensor):
            t0, t1 = [z0], [z1]
        else:
            # dict / tuple outputs may hold hidden states, which a rescaling
            # changes: the loss is what must not change
            t0, t1 = [op.loss_fn(z0, targets)], [op.loss_fn(z1, targets)]
    err = max(float((b - a).abs().max()) for a, b in zip(t0, t1))
    scale = max(float(a.abs().max()) for a in t0) + 1e-30
    tol = 100 * math.sqrt(torch.finfo(ps.dtype).eps)
    if not err <= tol * scale:
        names = {id(m): n for n, m in unwrap(model).named_modules()}
        suspects = [_label(names, m) for m in unwrap(model).modules() if isinstance(m, _NOT_HOMOGENEOUS)]
        culprit = (
            "; not positively homogeneous: " + ", ".join(suspects) if suspects
            else "; no such module is registered: look for a functional activation or "
                 "normalization (torch.tanh, F.layer_norm, ...) in forward"
        )
        raise ValueError(
            f"the model's outputs change under a {granularity}-wise rescaling of its Linear/Conv "
            f"layers (relative change {err / scale:.2e}); minimum sharpness needs a chain of "
            "Linear/Conv layers joined by positively homogeneous activations (ReLU, max/avg "
            "pooling, flatten) in forward order, without normalization layers between them"
            + culprit
        )
    return z0


# --------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------


def minimum_sharpness(
    model: nn.Module,
    data: Any,
    *,
    granularity: str = "layer",
    method: str = "gn",
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
        ``layers``).  Refused up front, naming the module: parametrized
        layers (``weight_norm``, ``spectral_norm``) and, without ``layers``,
        trainable parameters outside the chain (recurrent layers,
        attention's input projections, normalization, embeddings, tied
        weights).  The invariance is checked on the first batch: a random
        rescaling must leave the outputs (the loss, for dict or tuple
        outputs) unchanged, else ``ValueError`` naming the activation and
        normalization modules that are not positively homogeneous.
    data : batch or re-iterable of batches
        Over several batches the Hessian is the size-weighted average.
    granularity : {"layer", "neuron"}
        ``"layer"`` (default): one scale per layer, the paper's definition.
        ``"neuron"``: one scale per hidden unit (channel), a stricter
        minimum that is also invariant to rescaling single neurons.
    method : {"gn", "exact", "hutchinson"}
        How the Hessian diagonal is obtained.

        * ``"gn"`` (default): exactly, as in the paper, from the Gauss-Newton
          diagonal, which equals the Hessian diagonal of a piecewise-linear
          network (it is linear in each layer's parameters).  Cost: one
          forward and about ``K`` backward passes per sample (``K`` outputs),
          batched with ``torch.func.vmap``; memory: ``chunk_size`` samples'
          ``K`` gradients at once.  Works for any loss that is a mean (or a
          sum) of per-sample losses: for mean cross-entropy the factor of
          the softmax Hessian is closed-form, for any other loss it comes
          from the loss's Hessian in the outputs (``eigh``; signed, so exact
          also for losses that are not convex in the outputs).
        * ``"exact"``: from ``n`` Hessian-vector products with the unit
          vectors (``n`` parameters; small models only).
        * ``"hutchinson"``: Hutchinson's estimate ``mean(z * Hz)`` over
          ``n_samples`` Rademacher vectors per parameter tensor (each probe
          is zero outside one weight or bias: ``n_samples`` times the number
          of tensors products), for models without the exact structure.
          Each tensor's trace is then estimated from its own diagonal block
          only: not negative where the block is positive semi-definite, and
          for a fixed ``seed`` the per-layer value is invariant to layer
          rescalings; per neuron it is not (the noise is not).  Negative
          block estimates count as 0, so the value is never negative (and
          biased upwards where that happens); a layer whose estimated trace
          is not positive raises ``ValueError``, and a trace within two
          standard errors of 0 warns.  The standard errors are in the
          result.
    n_samples : int
        Products for Hutchinson.
    layers : iterable of nn.Module, optional
        The Linear/Conv layers of the chain in forward order; the Hessian is
        then that of their parameters, the others held fixed.
    params : None
        Minimum sharpness is defined over all weights and biases of the
        chain; only ``None`` is accepted (select layers with ``layers``).
    loss_fn, seed, n_batches, progress, train, batch
        As in :func:`flatness.hessian.trace`.
    chunk_size : int, optional
        ``"gn"``: samples differentiated at once (default: as many as fit
        in 64 MiB of gradients).  Otherwise: vectors per ``vmap`` call.

    Returns
    -------
    MinimumSharpnessResult

    Raises
    ------
    ValueError
        Bad options, a model without the rescaling symmetry, a ``"gn"`` call
        on a model with normalization layers that use batch statistics,
        recurrent layers (no ``vmap`` batching rule), outputs that are not
        one tensor, buffers written in ``forward``, or a loss that is not a
        mean or sum over samples, or a Hutchinson layer trace that is not
        positive.
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
    _check_structure(model, chain, layers is not None, method)
    chain_params = [t for m in chain for t in (m.weight, m.bias) if t is not None]
    # the Hessian diagonal's products count on the bar; the GN diagonal counts samples
    hvps = product_bar(bool(progress) and method != "gn", "minimum sharpness")
    op = CurvatureOperator(
        model, data, loss_fn=loss_fn, params=chain_params, n_batches=n_batches, train=train,
        chunk_size=None if method == "gn" else chunk_size, seed=0 if seed is None else seed,
        progress=hvps,
    )
    if method == "gn":
        _check_gn_structure(model, train)
    n = op.shape[0]
    bar = None
    if progress:
        if method == "gn":  # counts samples
            bar = maybe_progress(None, True, _n_samples(data, n_batches), "minimum sharpness", unit="sample")
        else:
            bar = hvps
            bar.total = n if method == "exact" else n_samples * len(chain_params)
    n_backward = 0
    try:
        with private_rng(seed, op.device) as gen:
            z0 = _check_invariance(model, op, chain, granularity, gen)
            if method == "gn":
                _check_gn_outputs(op, z0)
            if method == "gn":
                diag, n_backward = _gn_diagonal(op, chunk_size, bar)
                samples = None
            else:
                diag, samples = _diagonal(op, method, n_samples, batch, gen)
    finally:
        if bar is not None:
            bar.close()
    require_finite(diag.sum(), "the Hessian diagonal")
    weight_blocks, bias_blocks = _blocks(op, chain, diag)
    # Standard errors of each tensor's trace (one row of samples per probe).
    n_tensors = len(op.params.params)
    if samples is None:
        se = [0.0] * n_tensors
    else:
        se = (samples.std(0, unbiased=True) / math.sqrt(samples.shape[0])).tolist()
    se_of = {id(p): e for p, e in zip(op.params.params, se)}
    layer_se = [se_of[id(m.weight)] for m in chain]
    bias_se = [None if m.bias is None else se_of[id(m.bias)] for m in chain]
    layer_traces = [float(b.sum()) for b in weight_blocks]
    bias_traces = [None if b is None else float(b.sum()) for b in bias_blocks]
    if method == "hutchinson":
        _check_estimates(layer_traces, layer_se, bias_traces, bias_se, n_samples)
    else:
        blocks = weight_blocks + [b for b in bias_blocks if b is not None]
        if granularity == "layer":
            blocks = [b.sum() for b in blocks]
        clipped = sum(float(b.clamp_max(0).sum()) for b in blocks)
        if clipped < 0:
            warnings.warn(
                f"the Hessian diagonal has negative entries (sum {clipped:.3g}): the point is not a "
                "minimum and the rescaled trace is unbounded below; the scales are chosen with "
                "negative sums set to 0",
                RuntimeWarning, stacklevel=2,
            )
    value, g = minimize_rescaled_trace(weight_blocks, bias_blocks, granularity=granularity,
                                       clip_negative=method == "hutchinson")
    total = float(diag.sum())
    std_error = 0.0 if samples is None else float(
        samples.sum(1).std(unbiased=True) / math.sqrt(samples.shape[0]))
    return MinimumSharpnessResult(
        value=value,
        trace=total,
        trace_std_error=std_error,
        layer_traces=layer_traces,
        bias_traces=bias_traces,
        layer_std_errors=layer_se,
        bias_std_errors=bias_se,
        log_scales=[t.tolist() for t in g],
        granularity=granularity,
        method=method,
        n_hvp=op.n_hvp,
        n_backward=n_backward,
        settings={
            "granularity": granularity, "method": method,
            "n_samples": n_samples if method == "hutchinson" else None,
            "layers": [type(m).__name__ for m in chain], "n_params": n,
            "n_batches": n_batches, "train": bool(train), "seed": seed,
            "loss_fn": getattr(op.loss_fn, "__name__", type(op.loss_fn).__name__),
            "n_backward": n_backward,
        },
        wall_time=time.perf_counter() - start,
    )


def _n_samples(data: Any, n_batches: int | None) -> int | None:
    """Samples in ``data`` when that is known without iterating (a batch, a
    list of batches, a ``DataLoader`` over a sized dataset), else ``None``."""
    from flatness._data import _is_batch

    if _is_batch(data):
        return batch_size(data[1])
    if isinstance(data, (list, tuple)):
        return sum(batch_size(b[1]) for b in data[:n_batches] if _is_batch(b)) or None
    if n_batches is None and isinstance(data, torch.utils.data.DataLoader) and not data.drop_last:
        try:
            return len(data.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
    return None


def _blocks(op: CurvatureOperator, chain: list[nn.Module],
            diag: Tensor) -> tuple[list[Tensor], list[Tensor | None]]:
    """``D_l`` (units x previous units; kernels and flattened maps summed)
    and ``E_l`` from the flat Hessian diagonal."""
    parts = op.unflatten(diag)
    by_id = {id(p): part for p, part in zip(op.params.params, parts)}
    weight_blocks: list[Tensor] = []
    bias_blocks: list[Tensor | None] = []
    for i, m in enumerate(chain):
        d = by_id[id(m.weight)].reshape(m.weight.shape[0], m.weight.shape[1], -1).sum(-1)
        if i > 0:
            r = _unit_of_input(chain, i)
            d = d.reshape(d.shape[0], -1, r).sum(-1)
        weight_blocks.append(d.cpu())
        bias_blocks.append(None if m.bias is None else by_id[id(m.bias)].cpu())
    return weight_blocks, bias_blocks


def _check_estimates(layer_traces: list[float], layer_se: list[float],
                     bias_traces: list[float | None], bias_se: list[float | None],
                     n_samples: int) -> None:
    """Refuse Hutchinson layer traces that are not positive (the minimum over
    rescalings would be 0, a scale sent to infinity); warn about traces
    within two standard errors of 0."""
    bad = [f"layer {i}: {t:.4g} +- {e:.2g}" for i, (t, e) in enumerate(zip(layer_traces, layer_se)) if t <= 0]
    if bad:
        raise ValueError(
            "Hutchinson's estimate of a layer's Hessian trace is not positive ("
            + "; ".join(bad) + f"; mean +- standard error over {n_samples} probes), so the "
            "minimum over rescalings is not defined; use method='gn' (exact) or more n_samples"
        )
    weak = [f"layer {i} weights: {t:.4g} +- {e:.2g}"
            for i, (t, e) in enumerate(zip(layer_traces, layer_se)) if t - 2 * e <= 0]
    weak += [f"layer {i} bias: {t:.4g} +- {e:.2g}"
             for i, (t, e) in enumerate(zip(bias_traces, bias_se))
             if t is not None and e is not None and t - 2 * e <= 0]
    if weak:
        warnings.warn(
            "Hutchinson's estimates of these traces are within two standard errors of 0 ("
            + "; ".join(weak) + f"; {n_samples} probes): the minimum sharpness is unreliable; "
            "use method='gn' (exact) or more n_samples",
            RuntimeWarning, stacklevel=3,
        )


def _diagonal(op: CurvatureOperator, method: str, n_samples: int, batch: int,
              gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """The Hessian diagonal (float64, flat), exactly from unit vectors or by
    Hutchinson's ``mean(z * Hz)``.

    Hutchinson probes one parameter tensor at a time (``z`` zero outside
    it): the estimate of that tensor's trace is then the quadratic form
    ``z_t^T H_tt z_t`` of its own diagonal block, free of the noise of the
    other blocks, never negative where the block is positive semi-definite
    (every block of a piecewise-linear network with a convex loss), and
    scaled exactly by a rescaling of the layer (same probes, same seed).
    It also returns each probe's block traces, shape
    ``(n_samples, n_tensors)``, for the standard errors.
    """
    n = op.shape[0]
    if method == "exact":
        return exact_diagonal(op.matmat, n, batch=batch, device=op.device), None
    sizes = [p.numel() for p in op.params.params]
    bounds = np.cumsum([0, *sizes]).tolist()
    T = len(sizes)
    acc = torch.zeros(n, dtype=torch.float64, device=op.device)
    rows = []
    per_chunk = max(1, batch // T)  # probes per product call: ~batch columns
    for i in range(0, n_samples, per_chunk):
        k = min(per_chunk, n_samples - i)
        Z = rademacher(n, k, generator=gen, device=op.device)
        # column (j, t): probe j restricted to tensor t
        V = torch.zeros(n, k * T, dtype=torch.float64, device=op.device)
        for t in range(T):
            V[bounds[t]:bounds[t + 1], t::T] = Z[bounds[t]:bounds[t + 1]]
        P = V * op.matmat(V)
        block = torch.empty(k, T, dtype=torch.float64, device=op.device)
        for t in range(T):
            part = P[bounds[t]:bounds[t + 1], t::T]
            acc[bounds[t]:bounds[t + 1]] += part.sum(1)
            block[:, t] = part.sum(0)
        rows.append(block)
    return acc / n_samples, torch.cat(rows).cpu()


# --------------------------------------------------------------------------
# exact diagonal from the Gauss-Newton factors
# --------------------------------------------------------------------------


def _check_gn_structure(model: nn.Module, train: bool) -> None:
    """Per-sample passes cannot reproduce a normalization by the statistics
    of the batch (BatchNorm in training mode)."""
    if not train:
        return
    for name, m in unwrap(model).named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(  # noqa: TRY004 - a bad option, not a bad type
                f"method='gn' works sample by sample, but {name} ({type(m).__name__}) normalizes by "
                "the statistics of the batch when train=True: use train=False, method='exact' "
                "(small models) or method='hutchinson'"
            )


def _verify_exactness(op: CurvatureOperator, inputs: Any, targets: Tensor, gn_diag: Tensor) -> None:
    """Compare the Gauss-Newton diagonal of one batch with the Hessian's at
    the largest entry of every parameter tensor (one Hessian-vector product
    each): they agree only if the outputs are linear in each layer's
    parameters, which the rescaling symmetry alone does not guarantee (a
    norm pooling is positively homogeneous, yet smooth)."""
    ps = op.params
    sizes = [p.numel() for p in ps.params]
    T = len(sizes)
    picks, offset = [], 0
    for k in sizes:
        picks.append(offset + int(gn_diag[offset:offset + k].abs().argmax()))
        offset += k
    E = torch.zeros(ps.numel, T, dtype=ps.dtype, device=ps.device)
    E[picks, torch.arange(T)] = 1
    # one batch, few vectors: double backward, which works for every loss
    HE = op.flatten(
        double_backward_hvp(op.model, ps, inputs, targets, op.unflatten(E), loss_fn=op.loss_fn), batched=True
    )
    h = HE[picks, torch.arange(T)].double()
    gn = gn_diag[picks]
    scale = torch.maximum(gn.abs(), h.abs()).clamp_min(float(gn.abs().max()) * 1e-6)
    tol = 1e3 * torch.finfo(ps.dtype).eps * scale
    bad = ((h - gn).abs() > tol).nonzero().flatten().tolist()
    if bad:
        names = [ps.names[t] for t in bad]
        raise ValueError(
            "method='gn' needs a network that is linear in each layer's parameters (Linear/Conv "
            "layers joined by piecewise-linear activations and pooling), but its Hessian diagonal "
            f"differs from the Gauss-Newton one in {', '.join(names)} (Hessian {float(h[bad[0]]):.6g}, "
            f"Gauss-Newton {float(gn[bad[0]]):.6g}): use method='exact' (small models) or "
            "method='hutchinson'"
        )


def _check_gn_outputs(op: CurvatureOperator, z0: Any) -> None:
    """``method="gn"`` factors the loss's Hessian in the outputs of each
    sample, vmapped: one output tensor, no buffer written in ``forward``."""
    from flatness._hvp import buffers_written_in_forward

    if not isinstance(z0, Tensor):
        raise ValueError(
            "method='gn' factors the Hessian of the loss in the model's outputs, which must be "
            f"one tensor, but this model returns a {type(z0).__name__}; use method='exact' or "
            "method='hutchinson'"
        )
    ps = op.params
    with ModelGuard(op.model, train=op.train):
        inputs, targets = next(iter(iter_batches(op.data, device=ps.device, dtype=ps.dtype, n_batches=1)))
        written = buffers_written_in_forward(op.model, ps, inputs, targets, op.loss_fn)
    if written:
        raise ValueError(
            "method='gn' differentiates the model sample by sample with torch.func, which cannot "
            f"write the buffers this model writes in forward ({', '.join(written)}); use "
            "method='exact' or method='hutchinson'"
        )


def _loss_factors(loss_fn: LossFn, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Factor the Hessian of each sample's loss in its outputs,
    ``H_i = sum_r sign_{i,r} u_{i,r} u_{i,r}^T``.

    Returns ``U`` of shape ``(c, r, *z.shape[1:])`` and ``sign`` of shape
    ``(c, r)``.
    """
    c = z.shape[0]
    if loss_fn is default_loss and z.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
        # Mean cross-entropy: diag(p) - p p^T = sum_k u_k u_k^T with
        # u_k = sqrt(p_k) (e_k - p), since sum_k p_k = 1.
        p = torch.softmax(z.double(), dim=1)
        eye = torch.eye(z.shape[1], dtype=torch.float64, device=z.device)
        U = p.sqrt()[:, :, None] * (eye[None] - p[:, None, :])
        return U.to(z.dtype), torch.ones(c, z.shape[1], dtype=z.dtype, device=z.device)

    def sample_loss(zi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(zi[None], yi[None]).reshape(())

    # A loop, not vmap: a user's loss may call .item() or one_hot (few
    # outputs per sample, so these Hessians are cheap next to the passes).
    m = z[0].numel()
    H = torch.stack([func_hessian(sample_loss)(z[i], y[i]).reshape(m, m) for i in range(c)]).double()
    lam, V = torch.linalg.eigh(0.5 * (H + H.transpose(1, 2)))
    # Rounding leaves eigenvalues of order eps * |H| where the exact ones are
    # 0 (the softmax's constant direction): drop them, keep the sign of the rest.
    tiny = lam.abs().amax(1, keepdim=True) * lam.shape[1] * torch.finfo(torch.float64).eps
    lam = torch.where(lam.abs() <= tiny, 0.0, lam)
    U = (lam.abs().sqrt()[:, None, :] * V).transpose(1, 2)  # rows: sqrt|lambda_r| v_r
    return U.reshape(c, -1, *z.shape[1:]).to(z.dtype), lam.sign().to(z.dtype)


def _reduction_scale(loss_fn: LossFn, z: Tensor, y: Tensor) -> float:
    """``1 / n`` if ``loss_fn`` on the batch is the mean of its per-sample
    values (each a batch of one), ``1`` if it is their sum; else ValueError
    (the Gauss-Newton factors are per sample)."""
    n = z.shape[0]
    whole = float(loss_fn(z, y))
    per = torch.stack([loss_fn(z[i:i + 1], y[i:i + 1]).reshape(()) for i in range(n)]).double()
    tol = 1e3 * torch.finfo(z.dtype).eps
    for scale, ref in ((1.0 / n, float(per.mean())), (1.0, float(per.sum()))):
        if abs(whole - ref) <= tol * max(abs(ref), abs(whole), 1e-30) + 1e-300:
            return scale
    raise ValueError(
        f"loss_fn on a batch ({whole:.6g}) is neither the mean ({float(per.mean()):.6g}) nor the "
        f"sum ({float(per.sum()):.6g}) of its values on single samples; method='gn' needs a "
        "per-sample loss: use method='exact' or method='hutchinson'"
    )


def _gn_diagonal(op: CurvatureOperator, chunk_size: int | None, bar: Any) -> tuple[Tensor, int]:
    """The exact Hessian diagonal of a network that is linear in each layer's
    parameters: ``(1/N) sum_i sum_r sign_{i,r} (J_i^T u_{i,r})**2`` over all
    samples of the data (the size-weighted average over batches).

    Returns the flat diagonal (float64) and the number of per-sample
    backward passes.
    """
    ps = op.params
    module = unwrap(op.model)
    n = ps.numel
    values = tuple(ps.detached())
    itemsize = torch.finfo(ps.dtype).bits // 8
    acc = torch.zeros(n, dtype=torch.float64, device=ps.device)
    total = 0
    n_backward = 0

    def outputs(vals: tuple[Tensor, ...], x: Any) -> Tensor:
        xb = _add_batch_dim(x)
        out = torch.func.functional_call(module, ps.as_dict(vals), _as_args(xb), _as_kwargs(xb), strict=False)
        return out[0]

    def pulled(x: Any, U: Tensor) -> tuple[Tensor, ...]:
        # J_i^T u for every row u of U: one backward pass per row.
        _, pull = vjp(lambda *vals: outputs(vals, x), *values)
        return vmap(pull)(U)

    with ModelGuard(op.model, train=op.train), private_rng(op.seed, ps.device), torch.no_grad(), \
            disable_running_stats(module):
        for inputs, targets in iter_batches(op.data, device=ps.device, dtype=ps.dtype, n_batches=op.n_batches):
            nb = batch_size(targets)
            z = vmap(outputs, in_dims=(None, 0), randomness="different")(values, inputs)
            require_finite(z.sum(), "the model's outputs")
            # The default loss on class indices is a mean by definition; any
            # other is checked.
            plain = (op.loss_fn is default_loss and z.dim() == 2 and targets.dim() == 1
                     and not targets.is_floating_point() and bool((targets >= 0).all()))
            scale = 1.0 / nb if plain else _reduction_scale(op.loss_fn, z, targets)
            m = z[0].numel()
            chunk = chunk_size or max(1, _GN_CHUNK_BYTES // max(1, m * n * itemsize))
            batch_acc = torch.zeros(n, dtype=torch.float64, device=ps.device)
            start = 0
            for x, y in split_batch(inputs, targets, chunk):
                c = batch_size(y)
                zc = z[start:start + c]
                start += c
                U, sign = _loss_factors(op.loss_fn, zc, y)
                grads = vmap(pulled, randomness="different")(x, U)  # each (c, r, *shape)
                # sum_{i,r} sign * g**2 as one matrix-vector product per tensor,
                # in the parameters' dtype (no float64 copy of the gradients).
                w = sign.reshape(1, -1)
                offset = 0
                for g in grads:
                    k = g[0, 0].numel()
                    flat = g.reshape(-1, k)
                    batch_acc[offset:offset + k] += (w @ flat.mul_(flat))[0].double()
                    offset += k
                n_backward += c * U.shape[1]
                if bar is not None:
                    bar.update(c)
            if total == 0:  # first batch
                _verify_exactness(op, inputs, targets, batch_acc * scale)
            acc += batch_acc * (scale * nb)
            total += nb
    acc, total = sum_(acc, total)
    return acc / total, n_backward
