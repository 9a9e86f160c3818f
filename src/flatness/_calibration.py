"""Accuracy, NLL, calibrated NLL (temperature scaling, Guo et al. 2017), ECE
and Brier score of each member and of the ensemble (public as
:mod:`flatness.diversity`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.optimize import minimize_scalar
from torch import Tensor, nn

from flatness._checks import check_int, require_finite
from flatness._distributed import cat_over_ranks, sum_
from flatness._ensemble import _check_targets, _Ensemble, _predictions
from flatness._results import ResultMixin

# Temperatures are searched in [1/1000, 1000] (log-spaced bounded Brent).
_LOG_T_BOUND = math.log(1e3)


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
    if logp.shape[0] == 0 or logp.shape[1] < 2:
        # no samples: the NLL is an empty mean (NaN) and the search returned
        # an arbitrary point; one class: every temperature gives NLL 0
        raise ValueError(f"log_probs need at least one sample and two classes, got shape {tuple(logp.shape)}")
    # -inf is a valid log-probability (a class of probability 0); NaN and +inf are not
    require_finite(logp.clamp_min(torch.finfo(logp.dtype).min), "log_probs")
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
class EnsembleMetrics(ResultMixin):
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
    * ``cnll`` (the calibrated NLL of Foret et al.'s SAM results): the NLL of
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
    n_bins = check_int("n_bins", n_bins)
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
