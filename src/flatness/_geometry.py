"""Perturbation sets around the weights: scaling, projection, sampling.

A perturbation ``d`` of the selected parameters ``w`` lives in one of four
sets (``DESIGN.md``):

========================  ==========================================
``linf``                  ``|d_i| <= rho``
``l2``                    ``||d||_2 <= rho`` (all parameters jointly)
``adaptive_linf``         ``|d_i / w_i| <= rho``
``adaptive_l2``           ``||d / w||_2 <= rho``
========================  ==========================================

The optimizers work in *scaled coordinates* ``delta`` with ``d = c * delta``,
``c = |w|`` for adaptive sets and ``c = 1`` otherwise.  There every set is a
plain box or ball of radius ``rho``, so its Euclidean projection is exact and
cheap, and the step sizes of APGD are those of the scaled geometry, as in the
reference evaluator.  Coordinates with ``w_i = 0`` have ``c_i = 0``: they stay
unperturbed and never produce NaN.  For users who hold a perturbation in
weight space, :func:`project_weight_space` gives the exact Euclidean
projection onto the set in ``d`` (for ``adaptive_l2`` that set is an
ellipsoid, projected by solving for the Lagrange multiplier).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from . import _distributed
from ._checks import LOW_PRECISION, working_dtype

NORMS = ("linf", "l2")

__all__ = ["NORMS", "PerturbationSet", "lost_share", "project_weight_space", "rounding_loss"]


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    # One fused reduction over all tensors; float64 accumulation would cost a
    # copy, and the norms here feed step directions, not reported values.
    # Half-precision norms come out in float32: rounded to bfloat16's 8
    # bits, a projection onto the l2 ball missed the radius by up to 0.4%.
    tensors = list(tensors)
    if any(t.dtype in LOW_PRECISION for t in tensors):
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)))
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def _scale_(tensors: list[Tensor], factor: float) -> None:
    """Multiply in place by ``factor``; half-precision tensors in float32,
    piece by piece (a bfloat16 multiply rounds the factor itself to 8 bits:
    a projection then missed the radius by up to 0.2%)."""
    low = [t for t in tensors if t.dtype in LOW_PRECISION]
    rest = [t for t in tensors if t.dtype not in LOW_PRECISION]
    if rest:
        torch._foreach_mul_(rest, factor)
    for (piece,) in blocks(low):
        piece.copy_(piece.float().mul_(factor))


#: Elements per block of the fused elementwise passes on CPU: the blocks of
#: one pass (1 MiB each in float32) stay in the last-level cache, so its
#: several operations read main memory once, and a temporary such as
#: ``|w|`` never grows beyond a block.  Smaller blocks that fit in L2 cost
#: more in per-operation overhead than they save: APGD's eight-operation
#: step over 10M parameters takes 12 ms in blocks of 2**18, 16 ms in blocks
#: of 2**16 and 30 ms in blocks of 2**14 (one thread, 1 MiB of L2 per core).
#: On accelerators a larger block keeps the kernel launches few.
BLOCK = 1 << 18
DEVICE_BLOCK = 1 << 22
#: The smallest block of :func:`block_size` on CPU (256 KiB in float32).
MIN_BLOCK = 1 << 16
#: Entries per tensor on which :func:`rounding_loss` estimates what
#: rounding loses (a few million at most for a whole model).
ROUNDING_SAMPLE = 1 << 14
#: Share of a perturbation lost to rounding (:func:`lost_share`) above
#: which the measurements and the optimizers warn.
ROUNDING_WARNING = 0.1


def block_size(weights: Sequence[Tensor]) -> int:
    """Elements per piece of :func:`blocks` for passes over ``weights`` that
    keep scratch blocks (:class:`PerturbationSet`): :data:`BLOCK` on CPU,
    but no more than a 32nd of the parameters (and at least
    :data:`MIN_BLOCK`), so that a small model's scratch blocks stay a small
    share of its memory; :data:`DEVICE_BLOCK` on accelerators.  Never more
    than the largest tensor."""
    if not weights:
        return 0
    largest = max(w.numel() for w in weights)
    if weights[0].device.type != "cpu":
        return min(DEVICE_BLOCK, largest)
    return min(BLOCK, max(MIN_BLOCK, sum(w.numel() for w in weights) // 32), largest)


def blocks(*lists: Sequence[Tensor], size: int = 0) -> Iterator[tuple[Tensor, ...]]:
    """Matching pieces of same-shaped tensors, tensor by tensor, each piece
    at most ``size`` elements (default: :data:`BLOCK` on CPU,
    :data:`DEVICE_BLOCK` on accelerators; a tensor that is not contiguous in
    all lists is one piece).  Elementwise work done piece by piece gives
    exactly the values of the same work done tensor by tensor.

    A ``DTensor`` (an FSDP2 parameter, its gradient, or a tensor made like
    them) yields pieces of this rank's shard (in place, the ``DTensor``
    itself changes): elementwise work on tensors sharded alike needs no
    communication.
    """
    lists = tuple(_distributed.local_tensors(ts) for ts in lists)
    for ts in zip(*lists):
        n = ts[0].numel()
        piece = size or (BLOCK if ts[0].device.type == "cpu" else DEVICE_BLOCK)
        if n <= piece or not all(t.is_contiguous() for t in ts):
            yield ts
            continue
        flats = [t.view(-1) for t in ts]
        for s in range(0, n, piece):
            yield tuple(f[s : s + piece] for f in flats)


class PerturbationSet:
    """A norm ball around the weights, in scaled coordinates.

    Parameters
    ----------
    norm : {"linf", "l2"}
        The norm of the ball.
    rho : float
        Its radius (in scaled coordinates for adaptive sets).
    weights : sequence of Tensor
        The unperturbed parameter values ``w``.  They are referenced, not
        copied, and must not change while the set is in use.
    adaptive : bool
        Scale coordinates by ``|w|`` (ASAM-style adaptive sharpness).

    Notes
    -----
    Memory: the set stores no parameter-sized tensor.  The scales ``|w|``
    are computed block by block from the weights where they are needed
    (:func:`blocks`), and the coordinates that cannot move (``w_i = 0`` in
    an adaptive set) are kept as a list of indices, or as a one-byte mask
    for a tensor where they are more than one in eight.
    """

    def __init__(
        self, norm: str, rho: float, weights: Sequence[Tensor], *, adaptive: bool
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        self.rho = float(rho)
        self.adaptive = adaptive
        self._like = [w.detach() for w in weights]
        # scratch blocks per dtype and slot, on the weights' device
        self._scratch: dict[tuple[torch.dtype, int], Tensor] = {}
        self._device = self._like[0].device if self._like else torch.device("cpu")
        #: the piece size of this set's passes (:func:`blocks`' ``size``), and
        #: of its scratch blocks
        self.block = block_size(self._like)
        if any(w.device != self._device for w in self._like):
            self.block = 0  # weights on several devices: no shared scratch
        # Per tensor: None (every coordinate may move), the flat indices of
        # the zero weights, or a boolean mask of them.
        self._fixed: list[Tensor | None] = [None] * len(self._like)
        if adaptive:  # (of this rank's shards for FSDP2 DTensors, like _zero_unscaled_)
            self._fixed = [self._zeros_of(w) for w in _distributed.local_tensors(self._like)]
        self._spare: list[Tensor] | None = None
        self._spare_of: list[Tensor] | None = None

    def _scratch_like(self, t: Tensor, slot: int = 0) -> Tensor | None:
        """A scratch tensor shaped like one piece from :func:`blocks`,
        reused by the next call with the same ``slot`` (``None`` for a piece
        larger than a block)."""
        n = t.numel()
        if n > self.block or not t.is_contiguous():
            return None  # larger than a block: the caller allocates
        buf = self._scratch.get((t.dtype, slot))
        if buf is None:
            buf = self._scratch[(t.dtype, slot)] = torch.empty(self.block, dtype=t.dtype, device=self._device)
        return buf[:n].view(t.shape)

    def scratch_block(self, t: Tensor, slot: int = 1) -> Tensor:
        """An uninitialised tensor shaped like the piece ``t``, in the
        scratch buffer ``slot`` (slot 0 is :meth:`abs_block`'s), which the
        next call with that slot overwrites."""
        buf = self._scratch_like(t, slot)
        return torch.empty_like(t) if buf is None else buf

    def abs_block(self, w: Tensor) -> Tensor:
        """``|w|`` of one piece from :func:`blocks`, in a scratch buffer
        that the next call overwrites (no allocation per piece)."""
        buf = self._scratch_like(w)
        return w.abs() if buf is None else torch.abs(w, out=buf)

    def _zeros_of(self, w: Tensor) -> Tensor | None:
        # min |w| block by block in the scratch: a read of w at the speed of
        # a sum (count_nonzero is several times slower); the mask only where
        # a zero exists
        if w.numel() == 0:
            return None
        smallest = [self.abs_block(b).amin() for (b,) in blocks([w], size=self.block)]
        if float(torch.stack(smallest).amin()) != 0:
            return None
        count = w.numel() - int(torch.count_nonzero(w))
        mask = w == 0
        if w.is_contiguous() and 8 * count <= w.numel():
            return mask.view(-1).nonzero().squeeze(1)
        return mask

    @property
    def scales(self) -> list[Tensor] | None:
        """The scales ``c = |w|`` (``None`` for non-adaptive sets), as new
        tensors: the set itself does not store them."""
        return [w.abs() for w in self._like] if self.adaptive else None

    # -- coordinates --------------------------------------------------------

    def zeros(self) -> list[Tensor]:
        """The centre of the set, ``delta = 0``."""
        return [torch.zeros_like(w) for w in self._like]

    def to_weight_space(self, delta: Sequence[Tensor]) -> list[Tensor]:
        """``d = c * delta``."""
        if not self.adaptive:
            return list(delta)
        out = [torch.empty_like(t) for t in delta]
        for o, t, w in blocks(out, delta, self._like, size=self.block):
            torch.mul(t, self.abs_block(w), out=o)
        return out

    def grad_to_scaled_(self, grad: list[Tensor]) -> list[Tensor]:
        """Chain rule, in place: the gradient in ``delta`` is ``c * grad_d``."""
        if self.adaptive:
            for g, w in blocks(grad, self._like, size=self.block):
                g.mul_(self.abs_block(w))
        return grad

    def scaled_grad_into(self, i: int, grad: Tensor | None, out: Tensor) -> None:
        """``out = c * grad`` for the ``i``-th tensor (the chain rule of
        :meth:`grad_to_scaled_`), in one pass (``grad=None``: zero)."""
        if grad is None:
            out.zero_()
            return
        if not self.adaptive:
            out.copy_(grad)
            return
        if not grad.is_contiguous():
            out.copy_(grad)
            grad = out
        for o, g, w in blocks([out], [grad], [self._like[i]], size=self.block):
            torch.mul(g, self.abs_block(w), out=o)

    def ascent_grad_into(self, i: int, grad: Tensor | None, out: Tensor) -> None:
        """What the ascent step needs of the gradient of the ``i``-th
        tensor, written into ``out`` in one pass (``grad=None``: zero).

        l2: the gradient in scaled coordinates, ``c * grad``
        (:meth:`scaled_grad_into`).  linf: only the signs of ``c * grad``
        are used, and they are those of ``grad`` wherever ``c > 0``
        (coordinates with ``c = 0`` never move), so ``sign(grad)``: no
        multiplication, and no product of two tiny numbers rounds to zero.
        """
        if self.norm != "linf" or grad is None:
            self.scaled_grad_into(i, grad, out)
        else:
            torch.sign(grad, out=out)

    def perturbed(self, delta: Sequence[Tensor]) -> list[Tensor]:
        """New tensors ``w + c * delta``, in one pass."""
        out, of = self._spare, self._spare_of
        self._spare = self._spare_of = None
        if out is not None and of is delta:
            return out  # computed already (by the step that made delta)
        if out is None:
            out = [torch.empty_like(w) for w in self._like]
        return self.perturbed_(out, self._like, delta)

    def perturbed_block_(self, out: Tensor, w: Tensor, delta: Tensor) -> Tensor:
        """``out = w + c * delta`` for one piece from :func:`blocks`."""
        if self.adaptive:
            return torch.addcmul(w, self.abs_block(w), delta, out=out)
        return torch.add(w, delta, out=out)

    def recycle(self, buffers: list[Tensor] | None, *, holding: list[Tensor] | None = None) -> None:
        """Hand dead buffers shaped like the weights to the next
        :meth:`perturbed`, which then allocates nothing (``None``: drop
        the ones held).  ``holding``: the buffers hold ``w + c * holding``
        already, which :meth:`perturbed` of that very list returns as is."""
        self._spare, self._spare_of = buffers, holding

    def perturbed_(self, out: list[Tensor], weights: Sequence[Tensor], delta: Sequence[Tensor]) -> list[Tensor]:
        """Write ``w + c * delta`` into the buffers ``out`` (no allocation)."""
        for o, w, t in blocks(out, list(weights), delta, size=self.block):
            self.perturbed_block_(o, w, t)
        return out

    # -- geometry in scaled coordinates --------------------------------------

    def project_(self, delta: list[Tensor]) -> list[Tensor]:
        """Project ``delta`` onto the ball of radius ``rho``, in place."""
        if self.norm == "linf":
            for t in delta:
                t.clamp_(-self.rho, self.rho)
        else:
            norm = float(_global_norm(delta))
            if norm > self.rho:
                _scale_(delta, self.rho / norm)
        self._zero_unscaled_(delta)
        return delta

    def steepest_ascent_(self, grad: list[Tensor], scale: float = 1.0) -> list[Tensor]:
        """Turn ``grad`` in place into ``scale`` times the unit steepest-ascent
        direction of the norm: ``sign(g)`` for linf, ``g / ||g||_2`` for l2
        (zero where the gradient is zero)."""
        if self.norm == "linf":
            torch._foreach_sign_(grad)
            if scale != 1.0:
                torch._foreach_mul_(grad, scale)
        else:
            norm = float(_global_norm(grad))
            if norm > 0:
                torch._foreach_mul_(grad, scale / norm)
        return grad

    def direction_buffer(self, like: Sequence[Tensor]) -> list[Tensor]:
        """Buffers for :meth:`save_direction`: one byte per coordinate for
        linf (a quarter of a float32 copy), the gradient's dtype for l2."""
        dtype = torch.int8 if self.norm == "linf" else None
        return [torch.empty_like(g, dtype=dtype) for g in like]

    def save_direction(self, grad: Sequence[Tensor], into: list[Tensor] | None = None) -> list[Tensor]:
        """What :meth:`steepest_ascent_` needs of ``grad``, kept for later:
        its signs for linf, a copy for l2 (into :meth:`direction_buffer`).
        Written into ``into`` when given."""
        if into is None:
            into = self.direction_buffer(grad)
        if self.norm == "linf":
            for s, g in blocks(into, grad, size=self.block):
                buf = self._scratch_like(g)
                s.copy_(g.sign() if buf is None else torch.sign(g, out=buf))
        else:
            _distributed.foreach_copy_(into, list(grad))  # (also FSDP2 DTensors)
        return into

    def contains(self, delta: Sequence[Tensor], *, rtol: float = 1e-6) -> bool:
        """Whether ``delta`` lies in the ball (up to ``rtol``)."""
        if self.norm == "linf":
            size = max(float(t.abs().max()) if t.numel() else 0.0 for t in delta)
        else:
            size = float(_global_norm(delta))
        return size <= self.rho * (1 + rtol)

    # -- sampling ------------------------------------------------------------

    def random_start(self, generator: torch.Generator) -> list[Tensor]:
        """A point drawn uniformly from the ball (a random APGD start)."""
        if self.norm == "linf":
            delta = [self._uniform(t, generator).mul_(self.rho) for t in self._like]
        else:
            delta = [self._normal(t, generator) for t in self._like]
            self._zero_unscaled_(delta)
            # uniform in the ball of the coordinates that can move: the
            # radius is rho U^(1/n) with n counting those only (an adaptive
            # set fixes the zero weights' coordinates)
            n = sum(t.numel() for t in delta) - self._n_fixed()
            radius = self.rho * float(
                torch.rand((), generator=generator, device=self._like[0].device,
                           dtype=torch.float64) ** (1.0 / max(n, 1))
            )
            norm = _global_norm(delta)
            if norm > 0:
                torch._foreach_mul_(delta, radius / float(norm))
        self._zero_unscaled_(delta)
        return delta

    def average_case_sample(self, generator: torch.Generator) -> list[Tensor]:
        """A perturbation for average-case sharpness, in weight space:
        ``rho * c * N(0, I)`` for l2, ``rho * c * U[-1, 1]`` for linf."""
        draw = self._normal if self.norm == "l2" else self._uniform
        delta = [draw(t, generator).mul_(self.rho) for t in self._like]
        if self.adaptive:
            for t, w in blocks(delta, self._like, size=self.block):
                t.mul_(self.abs_block(w))  # in place: no second copy
        return delta

    def average_case_values(self, generator: torch.Generator) -> list[Tensor]:
        """``w + d`` for one draw ``d`` of :meth:`average_case_sample` (the
        same values), built in the draw's own buffers: one tensor of the
        parameters' size, and the scaling and the shift in one pass."""
        draw = self._normal if self.norm == "l2" else self._uniform
        values = []
        for w in self._like:
            t = draw(w, generator).mul_(self.rho)
            for tb, wb in blocks([t], [w], size=self.block):
                if self.adaptive:
                    tb.mul_(self.abs_block(wb))
                tb.add_(wb)
            values.append(t)
        return values

    # A DTensor (FSDP2) ``like`` gets the draw of its full shape, sharded:
    # the draw of a one-process run (flatness._distributed.shard_like).
    # A float16 / bfloat16 ``like`` gets the float32 draw, rounded: ``rand``
    # and ``randn`` draw another stream in another dtype, so the same seed
    # would perturb a half-precision copy of a model along other directions
    # than the float32 model (avg_l2 of a small CNN 1.6% apart in float16,
    # 0.4% with the float32 draw).
    @staticmethod
    def _uniform(like: Tensor, generator: torch.Generator) -> Tensor:
        return _distributed.shard_like(torch.rand(like.shape, generator=generator, device=like.device,
                                                  dtype=working_dtype(like.dtype)).mul_(2).sub_(1).to(like.dtype), like)

    @staticmethod
    def _normal(like: Tensor, generator: torch.Generator) -> Tensor:
        return _distributed.shard_like(torch.randn(like.shape, generator=generator, device=like.device,
                                                   dtype=working_dtype(like.dtype)).to(like.dtype), like)

    def _n_fixed(self) -> int:
        """The number of coordinates an adaptive set holds at zero (over
        all ranks for FSDP2 shards)."""
        local = sum(int(f.sum()) if f.dtype == torch.bool else f.numel() for f in self._fixed if f is not None)
        if _distributed.is_sharded(self._like):
            return int(_distributed.sum_(local))
        return local

    def _zero_unscaled_(self, delta: list[Tensor]) -> None:
        # Coordinates with w_i = 0 cannot move in an adaptive set; keeping
        # their delta at zero also keeps them from using up l2 budget.
        for i, t in enumerate(_distributed.local_tensors(delta)):
            self._zero_unscaled_one_(i, t)

    def _zero_unscaled_one_(self, i: int, t: Tensor) -> None:
        """:meth:`_zero_unscaled_` of the ``i``-th tensor alone."""
        fixed = self._fixed[i]
        if fixed is None:
            return
        if fixed.dtype == torch.bool:
            t.masked_fill_(fixed, 0)
        elif t.is_contiguous():
            t.view(-1).index_fill_(0, fixed, 0)
        else:
            t.masked_fill_(t.new_zeros(t.shape, dtype=torch.bool).view(-1)
                           .index_fill_(0, fixed, True).view(t.shape), 0)


def rounding_loss(
    weights: Sequence[Tensor], norm: str, rho: float, *, adaptive: bool, average_case: bool
) -> float:
    """:func:`lost_share` of a typical perturbation ``d`` when ``w + d`` is
    rounded to the weights' dtype.

    ``d`` is one draw: a random corner of the box, or a random point of the
    sphere, of radius ``rho`` in scaled coordinates (``c = |w|`` when
    ``adaptive``); with ``average_case``, a draw of
    :meth:`PerturbationSet.average_case_sample`.  An estimate on the first
    :data:`ROUNDING_SAMPLE` entries of each tensor (a point of the sphere
    then has entries of size ``rho / sqrt(n)``), from a private generator:
    the caller's random stream is untouched.

    Near 0 in float32 and float64 at any sensible ``rho``.  In bfloat16 (8
    significant bits) an ``adaptive_linf`` radius below ``2**-9`` is lost
    entirely: every ``w_i + d_i`` rounds back to ``w_i``, and the measured
    sharpness is 0.
    """
    weights = _distributed.local_tensors(list(weights))
    if not weights:
        return 0.0
    radius = rho
    if norm == "l2" and not average_case:
        radius = rho / max(sum(w.numel() for w in weights), 1) ** 0.5

    def triples() -> Iterator[tuple[Tensor, Tensor, Tensor]]:  # (w, d, w + d as stored)
        gen = torch.Generator(device=weights[0].device).manual_seed(0)
        for w in weights:
            work = working_dtype(w.dtype)  # (float64 weights: in float64)
            wf = w.detach().reshape(-1)[:ROUNDING_SAMPLE].to(work)
            if wf.device != gen.device:  # (weights on several devices)
                gen = torch.Generator(device=wf.device).manual_seed(0)
            if norm == "l2":
                d = torch.randn(wf.shape, generator=gen, device=wf.device, dtype=work)
            elif average_case:
                d = torch.rand(wf.shape, generator=gen, device=wf.device, dtype=work).mul_(2).sub_(1)
            else:
                d = torch.randint(0, 2, wf.shape, generator=gen, device=wf.device).to(work).mul_(2).sub_(1)
            d.mul_(radius)
            if adaptive:
                d.mul_(wf.abs())
            yield wf, d, (wf + d).to(w.dtype)

    return lost_share(triples())


def lost_share(triples: Iterable[tuple[Tensor, Tensor, Tensor]]) -> float:
    """The share of a perturbation ``d`` that rounding lost, over ``(w, d,
    moved)`` triples where ``moved`` holds ``w + d`` as stored (rounded to
    its dtype): ``1 - <d, d'> / <d, d>`` with ``d' = moved - w`` the
    perturbation that was applied, i.e. what is missing of ``d`` along its
    own direction (0: all of it applied, 1: none).

    Along the direction, because that is what a loss increase sees: the
    entries rounding zeroes are the small ones, and they carry little of
    ``<d, d>`` (a gradient-aligned ``d`` keeps most of its first-order
    ascent when many small entries vanish).  Computed in float32 (float64
    where a tensor is), one tensor's temporaries at a time."""
    kept = size = 0.0
    for w, d, moved in triples:
        work = torch.promote_types(torch.promote_types(w.dtype, d.dtype), torch.float32)
        df = d.detach().to(work)
        size += float(df.square().sum())
        kept += float(moved.detach().to(work).sub_(w.detach().to(work)).mul_(df).sum())
    return max(0.0, 1.0 - kept / size) if size > 0 else 0.0


def project_weight_space(
    d: Sequence[Tensor],
    rho: float,
    norm: str,
    scales: Sequence[Tensor] | None = None,
    *,
    tol: float = 1e-12,
    max_iter: int = 200,
) -> list[Tensor]:
    """Exact Euclidean projection of a weight-space perturbation onto a set.

    Solves ``min ||x - d||_2`` subject to ``x`` in the set
    ``{x : ||x / c||_p <= rho}`` (``c`` = ``scales``, all ones if ``None``;
    coordinates with ``c_i = 0`` must be zero).  For ``linf`` the solution is
    a clamp to ``[-rho c, rho c]``.  For ``l2`` with scales the set is an
    ellipsoid; the KKT conditions give ``x_i = d_i c_i^2 / (c_i^2 + lam)`` with
    ``lam >= 0`` the root of ``sum_i (d_i c_i / (c_i^2 + lam))^2 = rho^2``,
    found by safeguarded Newton iteration in float64.

    Parameters
    ----------
    d : sequence of Tensor
        The perturbation to project.
    rho : float
        Radius of the set.
    norm : {"linf", "l2"}
    scales : sequence of Tensor, optional
        ``|w|`` for adaptive sets.
    tol : float
        Relative tolerance on the constraint for the ellipsoid root finding.
    max_iter : int
        Iteration cap of the root finding.

    Returns
    -------
    list of Tensor
        The projection, same shapes and dtypes as ``d``.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    d = list(d)
    if scales is None:
        if norm == "linf":
            return [t.clamp(-rho, rho) for t in d]
        total = _global_norm(d)
        return [t * (rho / total) for t in d] if total > rho else [t.clone() for t in d]
    scales = list(scales)
    if norm == "linf":
        return [torch.maximum(torch.minimum(t, rho * c), -rho * c) for t, c in zip(d, scales)]
    flat_d = torch.cat([t.reshape(-1) for t in d]).double()
    flat_c = torch.cat([c.reshape(-1) for c in scales]).double()
    flat_d = torch.where(flat_c > 0, flat_d, torch.zeros_like(flat_d))
    safe_c = torch.where(flat_c > 0, flat_c, torch.ones_like(flat_c))
    if torch.linalg.vector_norm(flat_d / safe_c) <= rho:
        x = flat_d
    else:
        c2 = flat_c**2
        dc = flat_d * flat_c

        def phi(lam: float) -> tuple[float, float]:
            # phi(lam) = sum (d c / (c^2 + lam))^2 - rho^2, decreasing and convex.
            denom = c2 + lam
            r = dc / denom
            val = float((r**2).sum()) - rho**2
            deriv = float((-2 * r**2 / denom).sum())
            return val, deriv

        lo, hi = 0.0, float(torch.linalg.vector_norm(dc)) / rho  # phi(hi) <= 0
        lam = hi
        for _ in range(max_iter):
            val, deriv = phi(lam)
            if abs(val) <= tol * rho**2:
                break
            if val > 0:
                lo = lam
            else:
                hi = lam
            step = lam - val / deriv if deriv != 0 else hi
            # Newton from the right converges monotonically for a convex
            # decreasing phi; the bracket guards against round-off.
            lam = step if lo < step < hi else 0.5 * (lo + hi)
        x = flat_d * c2 / (c2 + lam)
    out, start = [], 0
    for t in d:
        n = t.numel()
        out.append(x[start : start + n].reshape(t.shape).to(t.dtype))
        start += n
    return out
