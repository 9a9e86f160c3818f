"""SAM on part of a batch (SharpBalance's mixed step).

SharpBalance (Lu et al., 2024) trains each ensemble member with SAM on some
samples and with plain steps on the others.  One step on a batch ``B`` whose
samples are split by a boolean ``mask`` into ``S`` (SAM) and ``P`` (plain)
uses the gradient::

    g = |P|/|B| * grad L_P(w)  +  |S|/|B| * grad L_S(w + e),
    e = ascent direction of the optimizer from grad L_S(w)

where ``L_P`` and ``L_S`` are the mean losses of the two parts, and the
base optimizer then steps from ``w`` with ``g``.  The weights are the
fractions of the batch in each part, so an all-true mask is exactly a SAM
step on the batch and an all-false mask exactly a base-optimizer step.  This
is the authors' ``mix_step`` (``normal_step`` / ``first_step`` /
``second_step`` of their ``NSAM``).

:func:`subset_sam_step` runs it with any
:class:`~flatness.optim._base.SharpnessAwareOptimizer` (``SAM``, ASAM via
``adaptive=True``, ...): the plain part's gradient is set aside with
``stash_grad()`` and added back by ``second_step()``; the perturbation,
restore and exception safety are the optimizer's own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from flatness._functional import LossFn, call_model, check_loss_fn

from ._base import SharpnessAwareOptimizer

__all__ = ["subset_sam_step"]


def _select(obj: Any, mask: Tensor) -> Any:
    return tree_map(lambda t: t[mask.to(t.device)] if isinstance(t, Tensor) and t.dim() > 0 else t, obj)


def subset_sam_step(
    optimizer: SharpnessAwareOptimizer,
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    mask: Tensor,
    loss_fn: LossFn | None = None,
) -> float:
    """One training step: SAM on the masked samples, plain on the others.

    Clears the gradients, then: forward-backward of the plain part (scaled by
    its batch fraction) and ``optimizer.stash_grad()``; forward-backward of
    the SAM part (scaled by its fraction) inside ``optimizer.first_pass()``,
    ``optimizer.first_step()``, the same at ``w + e`` inside
    ``optimizer.second_pass()``, and ``optimizer.second_step()``, which adds
    the stashed plain gradient and steps the base optimizer from ``w``.
    Without masked samples it is one base-optimizer step on the batch.

    Parameters
    ----------
    optimizer : SharpnessAwareOptimizer
        E.g. ``flatness.optim.SAM(model.parameters(), torch.optim.SGD, ...)``.
    model : nn.Module
        The model being trained (in the mode you train it in).  The two parts
        go through it in separate forward passes: BatchNorm layers in
        training mode normalize each part with its own statistics (as in the
        authors' code).
    inputs : Tensor, tuple or dict of Tensors
        The batch inputs (batch dimension first).
    targets : Tensor
        The batch targets.
    mask : Tensor
        Boolean, shape ``(batch,)``: ``True`` for the samples trained with
        SAM.  With SharpBalance's ``sam_idx`` over the dataset and a loader
        that also yields each sample's dataset index ``idx``:
        ``mask = torch.isin(idx, sam_idx)``.
    loss_fn : callable, optional
        ``loss_fn(outputs, targets)``, the mean loss of a batch (default, or
        ``None``: mean cross-entropy).

    Returns
    -------
    float
        The batch's mean loss at ``w`` (the fraction-weighted sum of the two
        parts' losses).
    """
    if not isinstance(optimizer, SharpnessAwareOptimizer):
        raise TypeError(
            "optimizer must be a flatness.optim sharpness-aware optimizer (e.g. SAM), "
            f"got {type(optimizer).__name__}"
        )
    if not isinstance(targets, Tensor) or targets.dim() == 0:
        raise ValueError("targets must be a tensor with a batch dimension")
    n = targets.shape[0]
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (n,):
        raise ValueError(
            f"mask must be a bool tensor of shape ({n},) (one entry per sample), got "
            f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
            + (f" {mask.dtype}" if isinstance(mask, Tensor) else "")
        )
    loss_fn = check_loss_fn(loss_fn)
    if optimizer.is_perturbed:
        raise RuntimeError("subset_sam_step() called between first_step() and second_step()")
    n_sam = int(mask.sum())
    frac_sam = n_sam / n
    total = 0.0
    optimizer.zero_grad()
    if n_sam < n:
        plain = ~mask
        with torch.enable_grad():
            loss = loss_fn(call_model(model, _select(inputs, plain)), targets[plain.to(targets.device)])
            (loss * (1.0 - frac_sam)).backward()
        total += float(loss.detach()) * (1.0 - frac_sam)
        if n_sam == 0:
            optimizer._base_step()  # counted as the optimizer's step (LR schedulers check it)
            optimizer.zero_grad()
            return total
        optimizer.stash_grad()
    x_sam, y_sam = _select(inputs, mask), targets[mask.to(targets.device)]
    try:
        with torch.enable_grad(), optimizer.first_pass():
            loss = loss_fn(call_model(model, x_sam), y_sam)
            (loss * frac_sam).backward()
        total += float(loss.detach()) * frac_sam
        optimizer.first_step(zero_grad=True)
        with torch.enable_grad(), optimizer.second_pass():
            (loss_fn(call_model(model, x_sam), y_sam) * frac_sam).backward()
    except BaseException:
        # w back bit for bit, and the stashed plain gradient dropped, so a
        # failed step leaves nothing behind for the next one.
        optimizer.restore()
        raise
    optimizer.second_step(zero_grad=True)
    return total
