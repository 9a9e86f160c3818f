"""The rescaling symmetry behind minimum sharpness (Ibayashi, Hamaguchi and
Imaizumi 2021): which layers form the chain, the checks that the model has
the symmetry, the rescaled parameters, the per-layer blocks of the Hessian
diagonal and the convex problem over the rescalings.

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
from collections.abc import Iterable
from typing import Any

import numpy as np
import scipy.optimize
import torch
from torch import Tensor, nn

from flatness._checks import require_finite
from flatness._data import iter_batches
from flatness._guard import ModelGuard
from flatness._hvp import CurvatureOperator
from flatness._params import unwrap
from flatness._products import _outputs

__all__ = ["minimize_rescaled_trace"]

#: Largest log-scale the solver may choose (e**100: far past any optimum).
_MAX_LOG_SCALE = 100.0
_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
    names = {id(m): n for n, m in module.named_modules()}
    for i, m in enumerate(chain):
        if getattr(m, "groups", 1) != 1:
            raise ValueError(f"layer {i} is a grouped convolution (groups={m.groups}); not supported")
        if i > 0:
            units, fan_in = chain[i - 1].weight.shape[0], m.weight.shape[1]
            if fan_in % units != 0 or (fan_in != units and not isinstance(m, nn.Linear)):
                raise ValueError(
                    f"layer {i}, {_label(names, m)}, takes {fan_in} inputs, which do not map onto the "
                    f"{units} units of layer {i - 1}, {_label(names, chain[i - 1])}; layers= must list the "
                    "Linear/Conv layers in forward order"
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
    for a in t0:  # (a NaN in the data would read as a broken symmetry below)
        require_finite(a, "the model's outputs on the first batch")
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
