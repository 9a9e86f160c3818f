"""Ensemble diversity, ensemble metrics and the pieces of SharpBalance.

Every metric takes the ensemble in one of two forms:

* a list of models and ``data`` (one batch ``(inputs, targets)`` or any
  iterable of batches, e.g. a ``DataLoader``).  The batches are streamed: each
  batch goes through every member (in eval mode, under ``torch.no_grad``) and
  only running sums are kept.  The members come back in the mode they were in.
* precomputed outputs: a tensor of shape ``(members, samples, classes)``
  holding logits (``outputs="logits"``, the default) or probabilities
  (``outputs="probs"``), plus ``targets=`` (shape ``(samples,)``) where the
  metric needs labels.

All arithmetic is in float64.  A member's prediction is the ``argmax`` of its
outputs; ties go to the lowest class index (as ``numpy.argmax``).  The
ensemble predicts with the mean of the members' probabilities.

SharpBalance (Lu et al., 2024, seed ``003-sharpbalance``) trains each member
with SAM on a subset of the data chosen from every member's per-sample
sharpness: :func:`per_sample_sharpness` gives the scores,
:func:`sharpbalance_split` the subsets (and :func:`random_split` the
baselines), and :func:`flatness.optim.subset_sam_step` takes the mixed step.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import Tensor, nn

from flatness._checks import check_int, check_rho, maybe_progress, require_finite
from flatness._data import iter_batches, to_device
from flatness._distributed import cat_over_ranks, sum_
from flatness._functional import LossFn, call_model, default_loss, functional_loss, grad_enabled
from flatness._guard import ModelGuard
from flatness._params import ParamSet, select_params, unwrap
from flatness._per_sample import check_chunk_size, iter_per_sample_grads

__all__ = [
    "EnsembleMetrics",
    "disagreement",
    "disagreement_error_ratio",
    "ensemble_metrics",
    "fit_temperature",
    "per_sample_sharpness",
    "prediction_variance",
    "random_split",
    "sharpbalance_split",
]

OUTPUTS = ("logits", "probs")
SHARPNESS_KINDS = ("fisher", "sam")

# Temperatures are searched in [1/1000, 1000] (log-spaced bounded Brent).
_LOG_T_BOUND = math.log(1e3)


# --------------------------------------------------------------------------
# ensemble outputs, streamed
# --------------------------------------------------------------------------


def _check_outputs_kind(outputs: str) -> None:
    if outputs not in OUTPUTS:
        raise ValueError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")


def _log_probs(raw: Tensor, outputs: str) -> Tensor:
    """Log-probabilities (float64) from logits or probabilities."""
    if outputs == "logits":
        return torch.log_softmax(raw, dim=-1)
    if (raw < 0).any() or not torch.allclose(
        raw.sum(-1), torch.ones((), dtype=raw.dtype, device=raw.device), atol=1e-3
    ):
        raise ValueError(
            "outputs='probs' needs non-negative rows that sum to 1; pass outputs='logits' "
            "for unnormalized scores"
        )
    return torch.log(raw)


def _check_targets(targets: Tensor, n: int, n_classes: int) -> Tensor:
    if not isinstance(targets, Tensor) or targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(
            f"targets must be a 1-d tensor of {n} class indices, got "
            f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer class indices, got {targets.dtype}")
    if n and (targets.min() < 0 or targets.max() >= n_classes):
        raise ValueError(f"targets must lie in [0, {n_classes}), got values outside")
    return targets.long()


def _member_devices(members: Sequence[nn.Module]) -> list[tuple[torch.device, torch.dtype]]:
    out = []
    for i, m in enumerate(members):
        if not isinstance(m, nn.Module):
            raise TypeError(f"members[{i}] must be a torch.nn.Module, got {type(m).__name__}")
        p = next(unwrap(m).parameters(), None)
        if p is None:
            raise ValueError(f"members[{i}] has no parameters")
        out.append((p.device, p.dtype))
    return out


class _Ensemble:
    """Validated ensemble input: models + data, or a tensor of outputs.

    :meth:`chunks` yields ``(raw, log_probs, targets)`` with ``raw`` and
    ``log_probs`` of shape ``(members, b, classes)`` in float64 and
    ``targets`` of shape ``(b,)`` (or ``None`` when none were given).
    """

    def __init__(
        self,
        members: Any,
        data: Any,
        targets: Tensor | None,
        outputs: str,
        *,
        min_members: int,
        need_targets: bool,
        what: str,
    ) -> None:
        _check_outputs_kind(outputs)
        self.outputs = outputs
        if isinstance(members, Tensor):
            if data is not None:
                raise TypeError(
                    "pass either models with data, or a tensor of outputs with targets=; "
                    "got a tensor and data"
                )
            if members.dim() != 3 or not members.is_floating_point():
                raise ValueError(
                    "precomputed outputs must be a floating tensor of shape "
                    f"(members, samples, classes), got {tuple(members.shape)} {members.dtype}"
                )
            m, n, c = members.shape
            if n == 0 or c == 0:
                raise ValueError(f"outputs have no samples or no classes: shape {(m, n, c)}")
            self.tensor: Tensor | None = members.detach().to(torch.float64)
            require_finite(self.tensor, "the precomputed outputs")
            self.n_members = m
            if targets is not None:
                targets = _check_targets(targets, n, c).to(self.tensor.device)
            elif need_targets:
                raise ValueError(f"{what} needs targets= (the labels) with precomputed outputs")
            self.targets = targets
            self.models: list[nn.Module] = []
        else:
            if isinstance(members, nn.ModuleList):
                members = list(members)
            if isinstance(members, nn.Module) or not isinstance(members, Sequence):
                raise TypeError(
                    "members must be a list of models or a tensor of shape "
                    f"(members, samples, classes), got {type(members).__name__}"
                )
            if data is None:
                raise ValueError("data is required when members are models")
            if targets is not None:
                raise TypeError("targets= is only for precomputed outputs; data carries the labels")
            self.models = list(members)
            self.n_members = len(self.models)
            self.devices = _member_devices(self.models)
            self.data = data
            self.tensor = None
        if self.n_members < min_members:
            raise ValueError(
                f"{what} needs at least {min_members} members, got {self.n_members}"
            )

    def chunks(self) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        if self.tensor is not None:
            raw = self.tensor
            yield raw, _log_probs(raw, self.outputs), self.targets
            return
        device, dtype = self.devices[0]
        with contextlib.ExitStack() as stack, torch.no_grad():
            for m in self.models:
                stack.enter_context(ModelGuard(m))
            for inputs, targets in iter_batches(self.data, device=device, dtype=dtype):
                rows = []
                for m, (dev, dt) in zip(self.models, self.devices, strict=True):
                    # unwrap: a DDP forward would broadcast buffers (a collective)
                    out = call_model(unwrap(m), to_device(inputs, dev, dt))
                    if not isinstance(out, Tensor) or out.dim() != 2:
                        raise ValueError(
                            "each member must return a (batch, classes) tensor, got "
                            f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
                        )
                    rows.append(out.to(device=device, dtype=torch.float64))
                if len({r.shape for r in rows}) > 1:
                    raise ValueError(
                        f"members return different output shapes {sorted({tuple(r.shape) for r in rows})}"
                    )
                raw = torch.stack(rows)
                require_finite(raw, "a member's outputs")
                t = _check_targets(targets, raw.shape[1], raw.shape[2])
                yield raw, _log_probs(raw, self.outputs), t


def _predictions(raw: Tensor) -> Tensor:
    # torch.argmax returns the first maximal index, like numpy.argmax.
    return raw.argmax(dim=-1)


def _pairwise_counts(ens: _Ensemble) -> tuple[Tensor, Tensor | None, int]:
    """Pairwise disagreement counts, member error counts and sample count."""
    m = ens.n_members
    counts = torch.zeros(m, m, dtype=torch.float64)
    errors: Tensor | None = torch.zeros(m, dtype=torch.float64)
    n = 0
    for raw, _, targets in ens.chunks():
        pred = _predictions(raw).cpu()
        counts += (pred[:, None, :] != pred[None, :, :]).sum(-1).double()
        if targets is None:
            errors = None
        elif errors is not None:
            errors += (pred != targets.cpu()[None]).sum(-1).double()
        n += pred.shape[1]
    return sum_(counts, errors, n)  # over all ranks inside a process group


def _mean_offdiagonal(matrix: Tensor) -> float:
    m = matrix.shape[0]
    return float((matrix.sum() - matrix.diagonal().sum()) / (m * (m - 1)))


# --------------------------------------------------------------------------
# diversity
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# accuracy, NLL, cNLL, ECE, Brier
# --------------------------------------------------------------------------


def _nll_at(logp: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Per-sample NLL of ``softmax(logp / T)``, ``logp`` of shape ``(b, C)``."""
    scaled = torch.log_softmax(logp / temperature, dim=-1)
    return -scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def fit_temperature(log_probs: Tensor, targets: Tensor) -> float:
    """Temperature ``T`` minimizing the NLL of ``softmax(log_probs / T)``.

    The NLL is convex in ``1/T``, so a bounded Brent search over ``log T`` in
    ``[-log 1000, log 1000]`` finds the global minimum.  ``log_probs`` may be
    logits: they differ from log-probabilities by a per-sample constant,
    which ``softmax`` ignores.

    Parameters
    ----------
    log_probs : Tensor
        Shape ``(samples, classes)``.
    targets : Tensor
        Shape ``(samples,)``, class indices.

    Returns
    -------
    float
    """
    logp = log_probs.detach().to(torch.float64)
    if logp.dim() != 2:
        raise ValueError(f"log_probs must have shape (samples, classes), got {tuple(logp.shape)}")
    targets = _check_targets(targets, logp.shape[0], logp.shape[1]).to(logp.device)

    def objective(log_t: float) -> float:
        return float(_nll_at(logp, targets, math.exp(log_t)).mean())

    res = minimize_scalar(
        objective, bounds=(-_LOG_T_BOUND, _LOG_T_BOUND), method="bounded",
        options={"xatol": 1e-9},
    )
    return math.exp(float(res.x))


