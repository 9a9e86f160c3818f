r"""The arithmetic of the SAM family, as functions on lists of tensors.

The companions of :mod:`flatness.optim._functional` (SAM, ASAM, consistent
SAM, GSAM's descent gradient) for the other variants: each class of
``flatness.optim`` gathers its tensors and calls one of these; they touch no
optimizer state and can be tested on tensors alone.  Per-group arguments are
lists with one entry per param group; norms and inner products run over all
groups jointly unless said otherwise.  A zero norm gives a zero term (never
a NaN).

* WSAM (Yue et al., KDD 2023): :func:`wsam_gradient_`;
* Friendly SAM (Li et al., CVPR 2024): :func:`friendly_direction_`,
  :func:`friendly_momentum_`;
* GSAM (Zhuang et al., ICLR 2022): :func:`gsam_rho` (the radius schedule);
* LookSAM (Liu et al., CVPR 2022): :func:`looksam_orthogonal_`,
  :func:`looksam_gradient_`;
* ESAM (Du et al., ICLR 2022): :func:`esam_swp_mask`, :func:`esam_select`;
* Bayesian SAM (Moellenhoff and Khan, ICLR 2023): :func:`bsam_noise`,
  :func:`bsam_direction`, :func:`bsam_update_`;
* MESA (Du et al., NeurIPS 2022): :func:`mesa_trajectory_loss`,
  :func:`ema_update_`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flatness import _distributed
from flatness._checks import LOW_PRECISION, working_dtype

from ._functional import ScaledDirection, add_scaled, global_norm, safe_inv

__all__ = [
    "bsam_direction",
    "bsam_noise",
    "bsam_update_",
    "ema_update_",
    "esam_select",
    "esam_swp_mask",
    "friendly_direction_",
    "friendly_momentum_",
    "gsam_rho",
    "inner",
    "looksam_gradient_",
    "looksam_orthogonal_",
    "mesa_trajectory_loss",
    "wsam_gradient_",
]


def inner(a: Sequence[Sequence[Tensor]], b: Sequence[Sequence[Tensor]]) -> Tensor:
    """``<a, b>`` over all tensors of all groups, as a 0-d tensor (0 if empty)."""
    # FSDP2 DTensors: the shards' products, reduced over the mesh
    return _distributed.dots([x for xs in a for x in xs], [y for ys in b for y in ys]).sum()


def _norms(ts: Sequence[Tensor]) -> list[Tensor]:
    """The norm of each tensor: ``torch._foreach_norm``, in float32 for
    float16 / bfloat16 tensors (a float16 ``1 / ||x||^2`` overflows past
    ``||x|| < 4e-3``: an inf coefficient and a NaN direction)."""
    ts = list(ts)
    if any(t.dtype in LOW_PRECISION for t in ts):
        return list(torch._foreach_norm(ts, 2, dtype=torch.float32))
    return list(torch._foreach_norm(ts))


# -- WSAM ----------------------------------------------------------------------


@torch.no_grad()
def wsam_gradient_(
    grads: list[Tensor], first: list[Tensor], a: float, *, decouple: bool, scale: float = 1.0
) -> list[Tensor] | None:
    r"""WSAM's gradients of one group (Yue et al., KDD 2023, "Sharpness-Aware
    Minimization Revisited: Weighted Sharpness as a Regularization Term").

    WSAM minimizes :math:`L(w) + a\,(L(w + e) - L(w))`, ``a = gamma / (1 -
    gamma)``, whose gradient is :math:`g + a (g_s - g)`.  Coupled, the base
    optimizer steps with

    .. math:: (1 - a)\, g + a\, g_s ;

    decoupled (the paper's Algorithm 1) it steps with ``g`` and the
    sharpness term :math:`a (g_s - g)` is applied afterwards with the
    learning rate, ``w -= lr a (g_s - g)``.

    Parameters
    ----------
    grads : list of Tensor
        ``g_s``, the gradients at ``w + e`` (carrying a ``GradScaler``'s
        ``scale``); overwritten with the gradient of the base step.
    first : list of Tensor
        ``g``, the (unscaled) gradients at ``w``; multiplied by ``scale``
        in place.
    a : float
        ``gamma / (1 - gamma)``.
    decouple : bool
        Algorithm 1's decoupled update, or the coupled gradient.
    scale : float
        The ``GradScaler``'s scale of ``grads`` (1 without one).

    Returns
    -------
    list of Tensor or None
        Decoupled with ``a != 0``: ``g_s - g`` (unscaled, new tensors), to
        be applied as ``w -= lr a (g_s - g)``; otherwise ``None``.
    """
    if scale != 1.0:
        torch._foreach_mul_(first, scale)  # g in the scaler's units, like g_s
    sharp = None
    if decouple:
        if a:
            sharp = torch._foreach_sub(grads, first)  # g_s - g
            if scale != 1.0:
                torch._foreach_div_(sharp, scale)
        _distributed.foreach_copy_(grads, first)  # (also FSDP2 DTensor shards)
    elif a == 0:
        _distributed.foreach_copy_(grads, first)
    else:
        torch._foreach_lerp_(grads, first, 1.0 - a)  # a g_s + (1 - a) g
    return sharp


# -- Friendly SAM ----------------------------------------------------------------


@torch.no_grad()
def friendly_direction_(grads: list[Tensor], momenta: list[Tensor], sigma: float) -> None:
    r"""F-SAM's ascent direction ``d`` in place of ``grads`` (Li et al., CVPR
    2024, "Friendly Sharpness-Aware Minimization", Algorithm 1):

    .. math:: d = g - \sigma m_{t-1},

    the stochastic gradient without the moving-average estimate of the full
    gradient; the ascent is then SAM's along ``d``.
    """
    torch._foreach_add_(grads, momenta, alpha=-sigma)


@torch.no_grad()
def friendly_momentum_(momenta: list[Tensor], directions: list[Tensor], lmbda: float, sigma: float) -> None:
    r"""F-SAM's moving average of the gradient, in place (Algorithm 1):

    .. math:: m_t = \lambda m_{t-1} + (1 - \lambda) g
              = (\lambda + (1 - \lambda)\sigma)\, m_{t-1} + (1 - \lambda)\, d

    written with ``d = g - sigma m_{t-1}`` (:func:`friendly_direction_`), so
    that ``g`` need not be kept.
    """
    torch._foreach_mul_(momenta, lmbda + (1.0 - lmbda) * sigma)
    torch._foreach_add_(momenta, directions, alpha=1.0 - lmbda)


# -- GSAM ------------------------------------------------------------------------


def gsam_rho(lr: float, rho: float, rho_min: float | None, lr_min: float, lr_max: float) -> float:
    r"""GSAM's radius at learning rate ``lr`` (Zhuang et al., ICLR 2022,
    "Surrogate Gap Guided Sharpness-Aware Minimization", Algorithm 1,
    ``rho_t`` proportional to the schedule):

    .. math::

        \rho_t = \rho_{\min} + (\rho - \rho_{\min})
            \frac{\mathrm{lr} - \mathrm{lr}_{\min}}{\mathrm{lr}_{\max} - \mathrm{lr}_{\min}} .

    ``rho`` itself when ``rho_min`` is ``None`` or ``lr_max <= lr_min``;
    clamped to ``[rho_min, rho]`` (an ``lr`` outside ``[lr_min, lr_max]``
    would otherwise extrapolate, to a negative radius below ``lr_min``).
    """
    if rho_min is None or not lr_max > lr_min:
        return rho
    value = rho_min + (rho - rho_min) * ((lr - lr_min) / (lr_max - lr_min))
    return min(max(value, min(rho_min, rho)), max(rho_min, rho))


# -- LookSAM ---------------------------------------------------------------------


@torch.no_grad()
def looksam_orthogonal_(
    first: Sequence[list[Tensor]], grads: Sequence[Sequence[Tensor]], *, per_tensor: bool = False
) -> list[list[Tensor]]:
    r"""LookSAM's ``g_v``, the part of the SAM gradient orthogonal to the
    plain one (Liu et al., CVPR 2022, "Towards Efficient and Scalable
    Sharpness-Aware Minimization", Algorithm 1):

    .. math:: g_v = g_s - \frac{\langle g, g_s\rangle}{\lVert g\rVert^2}\, g .

    Parameters
    ----------
    first : list of list of Tensor
        ``g`` per group (the gradients at ``w``).  Jointly
        (``per_tensor=False``) ``g_v`` is computed in these tensors, which
        are returned.
    grads : list of list of Tensor
        ``g_s`` per group (the gradients at ``w + e``); only read.
    per_tensor : bool
        Inner products and norms per tensor (as ``pytorch_optimizer``)
        instead of over all groups; ``g_v`` in new tensors.
    """
    if per_tensor:
        out = []
        for a, b in zip(first, grads):
            # (FSDP2 DTensors: the shards' products, reduced over the mesh)
            coef = [d * safe_inv(n) ** 2 for d, n in zip(_distributed.dots(a, b).unbind(), _norms(a))]
            out.append(torch._foreach_sub(list(b), torch._foreach_mul(a, coef)))
        return out
    c = inner(first, grads) * safe_inv(global_norm(first) ** 2)
    for a, b in zip(first, grads):
        torch._foreach_mul_(a, -c.to(a[0].device))
        torch._foreach_add_(a, list(b))
    return list(first)


@torch.no_grad()
def looksam_gradient_(
    grads: Sequence[list[Tensor]],
    gvs: Sequence[list[Tensor]],
    alpha: Sequence[float],
    *,
    per_tensor: bool = False,
    gv_norm: Tensor | None = None,
) -> None:
    r"""LookSAM's gradient on the steps between two SAM steps, in place
    (Algorithm 1, with the paper's adaptive scaling):

    .. math:: g \leftarrow g + \alpha_k \frac{\lVert g\rVert}{\lVert g_v\rVert}\, g_v .

    ``grads``, ``gvs`` and ``alpha`` per group; norms over all groups, or
    per tensor with ``per_tensor=True``.  ``gv_norm``: ``||g_v||`` if
    already known (it is fixed between SAM steps).
    """
    if per_tensor:
        for a, gr, vs in zip(alpha, grads, gvs):
            ratio = [n * safe_inv(m) for n, m in zip(_norms(gr), _norms(vs))]
            torch._foreach_add_(gr, torch._foreach_mul(vs, [a * r for r in ratio]))
        return
    if gv_norm is None:
        gv_norm = global_norm(gvs)
    ratio = global_norm(grads) * safe_inv(gv_norm)
    for a, gr, vs in zip(alpha, grads, gvs):
        add_scaled(gr, vs, a * ratio.to(gr[0].device))


# -- ESAM ------------------------------------------------------------------------


def esam_swp_mask(n: int, beta: float, generator: torch.Generator) -> list[bool]:
    """ESAM's stochastic weight perturbation (Du et al., ICLR 2022, "Efficient
    Sharpness-aware Minimization for Improved Training of Neural Networks",
    Section 3.1): which of ``n`` parameter tensors are perturbed this step,
    each with probability ``beta`` (``n`` uniform draws from ``generator``),
    at least one (then one more draw picks it)."""
    keep = (torch.rand(n, generator=generator) < beta).tolist()
    if n and not any(keep):
        keep[int(torch.randint(n, (1,), generator=generator))] = True
    return keep


@torch.no_grad()
def esam_select(before: Tensor, after: Tensor, gamma: float) -> Tensor:
    r"""ESAM's sharpness-sensitive data selection (Section 3.2): the
    ``max(1, int(gamma B))`` samples with the largest
    :math:`l_i(w + e) - l_i(w)`, as a bool mask over the batch.

    ``before``, ``after``: per-sample losses at ``w`` and ``w + e``, shape ``(B,)``.
    """
    k = max(1, int(gamma * len(after)))
    idx = torch.topk(after - before, k).indices
    mask = torch.zeros(len(after), dtype=torch.bool, device=after.device)
    mask[idx] = True
    return mask


# -- Bayesian SAM ----------------------------------------------------------------


@torch.no_grad()
def bsam_noise(
    params: Sequence[Tensor], precisions: Sequence[Tensor], num_data: int, generator: torch.Generator
) -> list[Tensor]:
    r"""The weight noise of Bayesian SAM (Moellenhoff and Khan, ICLR 2023, "SAM as an
    Optimal Relaxation of Bayes", the bSAM algorithm):

    .. math:: \varepsilon \sim \mathcal N\bigl(0, \operatorname{diag}(1 / (N s))\bigr),

    one ``torch.randn`` of each parameter's shape on the CPU from
    ``generator``, in order, moved to the parameter's device (for an FSDP2
    ``DTensor`` parameter: drawn on its full shape and sharded like it, the
    noise of a one-process run).
    """
    eps = [_distributed.shard_like(torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device), p)
           for p in params]
    torch._foreach_mul_(eps, torch._foreach_rsqrt(list(precisions)))
    torch._foreach_mul_(eps, num_data**-0.5)  # (N s)^(-1/2)
    return eps


@torch.no_grad()
def bsam_direction(
    grads: list[Tensor], precisions: list[Tensor], rho: float
) -> tuple[ScaledDirection, list[Tensor]]:
    r"""Bayesian SAM's ascent ``e = rho g / s`` and the precision's increment
    :math:`\sqrt{s}\,|g|` (for :func:`bsam_update_`), ``g`` the gradient at
    ``w + eps``.  Returns ``(ScaledDirection(g / s, rho), sqrt(s) |g|)``."""
    return ScaledDirection(torch._foreach_div(grads, precisions), rho), bsam_increment(grads, precisions)


def bsam_increment(grads: list[Tensor], precisions: list[Tensor]) -> list[Tensor]:
    r"""The precision's increment :math:`\sqrt{s}\,|g|` (for :func:`bsam_update_`)."""
    gs = torch._foreach_sqrt(precisions)
    torch._foreach_mul_(gs, torch._foreach_abs(grads))
    return gs


@torch.no_grad()
def bsam_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    precisions: Sequence[Tensor],
    increments: Sequence[Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    damping: float,
) -> None:
    r"""Bayesian SAM's update of the mean ``w``, the momentum ``g_m`` and the
    precision ``s``, in place (the bSAM algorithm, as the authors' code):

    .. math::

        g_m &\leftarrow \beta_1 g_m + (1 - \beta_1)(g_e + \delta w), \qquad
        w \leftarrow w - \mathrm{lr}\; g_m / s, \\
        s &\leftarrow \beta_2 s + (1 - \beta_2)\bigl(\sqrt{s}\,|g| + \delta + \gamma\bigr)

    with ``g_e`` = ``grads`` (at ``w + e``), ``sqrt(s) |g|`` = ``increments``
    (:func:`bsam_direction`), ``delta`` the ``weight_decay`` and ``gamma``
    the ``damping``; ``w`` moves with ``s`` before its update.
    """
    b1, b2 = betas
    decay = weight_decay + damping
    for p, g, m, s, inc in zip(params, grads, momenta, precisions, increments):
        m.mul_(b1).add_(g, alpha=1 - b1).add_(p, alpha=(1 - b1) * weight_decay)
        p.addcdiv_(m, s, value=-lr)
        s.mul_(b2).add_(inc, alpha=1 - b2).add_((1 - b2) * decay)


# -- MESA ------------------------------------------------------------------------


def mesa_trajectory_loss(outputs: Tensor, teacher: Tensor, tau: float, lam: float) -> Tensor:
    r"""MESA's trajectory loss (Du et al., NeurIPS 2022, "Sharpness-Aware
    Training for Free"):

    .. math::

        \lambda \tau^2\, \mathrm{KL}\bigl(\operatorname{softmax}(f_{\bar w}(x)/\tau)
            \,\big\|\, \operatorname{softmax}(f_w(x)/\tau)\bigr),

    KL summed over the last dimension and averaged over the others, with
    ``outputs`` = :math:`f_w(x)` (differentiated) and ``teacher`` =
    :math:`f_{\bar w}(x)` (the EMA weights' outputs).  Float16 / bfloat16
    outputs are computed in float32 (the loss is float32).
    """
    # float16 / bfloat16 logits: in float32 (a float32 loss).  In their dtype
    # the log-probabilities carry errors of ~1e-2 while the KL between the
    # near teacher and student is ~1e-3: the loss was 109% and its gradient
    # 60% off float64 (bfloat16)
    dtype = working_dtype(outputs.dtype)
    log_p = F.log_softmax(outputs.to(dtype) / tau, dim=-1)
    log_q = F.log_softmax(teacher.to(dtype) / tau, dim=-1)
    kl = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1).mean()
    return lam * tau**2 * kl


@torch.no_grad()
def ema_update_(ema: list[Tensor], current: list[Tensor], decay: float) -> None:
    r"""MESA's exponential moving average of the weights, in place:
    :math:`\bar w \leftarrow \mathrm{decay}\, \bar w + (1 - \mathrm{decay})\, w`
    (two fused passes, as timm's ``ModelEmaV2``; ``_foreach_lerp_`` is ~2x
    slower than both on CPU)."""
    if ema:
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, current, alpha=1.0 - decay)
