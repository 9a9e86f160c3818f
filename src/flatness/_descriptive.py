"""Descriptive nonuniformity metrics of this library's own: channel gradient
norms, the moments of a weight update and the per-class loss imbalance
(public as :mod:`flatness.nonuniformity`; definitions in
:doc:`/guide/nonuniformity`)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flatness import _distributed
from flatness._checks import check_bool, maybe_progress, require_finite
from flatness._data import batch_size as _batch_len
from flatness._data import check_n_batches, iter_batches
from flatness._distributed import gather_objects, sum_
from flatness._functional import LossFn, functional_loss, grad_enabled
from flatness._guard import ModelGuard
from flatness._noise import _check_common, _layer_of
from flatness._params import ParamSet, select_params, unwrap
from flatness._per_sample import per_sample_losses
from flatness._results import ResultMixin
from flatness._rng import private_rng


def _mean_gradient(
    model: nn.Module,
    ps: ParamSet,
    data: Any,
    loss_fn: LossFn,
    n_batches: int | None,
    progress: bool,
    desc: str,
) -> list[Tensor]:
    """Size-weighted mean over batches of the batch gradients (one
    forward-backward pass per batch, through ``functional_loss``)."""
    total = [torch.zeros_like(p) for p in ps.params]
    n = 0
    values = ps.detached()
    batches = iter_batches(data, device=ps.device, dtype=ps.dtype, n_batches=n_batches)
    for inputs, targets in maybe_progress(batches, progress, None, desc):
        nb = _batch_len(targets)
        leaves = [v.detach().requires_grad_(True) for v in values]
        loss = functional_loss(model, ps, leaves, inputs, targets, loss_fn)
        for t, g in zip(total, torch.autograd.grad(loss, leaves, allow_unused=True), strict=True):
            if g is not None:
                t.add_(g, alpha=nb)
        n += nb
    n = sum_(*total, n)[-1]  # over all ranks inside a process group
    require_finite(total, "the mean gradient")
    return [t / n for t in total]


def _spread(values: Tensor) -> tuple[float, float, float]:
    """Mean, population variance and coefficient of variation (``0, 0,
    NaN`` for no values)."""
    if values.numel() == 0:
        return 0.0, 0.0, math.nan
    v = values.double()
    mean = float(v.mean())
    var = float(v.var(unbiased=False))
    cv = math.sqrt(var) / mean if mean > 0 else math.nan
    return mean, var, cv


@dataclass
class ChannelNormResult(ResultMixin):
    """The outcome of :func:`channel_gradient_norms`.

    Attributes
    ----------
    variance : float
        Population variance of the channel gradient norms, pooled over every
        channel of every layer.
    cv : float
        Coefficient of variation ``std / mean`` of the pooled norms.
    mean : float
        Mean channel gradient norm.
    n_channels : int
    per_layer : dict
        ``layer -> {"mean", "variance", "cv", "n_channels"}``.
    norms : dict
        ``layer -> list of channel norms``.
    settings : dict
    wall_time : float
    """

    variance: float
    cv: float
    mean: float
    n_channels: int
    per_layer: dict[str, dict[str, float]]
    norms: dict[str, list[float]]
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0

    def __float__(self) -> float:
        return float(self.variance)


@grad_enabled
def channel_gradient_norms(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: LossFn | None = None,
    params: Iterable[Any] | None = None,
    n_batches: int | None = None,
    train: bool = False,
    seed: int | None = 0,
    progress: bool = False,
) -> ChannelNormResult:
    r"""Variance and coefficient of variation of per-channel gradient norms.

    A descriptive metric of this library (not defined by the nonuniformity
    paper or its authors' code; see :doc:`/guide/nonuniformity`).

    With ``g = (1/n) sum_i g_i`` the mean gradient over ``data``, channel
    ``c`` of a layer is output unit / output channel ``c``: the slice
    ``[c]`` along the first dimension of every selected parameter of the
    layer (weight row or filter plus bias entry).  Its norm is
    ``nu_c = ||g[c]||_2``.  Reported: ``Var_c nu_c`` (population variance),
    ``CV = sqrt(Var_c nu_c) / mean_c nu_c``, pooled over all channels and per
    layer.  A layer whose parameters disagree on their first dimension
    contributes each parameter as its own layer (``"<layer>/<param>"``); a
    0-d parameter is one channel, a parameter with no elements has none
    (with only such parameters selected, the result has no channels:
    ``n_channels = 0``, empty ``per_layer`` and ``norms``, ``mean`` and
    ``variance`` 0, ``cv`` NaN).

    Parameters are as in :func:`gradient_variance`.

    Returns
    -------
    ChannelNormResult
    """
    start = time.perf_counter()
    loss_fn = _check_common(model, loss_fn)
    check_bool("progress", progress)
    n_batches = check_n_batches(n_batches)
    ps = select_params(model, params)
    with ModelGuard(model, train=check_bool("train", train)), private_rng(seed, ps.device), \
            torch.inference_mode(False), torch.enable_grad():
        grad = _mean_gradient(model, ps, data, loss_fn, n_batches, progress, "channel norms")
    groups: dict[str, list[Tensor]] = {}
    for name, g in zip(ps.names, grad, strict=True):
        if g.numel() == 0:
            continue  # a parameter of size 0 has no channels
        groups.setdefault(_layer_of(name), []).append(g.reshape(g.shape[0] if g.dim() else 1, -1))
    norms: dict[str, Tensor] = {}
    for layer, mats in groups.items():
        if len({m.shape[0] for m in mats}) == 1:
            norms[layer] = torch.cat(mats, dim=1).double().pow(2).sum(1).sqrt()
        else:
            for name, m in zip([n for n in ps.names if _layer_of(n) == layer], mats, strict=True):
                norms[f"{layer}/{name.rpartition('.')[2]}"] = m.double().pow(2).sum(1).sqrt()
    per_layer = {}
    for layer, v in norms.items():
        mean, var, cv = _spread(v)
        per_layer[layer] = {"mean": mean, "variance": var, "cv": cv, "n_channels": v.numel()}
    # no channels at all when every selected parameter is empty
    pooled = torch.cat(list(norms.values())) if norms else torch.zeros(0, dtype=torch.float64)
    mean, var, cv = _spread(pooled)
    return ChannelNormResult(
        variance=var, cv=cv, mean=mean, n_channels=pooled.numel(), per_layer=per_layer,
        norms={k: v.tolist() for k, v in norms.items()},
        settings={"n_batches": n_batches, "train": bool(train), "params": list(ps.names)},
        wall_time=time.perf_counter() - start,
    )


@dataclass
class UpdateMomentsResult(ResultMixin):
    """The outcome of :func:`update_moments`.

    Attributes
    ----------
    skewness : float
        ``E[(m - mu)^3] / sigma^3`` of the layer update magnitudes ``m_l``.
    kurtosis : float
        Excess kurtosis ``E[(m - mu)^4] / sigma^4 - 3``.
    mean, std : float
        ``mu`` and ``sigma`` (population) of the magnitudes.
    magnitudes : dict
        ``layer -> m_l``.
    relative : bool
    """

    skewness: float
    kurtosis: float
    mean: float
    std: float
    magnitudes: dict[str, float]
    relative: bool


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of the model's parameters, ``name -> tensor``: the
    ``before`` / ``after`` arguments of :func:`update_moments`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _as_tensors(obj: Any, what: str) -> dict[str, Tensor]:
    if isinstance(obj, nn.Module):
        return {n: p.detach() for n, p in obj.named_parameters()}
    if isinstance(obj, Mapping):
        out = {k: v.detach() for k, v in obj.items() if isinstance(v, Tensor) and v.is_floating_point()}
        if out:
            return out
        raise ValueError(f"{what} has no floating-point tensors")
    raise TypeError(
        f"{what} must be an nn.Module or a mapping name -> tensor (see snapshot()), "
        f"got {type(obj).__name__}"
    )


def update_moments(before: Any, after: Any, *, relative: bool = False) -> UpdateMomentsResult:
    r"""Skewness and kurtosis of update magnitudes across layers.

    A descriptive metric of this library (not defined by the nonuniformity
    paper or its authors' code; see :doc:`/guide/nonuniformity`).

    From two parameter snapshots ``w`` (before) and ``w'`` (after), e.g. one
    optimizer step or one epoch apart, each layer ``l`` (the parameters of
    one module) gets the update magnitude

    .. math::

        m_l = \|w'_l - w_l\|_2 \quad\text{or, with relative=True,}\quad
        m_l = \|w'_l - w_l\|_2 / \|w_l\|_2 ,

    and the result is the skewness ``E[(m-mu)^3]/sigma^3`` and excess
    kurtosis ``E[(m-mu)^4]/sigma^4 - 3`` over layers (population moments, as
    ``scipy.stats.skew`` / ``kurtosis`` with ``bias=True``).  Both are NaN
    when all layers moved by the same amount (``sigma = 0``).

    Parameters
    ----------
    before, after : nn.Module or mapping
        Models (their parameters are used) or mappings ``name -> tensor``
        with the same names, e.g. from :func:`snapshot`.  A ``state_dict``
        works too, but its floating-point buffers (BatchNorm statistics)
        then count as parameters.
    relative : bool
        Divide by the layer's norm before the update (``inf`` for a zero
        layer).  Only ``True`` or ``False`` (``TypeError`` otherwise).

    Returns
    -------
    UpdateMomentsResult
    """
    check_bool("relative", relative)
    w0, w1 = _as_tensors(before, "before"), _as_tensors(after, "after")
    if w0.keys() != w1.keys():
        raise ValueError(
            "before and after name different parameters: "
            f"only in before {sorted(w0.keys() - w1.keys())}, only in after {sorted(w1.keys() - w0.keys())}"
        )
    diff: dict[str, float] = {}
    base: dict[str, float] = {}
    for name in w0:
        if w0[name].shape != w1[name].shape:
            raise ValueError(f"parameter {name!r} changed shape {tuple(w0[name].shape)} -> {tuple(w1[name].shape)}")
        layer = _layer_of(name)
        d = (w1[name].double() - w0[name].double().to(w1[name].device)).pow(2).sum()
        diff[layer] = diff.get(layer, 0.0) + float(d)
        base[layer] = base.get(layer, 0.0) + float(w0[name].double().pow(2).sum())
    if len(diff) < 2:
        raise ValueError(f"update_moments needs at least 2 layers, got {len(diff)}")
    mags = {}
    for layer, d in diff.items():
        m = math.sqrt(d)
        if relative:
            m = m / math.sqrt(base[layer]) if base[layer] > 0 else math.inf
        mags[layer] = m
    v = torch.tensor(list(mags.values()), dtype=torch.float64)
    mu = float(v.mean())
    sigma = float(v.std(unbiased=False))
    if sigma > 0 and math.isfinite(sigma):
        z = (v - mu) / sigma
        skew, kurt = float(z.pow(3).mean()), float(z.pow(4).mean()) - 3.0
    else:
        skew = kurt = math.nan
    return UpdateMomentsResult(skew, kurt, mu, sigma, mags, relative)


@dataclass
class ClassLossResult(ResultMixin):
    """The outcome of :func:`class_loss_imbalance`.

    Attributes
    ----------
    cv : float
        ``std_c L_c / mean_c L_c`` over the classes present (population std).
    max_min_ratio : float
        ``max_c L_c / min_c L_c`` (``inf`` if some class has zero loss).
    mean, std : float
    per_class : dict
        ``class -> L_c``, the mean loss of the samples of class ``c``.
    counts : dict
        ``class -> number of samples``.
    settings : dict
    wall_time : float
    """

    cv: float
    max_min_ratio: float
    mean: float
    std: float
    per_class: dict[int, float]
    counts: dict[int, int]
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0


@grad_enabled
def class_loss_imbalance(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: LossFn | None = None,
    n_batches: int | None = None,
    train: bool = False,
    seed: int | None = 0,
    progress: bool = False,
) -> ClassLossResult:
    r"""Imbalance of the per-class mean losses.

    A descriptive metric of this library (not defined by the nonuniformity
    paper or its authors' code; see :doc:`/guide/nonuniformity`).

    With ``L_c = (1/n_c) sum_{i: y_i = c} l_i`` the mean sample loss of class
    ``c`` (``l_i`` is ``loss_fn`` on sample ``i`` alone) over the classes
    present in ``data``:

    .. math::

        \mathrm{CV} = \frac{\operatorname{std}_c L_c}{\operatorname{mean}_c L_c},
        \qquad
        \text{ratio} = \frac{\max_c L_c}{\min_c L_c}.

    Targets must be integer class labels of shape ``(n,)``.  Other
    parameters are as in :func:`gradient_variance`.

    Returns
    -------
    ClassLossResult
    """
    start = time.perf_counter()
    loss_fn = _check_common(model, loss_fn)
    check_bool("progress", progress)
    n_batches = check_n_batches(n_batches)
    # Every parameter, trainable or not: they only fix the device and dtype.
    ps = select_params(model, [n for n, _ in unwrap(model).named_parameters()])
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    with ModelGuard(model, train=check_bool("train", train)), private_rng(seed, ps.device), \
            torch.inference_mode(False), torch.enable_grad():
        batches = iter_batches(data, device=ps.device, dtype=ps.dtype, n_batches=n_batches)
        for inputs, targets in maybe_progress(batches, progress, None, "class losses"):
            if targets.dim() != 1 or targets.is_floating_point() or targets.is_complex():
                raise ValueError(
                    "class_loss_imbalance needs integer class labels of shape (n,), got "
                    f"{targets.dtype} of shape {tuple(targets.shape)}"
                )
            losses = per_sample_losses(model, ps, inputs, targets, loss_fn).double()
            require_finite(losses, "a per-sample loss")
            classes, inverse = torch.unique(targets, return_inverse=True)
            s = torch.zeros(len(classes), dtype=torch.float64, device=losses.device)
            s.index_add_(0, inverse, losses)
            c = torch.bincount(inverse, minlength=len(classes))
            for cls, total, cnt in zip(classes.tolist(), s.tolist(), c.tolist(), strict=True):
                sums[cls] = sums.get(cls, 0.0) + total
                counts[cls] = counts.get(cls, 0) + cnt
    if _distributed.enabled():  # classes may differ between ranks' shards
        parts = gather_objects((sums, counts))
        sums, counts = {}, {}
        for s_r, c_r in parts:
            for cls in s_r:
                sums[cls] = sums.get(cls, 0.0) + s_r[cls]
                counts[cls] = counts.get(cls, 0) + c_r[cls]
    per_class = {c: sums[c] / counts[c] for c in sorted(sums)}
    v = torch.tensor(list(per_class.values()), dtype=torch.float64)
    mean, var, cv = _spread(v)
    lo, hi = float(v.min()), float(v.max())
    ratio = hi / lo if lo > 0 else math.inf
    return ClassLossResult(
        cv=cv, max_min_ratio=ratio, mean=mean, std=math.sqrt(var), per_class=per_class,
        counts={c: counts[c] for c in sorted(counts)},
        settings={"n_batches": n_batches, "train": bool(train)},
        wall_time=time.perf_counter() - start,
    )