@dataclass
class _Running:
    """Running sums of one predictor's metrics."""

    n_bins: int
    correct: float = 0.0
    nll: float = 0.0
    cnll: float = 0.0
    brier: float = 0.0
    bin_count: Tensor = field(init=False)
    bin_conf: Tensor = field(init=False)
    bin_correct: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.bin_count = torch.zeros(self.n_bins, dtype=torch.float64)
        self.bin_conf = torch.zeros(self.n_bins, dtype=torch.float64)
        self.bin_correct = torch.zeros(self.n_bins, dtype=torch.float64)

    def add(self, logp: Tensor, pred: Tensor, targets: Tensor, temperature: float | None) -> None:
        probs = logp.exp()
        hit = (pred == targets).double()
        self.correct += float(hit.sum())
        self.nll += float(_nll_at(logp, targets, 1.0).sum())
        if temperature is not None:
            self.cnll += float(_nll_at(logp, targets, temperature).sum())
        onehot = torch.nn.functional.one_hot(targets, probs.shape[-1]).double()
        self.brier += float(((probs - onehot) ** 2).sum())
        conf = probs.gather(-1, pred.unsqueeze(-1)).squeeze(-1)
        # Bins (k/B, (k+1)/B], as in Guo et al. (2017).
        idx = (torch.ceil(conf * self.n_bins).long() - 1).clamp(0, self.n_bins - 1).cpu()
        self.bin_count += torch.bincount(idx, minlength=self.n_bins).double()
        self.bin_conf += torch.bincount(idx, weights=conf.cpu(), minlength=self.n_bins)
        self.bin_correct += torch.bincount(idx, weights=hit.cpu(), minlength=self.n_bins)

    def result(self, n: int, temperature: float | None) -> dict[str, float | None]:
        ece = float((self.bin_conf - self.bin_correct).abs().sum() / n)
        return {
            "accuracy": self.correct / n,
            "nll": self.nll / n,
            "cnll": None if temperature is None else self.cnll / n,
            "temperature": temperature,
            "ece": ece,
            "brier": self.brier / n,
        }


