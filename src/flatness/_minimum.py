"""Minimum sharpness (Ibayashi, Hamaguchi and Imaizumi 2021): the public
function and its result.

The parts live by concept: the rescaling symmetry, the checks of the model's
structure and the convex problem over the rescalings in
:mod:`flatness._rescaling`; the Hessian diagonal from Hessian-vector products
(exact or Hutchinson) in :mod:`flatness._diagonal`; the exact diagonal from
the Gauss-Newton factors (``method="gn"``) in :mod:`flatness._gn_diagonal`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flatness._checks import check_bool, check_int, maybe_progress, product_bar, require_finite
from flatness._data import batch_size, check_n_batches
from flatness._diagonal import _check_estimates, _diagonal
from flatness._functional import LossFn, grad_enabled
from flatness._gn_diagonal import _check_gn_outputs, _check_gn_structure, _gn_diagonal
from flatness._hvp import CurvatureOperator
from flatness._rescaling import _blocks, _chain, _check_invariance, _check_structure, minimize_rescaled_trace
from flatness._results import ResultMixin
from flatness._rng import check_seed, private_rng

__all__ = ["MinimumSharpnessResult", "minimize_rescaled_trace", "minimum_sharpness"]

GRANULARITIES = ("layer", "neuron")
METHODS = ("gn", "exact", "hutchinson")


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
# the public function
# --------------------------------------------------------------------------


@grad_enabled
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

    Autograd runs inside whatever the caller's grad mode: the call works
    the same under ``torch.no_grad()`` or ``torch.inference_mode()``.

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
        A positive int or ``None``.

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
    n_samples = check_int("n_samples", n_samples, 2)
    batch = check_int("batch", batch, 1)
    check_bool("progress", progress)
    chunk_size = check_int("chunk_size", chunk_size, allow_none=True)
    seed = check_seed(seed)
    n_batches = check_n_batches(n_batches)
    if params is not None:
        raise ValueError(
            "minimum sharpness is defined over all weights and biases of the ReLU chain; "
            "pass params=None and choose the layers with layers="
        )
    chain = _chain(model, layers)
    _check_structure(model, chain, layers is not None, method)
    chain_params = [t for m in chain for t in (m.weight, m.bias) if t is not None]
    # the Hessian diagonal's products count on the bar; the GN diagonal counts samples
    hvps = product_bar(progress and method != "gn", "minimum sharpness")
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
