"""The Hessian diagonal for minimum sharpness from Hessian-vector products:
exactly from the unit vectors, or by Hutchinson's estimate one parameter
tensor at a time, and the check of those estimates."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from flatness._hvp import CurvatureOperator
from flatness._lanczos import exact_diagonal, rademacher


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