@dataclass
class EnsembleMetrics:
    """Metrics of every member and of the ensemble (mean of probabilities).

    Each entry of :attr:`members` and :attr:`ensemble` is a dict with keys
    ``accuracy``, ``nll``, ``cnll`` and ``temperature`` (``None`` without a
    calibration split), ``ece`` and ``brier``.

    Attributes
    ----------
    ensemble : dict
    members : list of dict
    n_samples : int
    n_bins : int
        Number of equal-width confidence bins of the ECE.
    """

    ensemble: dict[str, float | None]
    members: list[dict[str, float | None]]
    n_samples: int
    n_bins: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON serializable)."""
        return asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        """JSON string of :meth:`to_dict` (``kwargs`` go to ``json.dumps``)."""
        return json.dumps(self.to_dict(), **kwargs)


def _ensemble_logp(logp: Tensor) -> Tensor:
    """Log of the mean of the members' probabilities, ``(M, b, C) -> (b, C)``."""
    return torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])


def ensemble_metrics(
    members: Sequence[nn.Module] | Tensor,
    data: Any = None,
    *,
    targets: Tensor | None = None,
    calibration: Any = None,
    calibration_targets: Tensor | None = None,
    outputs: str = "logits",
    n_bins: int = 15,
) -> EnsembleMetrics:
    """Accuracy, NLL, calibrated NLL, ECE and Brier score of an ensemble.

    For each member ``m`` with probabilities ``p_m`` and for the ensemble
    ``p = (1/M) sum_m p_m``, over the ``N`` samples of ``data``:

    * ``accuracy``: fraction with ``argmax p == y``;
    * ``nll``: ``-(1/N) sum_n log p(y_n | x_n)``;
    * ``cnll`` (seed 002's calibrated NLL): the NLL of
      ``softmax(log p / T)`` where ``T`` minimizes that NLL on the held-out
      ``calibration`` split (:func:`fit_temperature`), fitted separately for
      each member and for the ensemble, then applied to ``data``;
    * ``ece``: ``sum_b |B_b|/N |acc(B_b) - conf(B_b)|`` over ``n_bins``
      equal-width bins ``(k/B, (k+1)/B]`` of the confidence ``max_c p_c``;
    * ``brier``: ``(1/N) sum_n sum_c (p_c - 1[c == y_n])^2``.

    Parameters
    ----------
    members : list of nn.Module or Tensor
        The models, or their ``(members, samples, classes)`` outputs.
    data : batch or iterable of batches, optional
        The evaluation data, when ``members`` are models.
    targets : Tensor, optional
        Labels, required with precomputed outputs.
    calibration : batch, iterable of batches or Tensor, optional
        The held-out split for the temperatures: data when ``members`` are
        models, a ``(members, samples, classes)`` tensor otherwise (with
        ``calibration_targets``).  Without it ``cnll`` and ``temperature``
        are ``None``.  Its outputs are kept in memory (``M x N_cal x C``).
    calibration_targets : Tensor, optional
        Labels of the calibration tensor.
    outputs : {"logits", "probs"}
        What the models return or the tensors hold.
    n_bins : int
        Number of ECE bins (default 15).

    Returns
    -------
    EnsembleMetrics
    """
    check_int("n_bins", n_bins)
    ens = _Ensemble(
        members, data, targets, outputs, min_members=1, need_targets=True, what="ensemble_metrics"
    )
    temps: list[float | None] = [None] * (ens.n_members + 1)
    if calibration is not None:
        if ens.tensor is not None:
            cal = _Ensemble(
                calibration, None, calibration_targets, outputs, min_members=1,
                need_targets=True, what="calibration",
            )
        else:
            if calibration_targets is not None:
                raise TypeError("calibration_targets= is only for a calibration tensor")
            cal = _Ensemble(
                members, calibration, None, outputs, min_members=1, need_targets=True,
                what="calibration",
            )
        if cal.n_members != ens.n_members:
            raise ValueError(
                f"calibration has {cal.n_members} members, the ensemble {ens.n_members}"
            )
        chunks = list(cal.chunks())
        cal_logp = torch.cat([c[1] for c in chunks], dim=1)
        cal_y = torch.cat([c[2] for c in chunks if c[2] is not None])
        # Inside a process group the temperatures are fitted on every rank's
        # calibration samples together.
        cal_logp, cal_y = cat_over_ranks(cal_logp, 1), cat_over_ranks(cal_y)
        temps = [fit_temperature(lp, cal_y) for lp in cal_logp]
        temps.append(fit_temperature(_ensemble_logp(cal_logp), cal_y))
    elif calibration_targets is not None:
        raise TypeError("calibration_targets= given without calibration=")

    running = [_Running(n_bins) for _ in range(ens.n_members + 1)]
    n = 0
    for raw, logp, y in ens.chunks():
        assert y is not None
        preds = _predictions(raw)
        for m in range(ens.n_members):
            running[m].add(logp[m], preds[m], y, temps[m])
        ens_logp = _ensemble_logp(logp)
        running[-1].add(ens_logp, _predictions(ens_logp), y, temps[-1])
        n += y.shape[0]
    for r in running:  # sums over all ranks inside a process group
        r.correct, r.nll, r.cnll, r.brier, *_ = sum_(
            r.correct, r.nll, r.cnll, r.brier, r.bin_count, r.bin_conf, r.bin_correct
        )
    n = sum_(n)
    results = [r.result(n, t) for r, t in zip(running, temps, strict=True)]
    return EnsembleMetrics(ensemble=results[-1], members=results[:-1], n_samples=n, n_bins=n_bins)


