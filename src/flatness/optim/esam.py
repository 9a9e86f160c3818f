r"""ESAM: efficient sharpness-aware minimization (Du et al., ICLR 2022).

Two savings on SAM's second pass, each optional:

* stochastic weight perturbation (SWP, ``beta < 1``): each step only a
  random subset of the parameter tensors (each kept with probability
  ``beta``) takes part in the first pass and in the ascent, which is scaled
  by ``1 / beta``; the others need no weight gradient in the first pass;
* sharpness-sensitive data selection (SDS, ``gamma < 1``): the second pass
  runs on the ``gamma`` fraction of the batch whose loss rose most from
  ``w`` to ``w + e``, found with one forward pass at ``w + e`` without a
  graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatness._rng import check_seed

from . import _family as fam
from ._base import AscentGroup, ScaledDirection, SharpnessAwareOptimizer
from ._checks import MissingClosureError
from ._family_functional import esam_select, esam_swp_mask
from .sam import SAM

__all__ = ["ESAM"]


class ESAM(fam.SeededDraws, SAM):
    r"""Efficient SAM: stochastic weight perturbation and sharpness-sensitive
    data selection.

    One step:

    1. draw the SWP mask: each perturbable parameter tensor is kept with
       probability ``beta`` (at least one is kept); the others have
       ``requires_grad`` switched off for the first pass (and back on
       after it), so they get no gradient and are not perturbed;
    2. first pass at ``w`` on the whole batch, per-sample losses ``l(w)``;
    3. ``e = (rho / beta) g / ||g||`` over the kept tensors (ASAM's with
       ``adaptive=True``);
    4. if ``gamma < 1``: per-sample losses ``l(w + e)`` without a graph, and
       :attr:`sample_mask` selects the ``max(1, int(gamma B))`` samples with
       the largest ``l(w + e) - l(w)``;
    5. second pass at ``w + e`` on the selected samples (the mean of their
       losses); base step from ``w`` with that gradient (all parameters).

    ``beta = 1, gamma = 1`` is SAM, bit for bit.  Cost per step, in units
    of a plain forward-backward: ``1`` (less the skipped weight gradients) +
    one forward without graph (only if ``gamma < 1``) + ``gamma``.

    The closure takes the sample mask.  ``step(closure)`` calls
    ``closure(mask)``, which returns the **per-sample** losses of the
    samples ``mask`` selects (``mask=None``: the whole batch) without
    calling ``backward()``: ESAM backpropagates their mean itself (through
    the ``GradScaler`` if one is passed)::

        def closure(mask=None):
            xb, yb = (x, y) if mask is None else (x[mask], y[mask])
            return F.cross_entropy(model(xb), yb, reduction="none")

        opt.step(closure)

    The two-step style exposes the mask::

        with opt.first_pass():                 # applies the SWP mask
            losses = F.cross_entropy(model(x), y, reduction="none")
            losses.mean().backward()
        opt.first_step(zero_grad=True, losses=losses)
        with torch.no_grad(), opt.second_pass():
            mask = opt.select(F.cross_entropy(model(x), y, reduction="none"))
        with opt.second_pass():
            F.cross_entropy(model(x[mask]), y[mask]).backward()
        opt.second_step(zero_grad=True)

    (with ``gamma = 1`` :meth:`select` returns an all-true mask without
    needing the losses).  ``beta < 1`` needs the first pass inside
    :meth:`first_pass`, otherwise :meth:`first_step` raises.

    Follows the authors' code (``dydjw9/Efficient_SAM``, ``utils/Esam.py``)
    for the tensor-level SWP mask (the paper writes an element-wise
    Bernoulli mask; only whole tensors save backward work) and the
    ``1 / beta`` scale.  Departures: the code draws the mask at the end of
    the previous step with Python's global ``random`` (the first step then
    uses every tensor); we draw it at the start of the step from a private
    generator (``seed``), and keep at least one tensor.  The code selects
    the samples whose sharpness is strictly above the ``int(gamma B)``-th
    largest (one fewer than the fraction, and none on ties); we select
    exactly ``max(1, int(gamma B))`` with ``torch.topk``.  No ``1e-7`` in
    the ascent norm.  ``pytorch_optimizer`` has no ESAM.

    Gradient accumulation (two-step style): backpropagate the first pass
    over the micro-batches, pass the concatenated per-sample losses to
    :meth:`first_step` and the concatenated losses at ``w + e`` to
    :meth:`select`, then backpropagate the selected samples of each
    micro-batch with the loss summed and divided by the number selected.

    AMP (``scaler=``), ``same_rng`` (replayed in both passes at
    ``w + e``), ``freeze_bn`` (both passes at ``w + e``) and ``state_dict``
    work as for SAM.  Under DDP, SWP switches ``requires_grad`` per step,
    which needs ``DistributedDataParallel(..., find_unused_parameters=True)``
    and the same ``seed`` on every rank; data selection is per replica.

    Parameters
    ----------
    params, base_optimizer, adaptive, eta, same_rng, per_replica, model, freeze_bn, **base_kwargs
        As for :class:`~flatness.optim.SAM`.
    rho : float
        SAM radius (before the ``1 / beta`` scale).
    beta : float
        Probability that a parameter tensor is perturbed, in ``(0, 1]``
        (the paper: 0.6).
    gamma : float
        Fraction of the batch in the second pass, in ``(0, 1]`` (the paper:
        0.5).
    seed : int or None
        Seed of the private generator of the SWP masks (the global RNG is
        not used).
    """

    group_defaults = {"rho": 0.05, "adaptive": False, "eta": 0.0, "perturb": True}

    @dataclass
    class _StepState:
        #: The first pass ran inside first_pass() (SWP applied); first_step takes it.
        swp_applied: bool = False
        #: The per-sample losses at ``w`` given to first_step, for select().
        losses_before: Tensor | None = None

    def __init__(
        self,
        params: Iterable[Any] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        beta: float = 0.6,
        gamma: float = 0.5,
        adaptive: bool = False,
        eta: float = 0.0,
        *,
        seed: int | None = None,
        same_rng: bool = False,
        per_replica: bool = False,
        model: nn.Module | None = None,
        freeze_bn: bool = False,
        **base_kwargs: Any,
    ) -> None:
        for name, value in (("beta", beta), ("gamma", gamma)):
            fam.check_number(name, value, 0.0, 1.0)
            if value <= 0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        seed = check_seed(seed)
        super().__init__(
            params, base_optimizer, rho, adaptive, eta, same_rng=same_rng, per_replica=per_replica,
            model=model, freeze_bn=freeze_bn, **base_kwargs,
        )
        self.beta = float(beta)
        self.gamma = float(gamma)
        self._init_generator(seed)
        #: The SWP mask of the last first pass (one bool per perturbable tensor).
        self.swp_mask: tuple[bool, ...] | None = None
        #: The samples of the second pass (bool tensor over the batch); None: all.
        self.sample_mask: Tensor | None = None

    # -- SWP -----------------------------------------------------------------

    def _perturbable(self) -> list[Tensor]:
        return [p for g in self.param_groups if self.sam_settings(g)["perturb"] for p in g["params"] if p.requires_grad]

    @contextlib.contextmanager
    def first_pass(self) -> Iterator[None]:
        """Context for the forward-backward at ``w``: also switches off
        ``requires_grad`` of the tensors SWP leaves out this step (restored
        on exit, also after an error)."""
        with SharpnessAwareOptimizer.first_pass(self):
            self._stage.variant.swp_applied = False  # until this pass has run
            if self.beta >= 1.0:
                self.swp_mask = None
                self._stage.variant.swp_applied = True
                yield
                return
            params = self._perturbable()
            keep = esam_swp_mask(len(params), self.beta, self._generator)
            self.swp_mask = tuple(keep)
            off = [p for p, k in zip(params, keep) if not k]
            try:
                for p in off:
                    p.requires_grad_(False)
                yield
            finally:
                for p in off:
                    p.requires_grad_(True)
            self._stage.variant.swp_applied = True

    @torch.no_grad()
    def ascent_direction(self, groups: list[AscentGroup]) -> list[ScaledDirection]:
        """SAM's ascent over the kept tensors, with radius ``rho / beta``."""
        if self.beta != 1.0:
            groups = [fam.with_group([g], rho=g.group["rho"] / self.beta)[0] for g in groups]
        return super().ascent_direction(groups)

    def first_step(self, zero_grad: bool = False, *, scaler: Any = None, losses: Tensor | None = None) -> None:
        """Move to ``w + e``.

        Parameters
        ----------
        zero_grad, scaler
            As for :meth:`SAM.first_step`.
        losses : Tensor, optional
            The per-sample losses of the first pass (needed by
            :meth:`select` when ``gamma < 1``).
        """
        # a pass inside first_pass() feeds one first_step only
        step = self._stage.variant
        applied, step.swp_applied = step.swp_applied, False
        if self.beta < 1.0 and not applied:
            raise RuntimeError(
                "ESAM with beta < 1 needs the first forward-backward inside `with opt.first_pass():` "
                "(it draws the stochastic weight perturbation mask); step(closure) does it"
            )
        if losses is not None:
            losses = _per_sample(losses, "losses")
        step.losses_before = None if losses is None else losses.detach()
        self.sample_mask = None
        super().first_step(zero_grad, scaler=scaler)

    # -- SDS -----------------------------------------------------------------

    @torch.no_grad()
    def select(self, losses_after: Tensor | None = None) -> Tensor:
        """The samples of the second pass: the ``max(1, int(gamma B))`` with
        the largest ``l(w + e) - l(w)``.

        Parameters
        ----------
        losses_after : Tensor
            Per-sample losses at ``w + e`` (shape ``(B,)``, as the losses
            given to :meth:`first_step`).  Not needed with ``gamma = 1``.

        Returns
        -------
        Tensor
            A bool mask over the batch, also kept in :attr:`sample_mask`.
        """
        if self._stage.perturbed is None:
            raise RuntimeError("select() must be called between first_step() and second_step()")
        before = self._stage.variant.losses_before
        if self.gamma >= 1.0:
            if before is None and losses_after is None:
                raise RuntimeError("select() needs the losses (or first_step(losses=...)) to know the batch size")
            n = len(before if before is not None else losses_after)
            mask = torch.ones(n, dtype=torch.bool, device=(before if before is not None else losses_after).device)
        else:
            if before is None:
                self.restore()
                raise RuntimeError(
                    "gamma < 1 needs the per-sample losses of the first pass: first_step(losses=...)"
                )
            if losses_after is None:
                self.restore()
                raise RuntimeError("select() needs the per-sample losses at w + e when gamma < 1")
            after = _per_sample(losses_after, "losses_after")
            if after.shape != before.shape:
                self.restore()
                raise ValueError(f"losses_after has shape {tuple(after.shape)}, the first pass {tuple(before.shape)}")
            mask = esam_select(before, after, self.gamma)
        self.sample_mask = mask
        return mask

    def step(self, closure: Callable[..., Any] | None = None, *, scaler: Any = None) -> Any:  # type: ignore[override]
        """One ESAM step; ``closure(mask)`` returns the per-sample losses of
        the masked samples (``None``: all) without calling ``backward()``.

        Returns the per-sample losses at ``w`` (detached).
        """
        if closure is None or not callable(closure):
            raise MissingClosureError(
                "ESAM.step() needs a callable closure(mask) returning per-sample losses; "
                "or use first_step() / select() / second_step()"
            )
        scaled = scaler is not None and scaler.is_enabled()

        def backward(losses: Tensor) -> None:
            loss = losses.mean()
            (scaler.scale(loss) if scaled else loss).backward()

        self.zero_grad()
        with torch.enable_grad(), self.first_pass():
            before = _per_sample(closure(None), "closure(None)")
            backward(before)
        self.first_step(zero_grad=True, scaler=scaler, losses=before)
        mask = None
        if self.gamma < 1.0 and self._stage.perturbed:
            with torch.no_grad(), self.second_pass():
                after = closure(None)
            mask = self.select(after)
        with torch.enable_grad(), self.second_pass():
            backward(_per_sample(closure(mask), "closure(mask)"))
        self.second_step(scaler=scaler)
        return before.detach()


def _per_sample(losses: Any, name: str) -> Tensor:
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"{name} must be the per-sample losses, a 1-d tensor (e.g. reduction='none'), got {shape}"
        )
    return losses
