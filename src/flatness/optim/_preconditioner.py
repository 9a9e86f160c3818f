"""K-FAC preconditioning of an ascent direction, as an object an optimizer holds.

:class:`~flatness.optim.ConsistentSAM` (``preconditioner="kfac"``) and
:class:`~flatness.optim.NonuniformSAM` each hold one
:class:`KFACPreconditioner` and call it at four points of a step::

    with opt.first_pass():        kfac.recording()   capture the layers' inputs
        loss.backward()                              and output gradients
    opt.first_step()              kfac.fold(...)     new factors, pending
        ... F^-1 v ...            kfac.solve(...)    uses the pending factors
    opt.second_step()             kfac.finish(...)   commit them (or, on a skipped
                                                     step, drop them); count the step
    opt.restore()                 kfac.discard()     drop them

so a step that fails, is abandoned or is skipped by a ``GradScaler``
leaves the factors and the step count as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flatness import _distributed
from flatness._kfac import RunningFactors, capture

__all__ = ["KFACPreconditioner"]


class KFACPreconditioner:
    """Running Kronecker factors of a model's layers, refreshed every
    ``update_freq`` steps, and the natural direction ``F^-1 v``.

    Parameters
    ----------
    model : nn.Module or None
        The model whose Linear / Conv2d layers are hooked; ``None``: no
        preconditioning (only the step count is kept; :meth:`solve` raises).
    params : list of Tensor
        The parameters to precondition.
    damping, stat_decay : float
        See :class:`flatness._kfac.RunningFactors`.
    update_freq : int
        Capture the factors in the first pass of every ``update_freq``-th step.
    state : dict
        Where the running factors live (the optimizer's ``extra_state``).
    """

    def __init__(
        self,
        model: nn.Module | None,
        params: list[Tensor],
        *,
        damping: float,
        stat_decay: float,
        update_freq: int,
        state: dict[Tensor, dict],
    ) -> None:
        self.factors: RunningFactors | None = None
        if model is not None:
            self.factors = RunningFactors(model, params, damping=damping, stat_decay=stat_decay, state=state)
        self.update_freq = update_freq
        #: Steps taken (with a first pass), saved with the optimizer's state.
        self.steps = 0
        self._counted = False  # the current step had a first pass
        self._store: dict[str, list[list[Tensor]]] | None = None  # captured, not yet folded
        self._samples: dict[str, list[int | None]] = {}  # the samples of each captured call

    def __getstate__(self) -> dict[str, Any]:
        # the factors hook the model's layers: an unpickled copy has none
        return {**self.__dict__, "factors": None, "_counted": False, "_store": None, "_samples": {}}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Context for the first forward-backward: records the layers'
        inputs and output gradients (every ``update_freq`` steps)."""
        self.discard()  # left by a step given up without restore()
        if self.factors is None or self.steps % self.update_freq:
            yield
        else:
            samples: dict[str, list[int | None]] = {}
            with capture(self.factors.layers, root=self.factors.root, samples=samples) as store:
                yield
            self._store, self._samples = store, samples
        self._counted = True

    def fold(self, scaler: Any, *, pool: bool) -> None:
        """Fold what :meth:`recording` captured into new (pending) factors.

        The output gradients are those of ``scaler.scale(loss)``: the scale
        is divided out.  ``pool``: average the factors over the DDP replicas
        (a collective: every rank folds, before any inf/NaN check).
        """
        store, self._store = self._store, None
        if store is None or self.factors is None:
            return
        samples, self._samples = self._samples, {}
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self.factors.update(store, pool=pool, grad_scale=scale, samples=samples)

    def finish(self, skipped: bool) -> None:
        """End of the step: commit the pending factors and count the step,
        or, if the base step was skipped, leave both as they were."""
        if skipped:
            self.discard()
        elif self.factors is not None:
            self.factors.commit()
        self.steps += self._counted
        self._counted = False

    def discard(self) -> None:
        """Abandon the step: the pending factors are dropped."""
        self._counted = False
        self._store = None
        self._samples = {}
        if self.factors is not None:
            self.factors.discard()

    def reset(self, steps: int, state: dict[Tensor, dict]) -> None:
        """After a ``load_state_dict``: the loaded step count and factors."""
        self.steps = steps
        self._counted = False
        self._store = None
        self._samples = {}
        if self.factors is not None:
            self.factors.state = state
            self.factors._eig = {}
            self.factors.pending = {}

    @torch.no_grad()
    def solve(
        self, params: Sequence[Sequence[Tensor]], vecs: Sequence[Sequence[Tensor]]
    ) -> tuple[list[list[Tensor]], Tensor]:
        """``F^-1 v`` per parameter (zero outside the factored layers) and
        ``sqrt(v^T F^-1 v)``, for ``v`` given per group like ``params``.

        Raises ``RuntimeError`` without a hooked model or without factors.
        """
        if self.factors is None:
            raise RuntimeError(
                "preconditioner='kfac' has no hooked model: a pickled optimizer keeps no model; "
                "build a new optimizer on the model and load_state_dict() the saved state"
            )
        if not self.factors.ready():
            raise RuntimeError(
                "preconditioner='kfac' has no Kronecker factors yet: run the first forward-backward "
                "inside `with opt.first_pass():` (step(closure) does it)"
            )
        solved = self.factors.solve({p: v for ps, vs in zip(params, vecs) for p, v in zip(ps, vs)})
        out = [[solved.get(p, torch.zeros_like(v)) for p, v in zip(ps, vs)] for ps, vs in zip(params, vecs)]
        # float32 products for half-precision vectors (float16 overflows past
        # 65504, and a per-tensor sum rounded to 3 digits cancels)
        dots = _distributed.dots([v for vs in vecs for v in vs], [s for ss in out for s in ss])
        if not len(dots):
            return out, torch.zeros(())
        return out, dots.sum().clamp_min(0).sqrt()