# --------------------------------------------------------------------------
# SharpBalance: which samples each member trains with SAM
# --------------------------------------------------------------------------


def _check_fraction(flat_ratio: float) -> float:
    if isinstance(flat_ratio, bool) or not isinstance(flat_ratio, (int, float)):
        raise TypeError(f"flat_ratio must be a number in [0, 1], got {type(flat_ratio).__name__}")
    if not 0.0 <= float(flat_ratio) <= 1.0:
        raise ValueError(f"flat_ratio must be in [0, 1], got {flat_ratio}")
    return float(flat_ratio)


def _fraction_count(flat_ratio: float, n: int) -> int:
    # floor(flat_ratio * n), robust to binary rounding: 0.29 * 100 is
    # 28.999999999999996 in floating point but means 29 samples.
    return min(n, math.floor(flat_ratio * n + 1e-9))


def _as_score_matrix(scores: Any) -> Tensor:
    if isinstance(scores, (Tensor, np.ndarray)):
        mat = torch.as_tensor(scores)
    elif isinstance(scores, Sequence) and not isinstance(scores, (str, bytes)):
        rows = [torch.as_tensor(s) for s in scores]
        if not rows:
            raise ValueError("scores must hold one score vector per member, got none")
        if any(r.dim() != 1 for r in rows) or len({r.shape[0] for r in rows}) != 1:
            raise ValueError(
                "scores must be one 1-d vector per member, all of the same length, got shapes "
                f"{[tuple(r.shape) for r in rows]}"
            )
        mat = torch.stack([r.to(torch.float64) for r in rows])
    else:
        raise TypeError(
            f"scores must be a (members, samples) tensor/array or a list of vectors, "
            f"got {type(scores).__name__}"
        )
    if mat.dim() != 2 or mat.shape[0] == 0 or mat.shape[1] == 0:
        raise ValueError(f"scores must have shape (members, samples), got {tuple(mat.shape)}")
    mat = mat.detach().cpu().to(torch.float64)
    if torch.isnan(mat).any():
        raise ValueError("scores contain NaN")
    return mat


