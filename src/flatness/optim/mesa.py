r"""MESA: memory-efficient sharpness-aware training for free (Du et al.,
NeurIPS 2022, "Sharpness-Aware Training for Free")."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim import Optimizer

from flatness._checks import LOW_PRECISION, is_int, working_dtype

from . import _family as fam
from ._base import SharpnessAwareOptimizer
from ._family_functional import ema_update_, mesa_trajectory_loss

__all__ = ["MESA"]



class MESA(SharpnessAwareOptimizer):
    r"""Sharpness-aware training at the cost of one pass per step.

    MESA replaces SAM's second pass by a *trajectory loss*: the KL
    divergence between the outputs of an exponential moving average (EMA)
    of the weights and those of the current weights,

    .. math::

        \mathcal L = L(w) + \lambda \tau^2\,
            \mathrm{KL}\bigl(\operatorname{softmax}(f_{\bar w}(x)/\tau)\,\big\|\,
            \operatorname{softmax}(f_w(x)/\tau)\bigr),
        \qquad \bar w \leftarrow \mathrm{decay}\,\bar w + (1 - \mathrm{decay})\, w

    (KL summed over the last dimension, averaged over the rest), which the
    paper shows penalizes the sharpness along the training trajectory.
    You add the term to your loss with :meth:`trajectory_loss`; the
    optimizer keeps the EMA and steps the base optimizer::

        opt = MESA(model.parameters(), torch.optim.SGD, model=model, lr=0.1, momentum=0.9)

        out = model(x)
        loss = F.cross_entropy(out, y) + opt.trajectory_loss(out, x)
        loss.backward()
        opt.step()            # base step, then EMA update
        opt.zero_grad()

    or ``opt.step(closure)`` with a closure doing the same (called once).
    Before ``start_step`` steps the term is zero and costs nothing.

    Cost: one forward-backward plus one forward of the EMA weights without
    a graph per step.  Memory: one extra copy of the weights (and of the
    floating-point buffers, e.g. BatchNorm statistics), the EMA; float32
    for float16 / bfloat16 tensors (twice their size, and a copy in their
    dtype during the EMA forward), whose own dtype cannot hold a decay of
    0.9998 (the EMA would not move).

    The EMA forward uses :func:`torch.func.functional_call` on ``model``
    with the EMA weights and buffers, in eval mode (the modules' training
    flags are put back afterwards), like the authors' ``ModelEmaV2``
    teacher.  Follows the authors' code (``AngusDujw/SAF``,
    ``MESA_train.py``: ``F.kl_div(softmax(out/T).log(), softmax(ema/T))
    .sum(-1).mean() * T**2`` weighted by ``--reinforce``, EMA decay
    0.9998, KL from epoch ``kl_start_epoch``); departures: log-softmax for
    both distributions (the same value, without ``log(0)``), the start
    counted in steps.
    ``pytorch_optimizer`` has no MESA.

    AMP: pass ``scaler=`` to :meth:`step` (``scaler.step`` on the base
    optimizer; a skipped step does not update the EMA).  Gradient
    accumulation: as for any optimizer (several backward calls, one
    :meth:`step`).  DDP: each replica keeps the same EMA (its weights are
    the same); pass the DDP-wrapped or the plain model.  There is no
    ``first_step`` / ``second_step``: MESA takes one pass.

    Parameters
    ----------
    params, base_optimizer, **base_kwargs
        As for :class:`~flatness.optim.SAM`.
    model : nn.Module
        The model whose outputs :meth:`trajectory_loss` compares (its
        parameters and buffers are averaged).
    decay : float
        EMA decay in ``[0, 1)`` (the paper's code: 0.9998).
    lam : float
        Weight ``lambda`` of the trajectory loss, ``>= 0`` (paper's code
        ``--reinforce``: 0.3 on ImageNet).
    tau : float
        Temperature ``> 0`` (paper's code: 5).
    start_step : int
        Steps without the term (the paper starts after a few epochs).
    """

    group_defaults: dict[str, Any] = {}
    # its teacher runs through functional_call, which bypasses FSDP2's all-gather
    supports_sharded = False

    def __init__(
        self,
        params: Iterable[Any] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        model: nn.Module,
        decay: float = 0.9998,
        lam: float = 0.3,
        tau: float = 5.0,
        start_step: int = 0,
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        decay = fam.check_number("decay", decay, 0.0, 1.0, high_open=True)
        lam = fam.check_number("lam", lam, 0.0, float("inf"), high_open=True)
        tau = fam.check_number("tau", tau, 0.0, float("inf"), high_open=True)
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not is_int(start_step) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        super().__init__(params, base_optimizer, {}, model=model, **base_kwargs)
        self.decay = float(decay)
        self.lam = float(lam)
        self.tau = float(tau)
        self.start_step = int(start_step)
        self.mesa_step = 0
        self._net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        #: The EMA of the model's parameters and floating-point buffers, by
        #: name (float32 for float16 / bfloat16 tensors: ``decay w_ema +
        #: (1 - decay) w`` with ``decay = 0.9998`` rounds back to ``w_ema``
        #: there, and the EMA never moved).
        self.ema: dict[str, Tensor] = {
            name: t.detach().to(working_dtype(t.dtype), copy=True)
            for name, t in [*self._net.named_parameters(), *self._net.named_buffers()]
            if t.is_floating_point()
        }

    def first_step(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("MESA takes one pass per step: add trajectory_loss() to your loss and call step()")

    second_step = first_step

    # -- the EMA teacher -------------------------------------------------------

    @torch.no_grad()
    def ema_forward(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` at the EMA weights, in eval mode, without a graph."""
        modes = [(m, m.training) for m in self._net.modules()]
        self._net.eval()
        try:
            current = dict([*self._net.named_parameters(), *self._net.named_buffers()])
            # the float32 EMA of half-precision tensors in the model's dtype (a copy)
            ema = {n: t.to(current[n].dtype) if n in current and current[n].dtype in LOW_PRECISION else t
                   for n, t in self.ema.items()}
            return functional_call(self._net, ema, args, kwargs, strict=False)
        finally:
            for m, mode in modes:
                m.training = mode

    def trajectory_loss(self, outputs: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``lambda tau^2 KL(softmax(f_ema(x) / tau) || softmax(outputs / tau))``.

        Parameters
        ----------
        outputs : Tensor
            The model's outputs (logits) on the batch, with their graph.
        *args, **kwargs
            The model's inputs (``x``), for the EMA forward.

        Returns
        -------
        Tensor
            A scalar to add to the loss (zero, with no EMA forward, before
            ``start_step``).
        """
        if not isinstance(outputs, Tensor):
            raise TypeError(f"outputs must be the model's output tensor, got {type(outputs).__name__}")
        if self.mesa_step < self.start_step or self.lam == 0:
            return outputs.new_zeros(())
        teacher = self.ema_forward(*args, **kwargs)
        if not isinstance(teacher, Tensor) or teacher.shape != outputs.shape:
            raise ValueError("the model's output at the EMA weights does not have the shape of outputs")
        return mesa_trajectory_loss(outputs, teacher, self.tau, self.lam)

    # -- the step ----------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None, *, scaler: Any = None) -> Any:  # type: ignore[override]
        """Base step with the current gradients (the closure, if given, is
        called once first), then the EMA update.  Returns the closure's value."""
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._base_step(scaler)
        if not fam.skipped_by(scaler, self._all_params()):
            self._update_ema()
        self.mesa_step += 1
        return loss

    @torch.no_grad()
    def _update_ema(self) -> None:
        current = dict([*self._net.named_parameters(), *self._net.named_buffers()])
        names = [n for n in self.ema if n in current]
        ema = [self.ema[n] for n in names]
        # (a half-precision tensor is added to its float32 EMA as it is, without a float32 copy)
        now = [current[n].detach() if current[n].dtype in LOW_PRECISION and self.ema[n].dtype == torch.float32
               else current[n].detach().to(self.ema[n].dtype) for n in names]
        ema_update_(ema, now, self.decay)

    # -- state -------------------------------------------------------------------

    def extra_state_dict(self) -> dict[str, Any]:
        sd = super().extra_state_dict()
        sd["mesa_step"] = self.mesa_step
        sd["ema"] = {k: v.clone() for k, v in self.ema.items()}
        return sd

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        super().load_extra_state_dict(state)
        self.mesa_step = int(state.get("mesa_step", 0))
        for name, value in state.get("ema", {}).items():
            if name in self.ema:
                self.ema[name].copy_(value)
