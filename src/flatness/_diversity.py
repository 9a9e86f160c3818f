"""Ensemble diversity: disagreement, the disagreement-error ratio and the
prediction variance (public as :mod:`flatness.diversity`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from flatness._distributed import sum_
from flatness._ensemble import _Ensemble, _mean_offdiagonal, _pairwise_counts


def disagreement(
    members: Sequence[nn.Module] | Tensor,
    data: Any = None,
    *,
    pairwise: bool = False,
    outputs: str = "logits",
) -> float | Tensor:
    """Prediction disagreement between ensemble members.

    ``dis(i, j) = (1/N) sum_n 1[argmax f_i(x_n) != argmax f_j(x_n)]``; the
    result is its mean over the ``M (M - 1) / 2`` member pairs (as in
    SharpBalance's ``measure_diversity.py``, which stores the full matrix).

    Parameters
    ----------
    members : list of nn.Module or Tensor
        The models, or their outputs as a ``(members, samples, classes)``
        tensor.
    data : batch or iterable of batches, optional
        The data, when ``members`` are models.  Labels are not used.
    pairwise : bool
        Return the symmetric ``(M, M)`` matrix of ``dis(i, j)`` (zero
        diagonal, float64) instead of its off-diagonal mean.
    outputs : {"logits", "probs"}
        What the models return or the tensor holds.

    Returns
    -------
    float or Tensor

    Raises
    ------
    ValueError
        Fewer than two members, bad shapes, empty data.
    """
    ens = _Ensemble(
        members, data, None, outputs, min_members=2, need_targets=False, what="disagreement"
    )
    counts, _, n = _pairwise_counts(ens)
    matrix = counts / n
    return matrix if pairwise else _mean_offdiagonal(matrix)


def disagreement_error_ratio(
    members: Sequence[nn.Module] | Tensor,
    data: Any = None,
    *,
    targets: Tensor | None = None,
    outputs: str = "logits",
) -> float:
    """Disagreement-error ratio (DER) of an ensemble.

    ``DER = mean_{i<j} dis(i, j) / mean_i err(i)``: the mean pairwise
    :func:`disagreement` divided by the mean member error rate
    ``err(i) = (1/N) sum_n 1[argmax f_i(x_n) != y_n]``, the diversity measure
    of the SharpBalance paper (after Theisen et al., 2023).  It is ``nan``
    when every member is always right (then they never disagree either).

    Parameters
    ----------
    members : list of nn.Module or Tensor
        The models, or their ``(members, samples, classes)`` outputs.
    data : batch or iterable of batches, optional
        The data (with labels), when ``members`` are models.
    targets : Tensor, optional
        Labels of shape ``(samples,)``, required with precomputed outputs.
    outputs : {"logits", "probs"}
        What the models return or the tensor holds.

    Returns
    -------
    float
    """
    ens = _Ensemble(
        members, data, targets, outputs, min_members=2, need_targets=True, what="DER"
    )
    counts, errors, n = _pairwise_counts(ens)
    assert errors is not None
    dis = _mean_offdiagonal(counts / n)
    err = float(errors.mean() / n)
    return dis / err if err > 0 else float("nan")


def prediction_variance(
    members: Sequence[nn.Module] | Tensor,
    data: Any = None,
    *,
    space: str = "probs",
    class_reduction: str = "mean",
    outputs: str = "logits",
) -> float:
    """Variance of the members' predictions around the ensemble mean.

    With ``q_mnc`` the prediction of member ``m`` for sample ``n`` and class
    ``c`` (a probability for ``space="probs"``, a logit for
    ``space="logits"``) and ``qbar_nc = (1/M) sum_m q_mnc``::

        V = (1/N) sum_n  R_c  (1/(M-1)) sum_m (q_mnc - qbar_nc)^2

    where ``R_c`` is the mean over classes (``class_reduction="mean"``) or
    the sum (``"sum"``).  The member variance is the unbiased one (``M - 1``).

    SharpBalance's ``variance_mse_c`` (``measure_diversity_variance.py``)
    computes, from the raw network outputs (logits; its softmax is commented
    out), ``sum_c`` of the population variance times ``M / (M - 1)``, i.e.
    exactly ``prediction_variance(..., space="logits", class_reduction="sum")``.
    Its per-trial list is a running version of the same sum; its last entry is
    this value.

    Parameters
    ----------
    members : list of nn.Module or Tensor
        The models, or their ``(members, samples, classes)`` outputs.
    data : batch or iterable of batches, optional
        The data, when ``members`` are models.  Labels are not used.
    space : {"probs", "logits"}
        Measure the spread of probabilities (default) or of logits
        (``"logits"`` needs ``outputs="logits"``).
    class_reduction : {"mean", "sum"}
        Average or sum over classes.
    outputs : {"logits", "probs"}
        What the models return or the tensor holds.

    Returns
    -------
    float
    """
    if space not in ("probs", "logits"):
        raise ValueError(f"space must be one of ('probs', 'logits'), got {space!r}")
    if class_reduction not in ("mean", "sum"):
        raise ValueError(f"class_reduction must be one of ('mean', 'sum'), got {class_reduction!r}")
    if space == "logits" and outputs != "logits":
        raise ValueError("space='logits' needs logits; probabilities do not determine them")
    ens = _Ensemble(
        members, data, None, outputs, min_members=2, need_targets=False, what="prediction_variance"
    )
    total, n = 0.0, 0
    for raw, logp, _ in ens.chunks():
        q = raw if space == "logits" else logp.exp()
        var = q.var(dim=0, correction=1)  # (b, classes)
        per_sample = var.mean(-1) if class_reduction == "mean" else var.sum(-1)
        total += float(per_sample.sum())
        n += q.shape[1]
    total, n = sum_(total, n)  # over all ranks inside a process group
    return total / n