def _check_member(member: int, n_members: int) -> int:
    if isinstance(member, bool) or not isinstance(member, int):
        raise TypeError(f"member must be an int, got {type(member).__name__}")
    if not 0 <= member < n_members:
        raise ValueError(f"member must be in [0, {n_members}), got {member}")
    return member


def _top_set(row: Tensor, k: int, largest: bool) -> Tensor:
    # Stable sort on the (negated) scores: among equal scores the lower
    # sample index ranks first, so the top set is deterministic.
    order = torch.sort(-row if largest else row, stable=True).indices
    return order[:k]


def _complement(n: int, chosen: Tensor) -> Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[chosen] = False
    return torch.nonzero(mask).flatten()


def sharpbalance_split(
    scores: Any, member: int, flat_ratio: float, *, largest: bool = True, leftover: str = "own"
) -> tuple[Tensor, Tensor]:
    """SharpBalance's data split for one ensemble member.

    With ``k = floor(flat_ratio * N)`` and ``top_j`` the ``k`` samples that
    rank first by member ``j``'s score (highest first when ``largest``; ties
    go to the lower sample index), the *leftover* samples are those in no
    member's top set, and ``share_i`` is member ``i``'s round-robin share of
    them (every ``M``-th, starting at ``i``, in increasing index order).
    Member ``i`` trains with SAM on::

        leftover="own":     union_{j != i} top_j  +  share_i
        leftover="others":  union_{j != i} top_j  +  (leftover - share_i)

    i.e. the samples in the top set of some *other* member, plus its own
    share of the leftover samples (``"own"``, the authors'
    ``boosting_sam_split``) or the other members' shares
    (``"others"``, their ``boosting_sam_split_boost``).  All other samples
    get plain steps.  The authors' ``main.py`` uses ``"others"`` for
    CIFAR-10 and ``"own"`` for every other data set.

    Which end of the ranking: every call in the authors' ``main.py`` passes
    ``ascend=True``, which takes the ``k`` *lowest* scores (their
    ``np.argsort(...)[:total]``) while the code names that set
    ``sharp_indice``; their per-sample score is the one of
    :func:`per_sample_sharpness`.  The default here, ``largest=True``, takes
    the highest scores, the sharpest samples as the paper describes them;
    pass ``largest=False`` to reproduce the code's runs.

    Parameters
    ----------
    scores : Tensor, array or list of vectors
        Per-sample scores of every member, shape ``(members, samples)``
        (e.g. from :func:`per_sample_sharpness`, one row per member, the
        samples in the same order).
    member : int
        Which member the split is for.
    flat_ratio : float
        Fraction of samples in each member's top set, in ``[0, 1]``.
    largest : bool
        Rank the highest scores first (default) or the lowest (the authors'
        ``ascend=True``).
    leftover : {"own", "others"}
        Which shares of the samples in no top set the member gets SAM on.

    Returns
    -------
    sam_idx, plain_idx : Tensor
        Sorted int64 sample indices; disjoint, together ``0 .. N-1``.
    """
    if leftover not in ("own", "others"):
        raise ValueError(f"unknown leftover {leftover!r}; valid: 'own', 'others'")
    mat = _as_score_matrix(scores)
    m, n = mat.shape
    member = _check_member(member, m)
    k = _fraction_count(_check_fraction(flat_ratio), n)
    in_any_top = torch.zeros(n, dtype=torch.bool)
    in_other_top = torch.zeros(n, dtype=torch.bool)
    for j in range(m):
        top = _top_set(mat[j], k, largest)
        in_any_top[top] = True
        if j != member:
            in_other_top[top] = True
    neither = torch.nonzero(~in_any_top).flatten()
    sam = in_other_top.clone()
    if leftover == "own":
        sam[neither[member::m]] = True
    else:
        others = torch.ones(len(neither), dtype=torch.bool)
        others[member::m] = False
        sam[neither[others]] = True
    return torch.nonzero(sam).flatten(), torch.nonzero(~sam).flatten()


