"""The step in progress of a sharpness-aware optimizer, as one object.

:class:`_Stage` is everything the base class remembers between
``first_step`` and ``second_step``: which parameters are at ``w + e``, the
saved ``w``, the ``GradScaler``'s skip flag, gradients stashed at ``w``, the
first pass's RNG state and the variant's own per-step fields (an instance of
its ``_StepState`` dataclass).  It is never saved or pickled; one
:meth:`_Stage.clear` (``restore()``, the end of ``second_step()``) resets
all of it.  Also here: the
fused ``w += scale * e`` of :meth:`~SharpnessAwareOptimizer.perturb` and the
wrapper that keeps the stage methods eager inside ``torch.compile``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from flatness import _distributed
from flatness._guard import disable_running_stats
from flatness._rng import RngSnapshot


def _rng_devices(params: Iterable[Tensor]) -> list[torch.device]:
    return sorted({p.device for p in params if p.device.type == "cuda"}, key=str)


@dataclass
class _NoStepState:
    """The per-step fields of a variant that keeps none (``_StepState`` of
    the base class).  A variant with fields declares its own dataclass, every
    field with the value it has between steps."""


@dataclass
class _Stage:
    """Where the step in progress stands: the only per-step state of an
    optimizer, the base class's and the variant's.

    Never saved or pickled.  ``perturbed is None`` means the weights are
    ``w``; otherwise ``perturbed`` holds the parameters now at ``w + e`` and
    ``saved_w`` the copy of ``w`` they go back to (buffers reused from step
    to step while the parameters stay the same).  ``variant`` holds the
    variant's own per-step fields, a fresh ``new_variant()`` after every
    :meth:`clear`.
    """

    #: The variant's ``_StepState`` class (called with no arguments).
    new_variant: Callable[[], Any] = _NoStepState

    perturbed: list[Tensor] | None = None
    saved_w: list[Tensor] = field(default_factory=list)
    saved_ids: tuple[int, ...] = ()
    #: The GradScaler found inf/NaN in the first pass: no base step.
    skip_base_step: bool = False
    #: Gradient terms taken at ``w`` (:meth:`~SharpnessAwareOptimizer.stash_grad`).
    stash: dict[Tensor, Tensor] = field(default_factory=dict)
    #: The RNG state of the first pass (``same_rng=True``).
    rng: RngSnapshot | None = None
    #: The variant's per-step fields (e.g. GSAM's copy of ``g``).
    variant: Any = field(init=False)

    def __post_init__(self) -> None:
        self.variant = self.new_variant()

    def save(self, params: list[Tensor]) -> None:
        """Copy ``w`` of ``params`` aside and mark them perturbed."""
        ids = tuple(map(id, params))
        if ids != self.saved_ids:
            self.saved_w = [torch.empty_like(p) for p in params]
            self.saved_ids = ids
        _distributed.foreach_copy_(self.saved_w, params)  # (also FSDP2 DTensor shards)
        self.perturbed = params

    def put_back(self) -> None:
        """Copy the saved ``w`` back (bit for bit); the weights are ``w`` again."""
        if self.perturbed:
            _distributed.foreach_copy_(self.perturbed, self.saved_w)
        self.perturbed = None

    def clear(self) -> None:
        """Put ``w`` back and forget the step, the variant's fields included
        (the buffers are kept)."""
        self.put_back()
        self.stash = {}
        self.rng = None
        self.skip_base_step = False
        self.variant = self.new_variant()

    def finish(self) -> bool:
        """End the step: put ``w`` back, add the stashed gradients back,
        forget the rest (:meth:`clear`).  Returns whether the base step is
        to be skipped (the ``GradScaler`` found inf/NaN)."""
        skip = self.skip_base_step
        self.put_back()
        self.unstash()
        self.clear()
        return skip

    @torch.no_grad()
    def stash_grads(self, params: Iterable[Tensor]) -> None:
        """Move the ``.grad`` of ``params`` into :attr:`stash` (accumulating)."""
        for p in params:
            if p.grad is None:
                continue
            held = self.stash.get(p)
            if held is None:
                self.stash[p] = p.grad
            else:
                held.add_(p.grad)
            p.grad = None

    @torch.no_grad()
    def unstash(self) -> None:
        """Add the stashed terms back to the gradients and empty the stash."""
        stash, self.stash = self.stash, {}
        have = [(p, s) for p, s in stash.items() if p.grad is not None]
        if have:
            torch._foreach_add_([p.grad for p, _ in have], [s for _, s in have])
        for p, s in stash.items():
            if p.grad is None:
                p.grad = s


#: Methods that change the weights or the optimizer's bookkeeping; they run
#: eagerly inside torch.compile'd code.
_EAGER_STAGES = ("first_step", "middle_step", "second_step", "restore", "perturb", "stash_grad")


def run_stages_eagerly(cls: type) -> None:
    """Wrap the stage methods a class defines in ``torch.compiler.disable``.

    Called for every subclass (``__init_subclass__``).  The stages that change
    the weights or the step's bookkeeping then run eagerly inside a compiled
    training step, between the compiled graphs of the forward and backward
    passes, so no traced graph can skip their side effects.  The lazy form,
    ``torch._disable_dynamo``, imports ``torch._dynamo`` at the first call
    only.  ``step`` is disabled for its own frame only (``recursive=False``),
    so the closure it calls, the model's forward and backward, is compiled;
    the base optimizer's step runs eagerly inside ``second_step``.
    """
    for name in (*_EAGER_STAGES, "step"):
        # also stages inherited from a mixin that is not a subclass
        fn = getattr(cls, name, None)
        if fn is None or getattr(fn, "_flatness_eager", False):
            continue
        # torch's lazy form of torch.compiler.disable (as torch.optim uses for
        # zero_grad): torch._dynamo is imported at the first call, not here
        eager = torch._disable_dynamo(fn, recursive=name != "step")
        eager._flatness_eager = True  # type: ignore[attr-defined]
        setattr(cls, name, eager)


@contextlib.contextmanager
def first_pass(opt: Any) -> Iterator[None]:
    """:meth:`~SharpnessAwareOptimizer.first_pass` of ``opt``: record the
    RNG state (``same_rng``), run inside ``model.no_sync()`` (``per_replica``)."""
    if opt._stage.perturbed is not None:
        raise RuntimeError("first_pass() entered while perturbed: call second_step() first")
    opt._stage.rng = RngSnapshot(_rng_devices(opt._all_params())) if opt.same_rng else None
    with opt.model.no_sync() if opt._local_first_pass() else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def second_pass(opt: Any) -> Iterator[None]:
    """:meth:`~SharpnessAwareOptimizer.second_pass` of ``opt``: replay the
    first pass's RNG state (``same_rng``), freeze BatchNorm statistics
    (``freeze_bn``), restore ``w`` if the block raises."""
    if opt._stage.perturbed is None:
        raise RuntimeError("second_pass() entered without first_step()")
    if opt.same_rng:
        if opt._stage.rng is None:
            opt.restore()
            raise RuntimeError(
                "same_rng=True: run the first forward pass inside `with opt.first_pass():`"
            )
        opt._stage.rng.restore()
    try:
        with disable_running_stats(opt.model) if opt.freeze_bn else contextlib.nullcontext():
            yield
    except BaseException:
        opt.restore()
        raise


@torch.no_grad()
def mean_over_replicas_(tensors: Sequence[Tensor], group: Any = None) -> None:
    """Average ``tensors`` over the processes of ``group``, in place, with
    one all-reduce (a no-op outside ``torch.distributed`` or with one process)."""
    import torch.distributed as dist

    if not tensors or not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat.div_(world)
    views = [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
    torch._foreach_copy_(list(tensors), views)
