r"""Nonuniformity of the gradient noise (Zhou et al., "Beyond Sharpness", AAAI 2025).

The magnitude of the gradient noise is the trace of the per-sample gradient
covariance over ``n`` samples,

.. math::

    S = \frac1n \sum_i g_i g_i^\top - \bar g \bar g^\top, \qquad
    \operatorname{tr} S = \frac1n \sum_i \|g_i - \bar g\|^2,

where ``g_i`` is the gradient of sample ``i``'s loss.  A mini-batch of ``b``
samples drawn without replacement has gradient covariance ``a S`` with
``a = (n - b) / (b (n - 1))``; ``a tr S`` is the mini-batch noise magnitude.

* :func:`gradient_variance` computes ``tr S`` exactly from per-sample
  gradients (``torch.func.vmap``), streamed in chunks.
* :func:`kfac_variance` approximates it with Kronecker factors from one
  forward-backward pass per batch (Linear and Conv2d; other layers exactly).
* :func:`channel_gradient_norms`, :func:`update_moments` and
  :func:`class_loss_imbalance` are this library's own descriptive metrics,
  not the paper's: a README of the authors' repository names such
  quantities, but neither their code nor the paper's public abstract
  defines them, so the definitions (in :doc:`/guide/nonuniformity`) are
  ours.

All functions follow the library's conventions: ``data`` is one batch or an
iterable of batches, ``loss_fn`` is a *mean* over the batch, ``params``
selects parameters, the model comes back unchanged (also after an
exception), measurement runs in eval mode unless ``train=True``, and results
have ``to_dict()`` / ``to_json()``.
"""

from __future__ import annotations

from flatness._descriptive import (
    ChannelNormResult,
    ClassLossResult,
    UpdateMomentsResult,
    channel_gradient_norms,
    class_loss_imbalance,
    snapshot,
    update_moments,
)
from flatness._noise import VarianceResult, gradient_variance, kfac_variance, noise_factor

__all__ = [
    "ChannelNormResult",
    "ClassLossResult",
    "UpdateMomentsResult",
    "VarianceResult",
    "channel_gradient_norms",
    "class_loss_imbalance",
    "gradient_variance",
    "kfac_variance",
    "noise_factor",
    "snapshot",
    "update_moments",
]