def random_split(
    n_samples: int, member: int, flat_ratio: float, *, seed: int = 0, same: bool = False
) -> tuple[Tensor, Tensor]:
    """The baselines SharpBalance is compared with: a random SAM subset.

    ``floor(flat_ratio * n_samples)`` samples, drawn uniformly without
    replacement, get SAM; the rest plain steps.  With ``same=False`` each
    member draws its own subset (from ``seed`` and ``member``); with
    ``same=True`` every member gets the same subset (from ``seed`` alone),
    the authors' ``random_subset`` and ``same_subset``.

    Parameters
    ----------
    n_samples : int
        Number of training samples.
    member : int
        Which member the split is for (non-negative).
    flat_ratio : float
        Fraction of samples trained with SAM, in ``[0, 1]``.
    seed : int
        Seed of the private generator (the global RNG is not used).
    same : bool
        Give every member the same subset.

    Returns
    -------
    sam_idx, plain_idx : Tensor
        Sorted int64 sample indices; disjoint, together ``0 .. n_samples-1``.
    """
    check_int("n_samples", n_samples)
    if isinstance(member, bool) or not isinstance(member, int) or member < 0:
        raise ValueError(f"member must be a non-negative int, got {member!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    k = _fraction_count(_check_fraction(flat_ratio), n_samples)
    gen = torch.Generator().manual_seed(seed if same else seed * 1_000_003 + member)
    chosen = torch.randperm(n_samples, generator=gen)[:k]
    return torch.sort(chosen).values, _complement(n_samples, chosen)


# --------------------------------------------------------------------------
# SharpBalance: per-sample sharpness scores
# --------------------------------------------------------------------------


@grad_enabled
def per_sample_sharpness(
    model: nn.Module,
    data: Any,
    kind: str = "fisher",
    *,
    rho: float = 0.05,
    adaptive: bool = False,
    params: Any = None,
    loss_fn: LossFn = default_loss,
    chunk_size: int | None = 64,
    trials: int = 1,
    progress: bool = False,
) -> Tensor:
    """One sharpness score per training sample, in the order ``data`` yields them.

    ``kind="fisher"`` (the authors' ``test_fisher``, their default): the
    squared norm of the sample's loss gradient, ``||grad_w l_i(w)||^2`` (the
    trace of the sample's empirical Fisher), from ``torch.func.vmap`` over
    ``grad`` in chunks of ``chunk_size`` samples, averaged over ``trials``
    passes over ``data`` (more than one pass only matters when the loader
    draws random augmentations).

    ``kind="sam"`` (the authors' ``test_sharpness_loss``): the increase of the
    sample's loss under one SAM perturbation, ``l_i(w + e) - l_i(w)``, where
    ``e = rho * g / ||g||`` and ``g`` is the gradient of the *batch's* mean
    loss; with ``adaptive=True`` it is ASAM's ``e = rho * w^2 g / ||w g||``.
    The perturbation is shared by the batch, so the scores depend on how
    ``data`` is batched.  A batch with ``g = 0`` scores 0.

    The model runs in eval mode and comes back unchanged (it is evaluated
    through ``torch.func.functional_call``; no ``.grad`` is written).  Use a
    loader with ``shuffle=False`` so that score ``i`` belongs to dataset item
    ``i``.

    Parameters
    ----------
    model : nn.Module
    data : batch or iterable of batches
    kind : {"fisher", "sam"}
    rho : float
        SAM radius (``kind="sam"`` only).
    adaptive : bool
        ASAM perturbation (``kind="sam"`` only).
    params : iterable, optional
        The parameters the gradients are taken with respect to (default: all
        with ``requires_grad``).
    loss_fn : callable
        ``loss_fn(outputs, targets)``, a mean over the batch (default: mean
        cross-entropy), so that a batch of one gives the sample loss.
    chunk_size : int or None
        Samples differentiated at once for ``"fisher"`` (bounds memory to
        ``chunk_size`` copies of the parameters).
    trials : int
        Passes over ``data`` to average (``"fisher"`` only).
    progress : bool
        Show a tqdm bar over batches (needs ``flatness[progress]``).

    Returns
    -------
    Tensor
        Float64 scores on the CPU, shape ``(N,)``.
    """
    if kind not in SHARPNESS_KINDS:
        raise ValueError(f"kind must be one of {SHARPNESS_KINDS}, got {kind!r}")
    check_int("trials", trials)
    if kind == "sam":
        rho = check_rho(rho)
    chunk_size = check_chunk_size(chunk_size)
    ps = select_params(model, params)
    with ModelGuard(model):
        if kind == "sam":
            return _sam_scores(model, ps, data, loss_fn, rho, adaptive, progress)
        total: Tensor | None = None
        for _ in range(trials):
            batches = iter_batches(data, device=ps.device, dtype=ps.dtype)
            rows = [
                sum(g.flatten(1).double().pow(2).sum(1) for g in grads)
                for batch in maybe_progress(batches, progress, None, "fisher scores")
                for grads, _, _ in iter_per_sample_grads(
                    model, ps, batch, loss_fn, chunk_size=chunk_size
                )
            ]
            scores = torch.cat(rows).cpu()
            if total is not None and total.shape != scores.shape:
                raise ValueError("data yielded a different number of samples on another trial")
            total = scores if total is None else total + scores
        assert total is not None
        require_finite(total, "a per-sample sharpness score")
        return total / trials


def _sample_losses(
    model: nn.Module, ps: ParamSet, values: list[Tensor], inputs: Any, targets: Tensor,
    loss_fn: LossFn,
) -> Tensor:
    """Each sample's loss: ``loss_fn`` on a batch of one (vmapped, or looped
    where vmap cannot run the model: recurrent kernels, buffer writes)."""
    from flatness._per_sample import per_sample_losses

    return per_sample_losses(model, ps, inputs, targets, loss_fn, values=values)


def _sam_scores(
    model: nn.Module, ps: ParamSet, data: Any, loss_fn: LossFn, rho: float, adaptive: bool,
    progress: bool,
) -> Tensor:
    weights = ps.detached()
    rows = []
    batches = iter_batches(data, device=ps.device, dtype=ps.dtype)
    for inputs, targets in maybe_progress(batches, progress, None, "sam scores"):
        # plain autograd (not torch.func.grad): works for every module, also
        # one that writes a buffer in forward (on copies of the buffers)
        leaves = [w.detach().requires_grad_(True) for w in weights]
        buffers = {n: b.clone() for n, b in unwrap(model).named_buffers()}
        with torch.enable_grad():
            loss = functional_loss(model, ps, leaves, inputs, targets, loss_fn, extra=buffers)
            g = torch.autograd.grad(loss, leaves, allow_unused=True)
        g = [torch.zeros_like(w) if gi is None else gi for w, gi in zip(weights, g)]
        with torch.no_grad():
            # ASAM: e = rho * T^2 g / ||T g|| with T = |w|; SAM: T = 1.
            scaled = [w.abs() * gi for w, gi in zip(weights, g)] if adaptive else g
            norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in scaled]))
            if norm == 0:
                rows.append(torch.zeros(targets.shape[0], dtype=torch.float64))
                continue
            step = [
                (w.abs() * t if adaptive else t) * (rho / norm)
                for w, t in zip(weights, scaled)
            ]
            moved = [w + e for w, e in zip(weights, step)]
            clean = _sample_losses(model, ps, weights, inputs, targets, loss_fn)
            pert = _sample_losses(model, ps, moved, inputs, targets, loss_fn)
        rows.append((pert.double() - clean.double()).cpu())
    scores = torch.cat(rows)
    require_finite(scores, "a per-sample sharpness score")
    return scores
