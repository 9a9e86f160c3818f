r"""Bayesian SAM (bSAM, Moellenhoff and Khan, ICLR 2023, "SAM as an
Optimal Relaxation of Bayes")."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatness import _distributed
from flatness._checks import is_int, working_dtype
from flatness._rng import check_seed

from . import _family as fam
from ._base import AscentGroup, SharpnessAwareOptimizer, global_norm
from ._family_functional import bsam_direction, bsam_increment, bsam_noise, bsam_update_

__all__ = ["BayesianSAM"]


class _BayesUpdate(Optimizer):
    """bSAM's Adam-like update of the mean ``w`` and the precision ``s``
    (the base optimizer of :class:`BayesianSAM`; it reads ``state["gs"]``,
    set by :meth:`BayesianSAM.first_step`)."""

    def __init__(self, params: Any, lr: float, betas: tuple[float, float], weight_decay: float,
                 damping: float, s_init: float) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay,
                                  "damping": damping, "s_init": s_init})

    def precision(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        """``s`` of ``p``: float32 for a float16 / bfloat16 ``p`` (its
        update ``s <- beta_2 s + (1 - beta_2) ...``, ``beta_2 = 0.999``,
        rounds back to ``s`` in bfloat16: the precision never moved)."""
        state = self.state[p]
        if "s" not in state:
            state["s"] = torch.full_like(p, float(group["s_init"]), dtype=working_dtype(p.dtype),
                                         memory_format=torch.preserve_format)
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["s"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and "gs" in self.state[p]]
            precisions = [self.precision(p, group) for p in params]
            bsam_update_(
                params, [p.grad for p in params], [self.state[p]["momentum"] for p in params], precisions,
                [self.state[p].pop("gs") for p in params], lr=group["lr"], betas=group["betas"],
                weight_decay=group["weight_decay"], damping=group["damping"],
            )
        return None


class BayesianSAM(fam.SeededDraws, SharpnessAwareOptimizer):
    r"""Bayesian SAM: SAM as a relaxation of Bayes, with a Gaussian
    posterior ``N(w, diag(1 / (N s)))``.

    One step (the authors' code, ``team-approx-bayes/bayesian-sam``,
    ``optim.py``, ``build_bsam_optimizer``, with ``msharpness = 1``):

    .. math::

        \varepsilon &\sim \mathcal N\bigl(0, \operatorname{diag}(1 / (N s))\bigr), \qquad
        g = \nabla L(w + \varepsilon), \\
        e &= \rho\, g / s, \qquad g_e = \nabla L(w + e), \\
        g_m &\leftarrow \beta_1 g_m + (1 - \beta_1)(g_e + \delta w), \qquad
        w \leftarrow w - \mathrm{lr}\; g_m / s, \\
        s &\leftarrow \beta_2 s + (1 - \beta_2)\bigl(\sqrt{s}\,|g| + \delta + \gamma\bigr)

    with ``N`` the number of training examples, ``delta`` the prior
    precision (``weight_decay``), ``gamma`` the ``damping`` and ``s``
    starting at ``s_init``.  The update of ``w`` uses ``s`` before its
    update, as the code.  :meth:`posterior_variance` returns
    ``1 / (N s)`` for uncertainty estimates (sample weights from it, or
    use :meth:`sample`).  Cost: two forward-backward passes, as SAM, plus
    the noise draw; memory: ``s`` and ``g_m`` (as Adam).

    bSAM is its own optimizer: no ``base_optimizer`` (the update above is
    the base step).  The noise comes from a private generator (``seed``;
    ``torch.randn`` of each parameter's shape on the CPU, in
    ``param_groups`` order), the global RNG is untouched.  Departures from
    the code: ``msharpness`` (one noise sample and perturbation per
    sub-batch) is 1 (under DDP, ``per_replica=True`` perturbs per replica);
    the learning-rate factor is the usual ``lr`` (schedulers work).
    ``pytorch_optimizer.BSAM`` departs from the paper and the code (its
    momentum averages ``weight_decay * g`` instead of ``g_e + delta w``, its
    noise has standard deviation ``1 / (N s)`` rather than
    ``(N s)^(-1/2)``, it squares the precision increment, and it neither
    removes the noise nor the ascent before the update), so its trajectory
    is not compared.

    Call styles: ``step(closure)`` (the closure runs at ``w + eps`` and at
    ``w + e``), or::

        with opt.first_pass():        # moves to w + eps
            loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)  # to w + e
        with opt.second_pass():
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)  # back to w, update w and s

    ``GradScaler`` (``scaler=``), ``same_rng``, ``freeze_bn``, DDP and
    ``state_dict`` work as for SAM (with ``per_replica=True`` the
    precision's increment ``sqrt(s) |g|`` is averaged over the replicas,
    so ``s`` stays the same on all).  A param group with ``perturb=False``
    gets neither noise nor ascent (``eps = e = 0``); its ``w`` and ``s`` are
    updated as everywhere else.

    Parameters
    ----------
    params : iterable
        Parameters or param groups (groups may set ``lr``, ``rho``, ...).
    num_data : int
        ``N``, the number of training examples.
    lr : float
        Learning rate (the paper: 0.5 for ResNets on CIFAR with ``s_init=1``).
    betas : (float, float)
        ``beta_1``, ``beta_2``.
    weight_decay : float
        Prior precision ``delta``.
    rho : float
        Ascent radius (in the ``s`` metric).
    damping : float
        ``gamma`` (the code: 0.1).
    s_init : float
        Initial precision (the code: 1).
    seed : int or None
        Seed of the noise generator.
    """

    group_defaults = {"rho": 0.05, "perturb": True}

    @dataclass
    class _StepState:
        #: The groups now at ``w + eps``: a first pass inside first_pass()
        #: ran (first_step takes them).
        noisy: list[AscentGroup] | None = None

    def __init__(
        self,
        params: Iterable[Any],
        num_data: int,
        lr: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        rho: float = 0.05,
        damping: float = 0.1,
        s_init: float = 1.0,
        *,
        seed: int | None = None,
        same_rng: bool = False,
        per_replica: bool = False,
        model: nn.Module | None = None,
        freeze_bn: bool = False,
    ) -> None:
        if not is_int(num_data) or num_data < 1:
            raise ValueError(f"num_data must be a positive int, got {num_data!r}")
        # Python floats in the base's param groups (a NumPy scalar in a
        # state_dict() does not load with torch.load(weights_only=True))
        lr = fam.check_number("lr", lr, 0.0, float("inf"), high_open=True)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
        betas = tuple(fam.check_number(f"betas[{i}]", b, 0.0, 1.0, high_open=True) for i, b in enumerate(betas))
        weight_decay = fam.check_number("weight_decay", weight_decay, 0.0, float("inf"), high_open=True)
        damping = fam.check_number("damping", damping, 0.0, float("inf"), high_open=True)
        s_init = fam.check_number("s_init", s_init, 0.0, float("inf"), high_open=True)
        if not s_init > 0:
            raise ValueError(f"s_init must be > 0, got {s_init}")
        seed = check_seed(seed)
        super().__init__(
            params, _BayesUpdate, {"rho": rho, "perturb": True}, same_rng=same_rng, per_replica=per_replica,
            model=model, freeze_bn=freeze_bn, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
            damping=damping, s_init=s_init,
        )
        self.num_data = int(num_data)
        self._init_generator(seed)

    def _groups(self) -> list[AscentGroup]:
        out = []
        for group in self.param_groups:
            settings = self.sam_settings(group)
            if settings["perturb"]:
                params = [p for p in group["params"] if p.requires_grad]
                if params:
                    out.append(AscentGroup(settings, params, []))
        return out

    def _precisions(self, groups: list[AscentGroup]) -> list[list[Tensor]]:
        base: _BayesUpdate = self.base_optimizer  # type: ignore[assignment]
        return [[base.precision(p, g.group) for p in g.params] for g in groups]

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`SharpnessAwareOptimizer.load_state_dict`; the float32
        precision ``s`` of a float16 / bfloat16 parameter stays float32
        (``torch.optim`` casts every floating state to its parameter's dtype)."""
        saved: dict[Any, Any] = {}
        ids: list[Any] = []
        if isinstance(state_dict, dict):  # (anything else: the base class's error)
            if isinstance(state_dict.get("state"), dict):
                saved = {i: v.get("s") for i, v in state_dict["state"].items() if isinstance(v, dict)}
            groups = state_dict.get("param_groups", [])
            ids = [i for g in groups if isinstance(g, dict) for i in g.get("params", [])] if isinstance(
                groups, list) else []
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids if len(ids) == len(params) else [None] * len(params), params):
            state = self.state[p]
            if "s" in state and state["s"].dtype != working_dtype(p.dtype):
                s = saved.get(i) if isinstance(saved.get(i), Tensor) else state["s"]
                state["s"] = s.to(dtype=working_dtype(p.dtype), device=p.device, copy=True)

    @torch.no_grad()
    def posterior_variance(self) -> list[Tensor]:
        """``1 / (N s)`` for every parameter (``param_groups`` order)."""
        base: _BayesUpdate = self.base_optimizer  # type: ignore[assignment]
        return [1.0 / (self.num_data * base.precision(p, g)) for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def sample(self, generator: torch.Generator | None = None) -> list[Tensor]:
        """One draw ``w + eps`` from the posterior (new tensors; the
        weights are not changed)."""
        gen = generator if generator is not None else self._generator
        params = [p for g in self.param_groups for p in g["params"]]
        # drawn on the full shape and sharded like an FSDP2 parameter
        return [(p + _distributed.shard_like(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device), p)
                 * v.sqrt()).to(p.dtype) for p, v in zip(params, self.posterior_variance())]

    @contextlib.contextmanager
    def first_pass(self) -> Iterator[None]:
        """Context for the forward-backward at ``w + eps``: samples the
        noise and moves the weights there (restored on error).  Required:
        :meth:`first_step` raises without it."""
        with SharpnessAwareOptimizer.first_pass(self):
            groups = self._groups()
            noise = []
            for g, ss in zip(groups, self._precisions(groups)):
                noise.append(bsam_noise(g.params, ss, self.num_data, self._generator))
            self.perturb(groups, noise)
            try:
                yield
            except BaseException:
                self.restore()
                raise
            self._stage.variant.noisy = groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        """From ``w + eps`` to ``w + e``, ``e = rho g / s``."""
        # a pass inside first_pass() feeds one first_step only
        step = self._stage.variant
        groups, step.noisy = step.noisy, None
        if groups is None:
            self.restore()
            raise RuntimeError(
                "BayesianSAM needs the first forward-backward inside `with opt.first_pass():` "
                "(it samples the weights); step(closure) does it"
            )
        try:
            if scaler is not None and scaler.is_enabled():
                scaler.unscale_(self)
            grads = [fam.current_grads(g.params) for g in groups]
            # groups with perturb=False: no noise and no ascent, but w and s
            # are updated as everywhere else, so s needs their increment too
            still = self.unperturbed_groups()
            still_grads = [fam.current_grads(g.params) for g in still]
            if scaler is not None and scaler.is_enabled():
                if not bool(torch.isfinite(global_norm(grads + still_grads, ord=float("inf")))):
                    self._stage.skip_base_step = True
                    self.perturb(groups, [[torch.zeros_like(p) for p in g.params] for g in groups])
                    return
            base: _BayesUpdate = self.base_optimizer  # type: ignore[assignment]
            for g, gr, ss in zip(still, still_grads, self._precisions(still)):
                for p, v in zip(g.params, bsam_increment(gr, ss)):
                    base.state[p]["gs"] = v
            directions = []
            for g, gr, ss in zip(groups, grads, self._precisions(groups)):
                e, gs = bsam_direction(gr, ss, g.group["rho"])  # rho g / s, sqrt(s) |g|
                for p, v in zip(g.params, gs):
                    base.state[p]["gs"] = v
                directions.append(e)
            # per_replica: each replica's |g| went into its own increment; s
            # (and so the step) must be the same on every replica
            self.share_first_pass_([base.state[p]["gs"] for p in self._all_params() if "gs" in base.state[p]])
            self.perturb(groups, directions)
        except BaseException:
            self.restore()
            raise
        finally:
            if zero_grad:
                self.zero_grad()
