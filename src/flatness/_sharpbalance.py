"""The pieces of SharpBalance (Lu et al., 2024): per-sample sharpness scores
and the subsets each member trains with SAM (public as
:mod:`flatness.diversity`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flatness._checks import (
    LOW_PRECISION,
    check_bool,
    check_int,
    check_rho,
    is_int,
    is_real,
    maybe_progress,
    require_finite,
    user_stacklevel,
)
from flatness._data import iter_batches
from flatness._functional import LossFn, check_loss_fn, functional_loss, grad_enabled
from flatness._geometry import ROUNDING_WARNING, lost_share
from flatness._guard import ModelGuard
from flatness._params import ParamSet, select_params, unwrap
from flatness._per_sample import check_chunk_size, iter_per_sample_grads
from flatness._rng import keep_global_rng

SHARPNESS_KINDS = ("fisher", "sam")


def _check_fraction(flat_ratio: float) -> float:
    if not is_real(flat_ratio):
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
    if not is_int(member):
        raise TypeError(f"member must be an int, got {type(member).__name__}")
    if not 0 <= member < n_members:
        raise ValueError(f"member must be in [0, {n_members}), got {member}")
    return int(member)


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
    n_samples = check_int("n_samples", n_samples)
    if not is_int(member) or member < 0:
        raise ValueError(f"member must be a non-negative int, got {member!r}")
    if not is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    member, seed = int(member), int(seed)  # (a NumPy seed * 1_000_003 could wrap around)
    k = _fraction_count(_check_fraction(flat_ratio), n_samples)
    gen = torch.Generator().manual_seed(seed if same else seed * 1_000_003 + member)
    chosen = torch.randperm(n_samples, generator=gen)[:k]
    return torch.sort(chosen).values, _complement(n_samples, chosen)


@grad_enabled
def per_sample_sharpness(
    model: nn.Module,
    data: Any,
    kind: str = "fisher",
    *,
    rho: float = 0.05,
    adaptive: bool = False,
    params: Any = None,
    loss_fn: LossFn | None = None,
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
    loss_fn : callable, optional
        ``loss_fn(outputs, targets)``, a mean over the batch (default, or
        ``None``: mean cross-entropy), so that a batch of one gives the
        sample loss.
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
    trials = check_int("trials", trials)
    check_bool("progress", progress)
    if kind == "sam":
        rho = check_rho(rho)
    chunk_size = check_chunk_size(chunk_size)
    loss_fn = check_loss_fn(loss_fn)
    ps = select_params(model, params)
    # the loader's base seed (and any augmentation) comes from the global RNG
    with ModelGuard(model), keep_global_rng(ps.device):
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


def _warn_if_rounded_away(weights: list[Tensor], step: list[Tensor], moved: list[Tensor], rho: float) -> None:
    """The first batch's perturbation of a float16 / bfloat16 model: warn
    if storing ``w + e`` in its dtype lost more than
    :data:`~flatness._geometry.ROUNDING_WARNING` of ``e`` along its
    direction (:func:`~flatness._geometry.lost_share`; the scores then
    measure a smaller radius than ``rho``)."""
    share = lost_share(zip(weights, step, moved))
    if share > ROUNDING_WARNING:
        warnings.warn(
            "flatness.diversity.per_sample_sharpness: storing w + e in "
            f"{str(weights[0].dtype).removeprefix('torch.')} lost {share:.0%} of the SAM perturbation (along its "
            f"direction) at rho={rho:g} (its entries are below the weights' resolution). Score a float32 copy of "
            "the model (copy.deepcopy(model).float()) or use a larger rho.",
            RuntimeWarning, stacklevel=user_stacklevel(),
        )


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
            if not rows and ps.dtype in LOW_PRECISION:
                _warn_if_rounded_away(weights, step, moved, rho)
            clean = _sample_losses(model, ps, weights, inputs, targets, loss_fn)
            pert = _sample_losses(model, ps, moved, inputs, targets, loss_fn)
        rows.append((pert.double() - clean.double()).cpu())
    scores = torch.cat(rows)
    require_finite(scores, "a per-sample sharpness score")
    return scores
