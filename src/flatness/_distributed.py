"""``torch.distributed`` support: every measurement over sharded data.

Inside an initialized process group (the usual DDP set-up: one process per
GPU, each with its own ``DistributedSampler`` shard), every function that
takes a model and data aggregates over *all* ranks' batches and returns the
same result on every rank.  Nothing has to be switched on: the library
checks ``torch.distributed.is_available() and is_initialized()`` (and a world
size above one) at the point where it aggregates.  :func:`local_only` turns
this off for a block, for calls made on one rank only or on data that is
not sharded.

Every function here is a no-op outside a process group, so single-process
results are bit for bit what they were without this module.

What is reduced is the set of running sums each measurement keeps (sample
counts, size-weighted sums of per-batch values, Hessian-vector products,
gradient moments, confusion counts); the final division happens after the
reduction, on every rank, on identical numbers.  All collectives run on the
default process group; with the NCCL backend they run on the current CUDA
device (``torch.cuda.set_device(local_rank)`` first, as DDP requires).

A rank that raises (bad data on one shard) leaves the others waiting in
their next collective until the process group's ``timeout``; give
``init_process_group`` a timeout you can live with.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from flatness._checks import LOW_PRECISION

__all__ = [
    "cat_over_ranks",
    "derive_seed",
    "dots",
    "enabled",
    "foreach_copy_",
    "gather_objects",
    "is_sharded",
    "local_tensors",
    "gather_or_raise",
    "local_only",
    "merge_moments",
    "rank",
    "rank_seed",
    "refuse_mixed",
    "refuse_sharded",
    "shard_like",
    "shared_seed",
    "sum_",
    "world_size",
]

#: Tensors up to this many entries (in all) are packed into one buffer.
_PACK_NUMEL = 1 << 16

_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("flatness_local_only", default=False)


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Measure on this process's data alone inside the block.

    By default, inside an initialized ``torch.distributed`` process group,
    every measurement all-reduces over the ranks (each rank must then make
    the same call on its own shard).  Use this block for a call made on one
    rank only (``if rank == 0: ...``) or on data every rank holds in full.

    Examples
    --------
    >>> import torch, flatness
    >>> model = torch.nn.Linear(4, 3)
    >>> batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> with flatness.local_only():
    ...     r = flatness.sharpness(model, batch, kind="linf", rho=1e-3)
    """
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def enabled() -> bool:
    """Whether measurements reduce over a process group right now."""
    if _LOCAL.get():
        return False
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def rank() -> int:
    """The rank of this process (0 outside a process group)."""
    return torch.distributed.get_rank() if enabled() else 0


def world_size() -> int:
    """Number of processes reduced over (1 outside a process group)."""
    return torch.distributed.get_world_size() if enabled() else 1


def _comm_device(ref: torch.device, group: Any = None) -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU (and CUDA) tensors.
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return ref if ref.type in ("cpu", "cuda") else torch.device("cpu")


def _all_reduce_(t: Tensor) -> None:
    dev = _comm_device(t.device)
    if t.device == dev and t.is_contiguous():
        torch.distributed.all_reduce(t)
        return
    buf = t.to(dev).contiguous()
    torch.distributed.all_reduce(buf)
    t.copy_(buf)


def sum_(*values: Any) -> Any:
    """Sum numbers and tensors over all ranks.

    Tensors are summed in place (in their own dtype, one collective each) and
    returned; Python numbers are packed into one float64 buffer (one
    collective for all of them) and returned as sums of the same type.
    ``None`` passes through.  Outside a process group the values come back
    unchanged.

    Returns
    -------
    the summed value when given one, else a tuple in the order given.
    """
    if not enabled():
        return values[0] if len(values) == 1 else values
    numbers = [v for v in values if v is not None and not isinstance(v, Tensor)]
    tensors = [v for v in values if isinstance(v, Tensor)]
    # Small tensors travel with the numbers in one float64 buffer (one
    # collective: latency dominates); large ones are reduced in place.
    small = [t for t in tensors if t.numel() <= _PACK_NUMEL]
    if sum(t.numel() for t in small) > _PACK_NUMEL:
        small = []
    dev = _comm_device(small[0].device if small else torch.device("cpu"))
    summed: list[Any] = []
    if numbers or small:
        buf = torch.cat([torch.tensor([float(v) for v in numbers], dtype=torch.float64, device=dev)]
                        + [t.detach().reshape(-1).to(dev, torch.float64) for t in small])
        torch.distributed.all_reduce(buf)
        summed = [type(v)(s) for v, s in zip(numbers, buf[: len(numbers)].tolist())]
        offset = len(numbers)
        for t in small:
            t.copy_(buf[offset : offset + t.numel()].reshape(t.shape))
            offset += t.numel()
    packed = {id(t) for t in small}
    out = []
    for v in values:
        if isinstance(v, Tensor):
            if id(v) not in packed:
                _all_reduce_(v)
            out.append(v)
        elif v is None:
            out.append(None)
        else:
            out.append(summed.pop(0))
    return out[0] if len(out) == 1 else tuple(out)


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable
    objects; ``[obj]`` outside a process group)."""
    if not enabled():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def shared_seed(seed: int | None) -> int | None:
    """The seed every rank uses for randomness that must agree across ranks
    (the random vectors of Lanczos and Hutchinson: every rank applies the
    same global operator to them).  ``None`` becomes one fresh seed drawn on
    rank 0 (from ``os.urandom``, not the global RNG) and sent to all."""
    if seed is not None or not enabled():
        return seed
    return int(gather_objects(int.from_bytes(os.urandom(8), "little") >> 1)[0])


def rank_seed(seed: int | None) -> int | None:
    """A per-rank seed for randomness that must *not* repeat across ranks
    (perturbation draws and random starts of sharpness, one stream per
    shard).  Rank 0 keeps ``seed`` itself, so a one-process run is unchanged;
    rank ``r > 0`` gets a 63-bit hash of ``(seed, r)``."""
    seed = shared_seed(seed)
    return seed if seed is None else derive_seed(seed, rank())


def derive_seed(seed: int, r: int) -> int:
    """The seed of rank ``r``'s stream in :func:`rank_seed` (``seed`` itself
    for rank 0)."""
    if r == 0:
        return seed
    digest = hashlib.sha256(f"flatness-rank-seed:{seed}:{r}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def merge_moments(moments: Any) -> None:
    """Pool streamed per-sample moments over ranks, in place.

    ``moments`` has ``n`` (sample count), ``mean`` (a list of per-parameter
    mean tensors) and ``m2`` (a list of float64 scalar sums of squared
    deviations), as kept by the Chan et al. pairwise update.  The pooled
    values are those of all ranks' samples together::

        mean = sum_r n_r mean_r / N,
        m2   = sum_r (m2_r + n_r ||mean_r - mean||^2).
    """
    if not enabled():
        return
    n_local = moments.n
    n = sum_(n_local)
    for k, (mean_r, m2_r) in enumerate(zip(moments.mean, moments.m2)):
        if mean_r is None or m2_r is None:
            raise ValueError("cannot pool moments: a rank saw no samples")
        mean = sum_(mean_r * n_local) / n
        spread = m2_r + (mean_r - mean).double().pow(2).sum() * n_local
        moments.mean[k], moments.m2[k] = mean, sum_(spread)
    moments.n = n


def _dtensor_class() -> type | None:
    """``DTensor``, or ``None`` where none can exist (no process group: a
    ``DTensor`` lives on a device mesh; this also spares single-process
    code the import)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from torch.distributed.tensor import DTensor
    except (ImportError, RuntimeError):  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor`` (FSDP2 or tensor-parallel
    parameters, their gradients, and tensors made from them)."""
    cls = _dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local_tensors(tensors: Iterable[Tensor]) -> list[Tensor]:
    """Each ``DTensor`` replaced by this rank's shard (the tensor itself, not
    a copy: in-place operations on it change the ``DTensor``); plain tensors
    pass through.

    For the elementwise work that DTensor has no sharding rule for
    (``torch._foreach_copy_``) and that needs no communication.
    """
    cls = _dtensor_class()
    if cls is None:
        return list(tensors)
    with torch.no_grad():  # the shard itself, not a differentiable view of it
        return [t.to_local() if isinstance(t, cls) else t for t in tensors]


def foreach_copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``torch._foreach_copy_(dst, src)`` that also copies ``DTensor`` shards.

    ``DTensor`` has no sharding rule for ``_foreach_copy_``; a copy between
    tensors sharded alike is the copy of each rank's shard.
    """
    if not dst:
        return
    torch._foreach_copy_(local_tensors(dst), local_tensors(src))


def dot(x: Tensor, y: Tensor) -> Tensor:
    """``<x, y>`` of two whole tensors; in float32 for float16 / bfloat16
    (a half-precision result is rounded to 3 significant digits, float16
    overflows past 65504, and the per-tensor products are then summed in
    that dtype: cancellation between tensors loses the rest).  The float32
    copies are of one tensor at a time.  Other dtypes: ``torch.dot`` as is."""
    if x.dtype in LOW_PRECISION or y.dtype in LOW_PRECISION:
        return torch.dot(x.reshape(-1).float(), y.reshape(-1).float())
    return torch.dot(x.reshape(-1), y.reshape(-1))


def dots(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """``[<x_0, y_0>, <x_1, y_1>, ...]`` as one 1-d tensor, over whole tensors
    (float32 for float16 / bfloat16 tensors, see :func:`dot`).

    For ``DTensor`` pairs (sharded alike) each rank takes the dot products
    of its shards, and one all-reduce over the mesh sums them: the result is
    a replicated ``DTensor``, usable with the sharded gradients as any
    norm of them.  (``torch.dot`` of flattened ``DTensor`` s fails where a
    dimension does not divide evenly over the ranks.)
    """
    xs, ys = list(xs), list(ys)
    if not xs:
        return torch.zeros(0)
    if not is_sharded(xs):
        return torch.stack([dot(x, y) for x, y in zip(xs, ys)])
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    spec = xs[0]
    for x, y in zip(xs, ys):
        if not (isinstance(x, DTensor) and isinstance(y, DTensor)) or not (
            x.device_mesh == spec.device_mesh and x.placements == y.placements == spec.placements
        ):
            raise TypeError("dots() needs DTensors sharded alike on one device mesh (or plain tensors)")
    xl, yl = local_tensors(xs), local_tensors(ys)
    local = torch.stack([dot(x, y) for x, y in zip(xl, yl)])
    # summed over the mesh dimensions that shard, equal over those that replicate
    partial = [Partial() if isinstance(pl, Shard) else Replicate() for pl in spec.placements]
    out = DTensor.from_local(local, spec.device_mesh, partial, run_check=False)
    return out.redistribute(spec.device_mesh, [Replicate()] * spec.device_mesh.ndim)


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (a tensor of ``like``'s global shape, the same on every rank)
    as a ``DTensor`` sharded as ``like``: each rank keeps its part, no
    communication.  A plain ``like`` gives ``full`` back.

    Random draws that must equal a single-process run are drawn on the full
    shape with a generator seeded alike on every rank, then sharded here.
    """
    cls = _dtensor_class()
    if cls is None or not isinstance(like, cls):
        return full
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    local = full
    for dim, (n, start) in enumerate(zip(shape, offset)):
        local = local.narrow(dim, start, n)
    # a copy, so that the full tensor is freed when the caller drops it
    local = local.clone(memory_format=torch.contiguous_format)
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


#: How to measure a sharded model where a function refuses it.
UNSHARDED_HINT = (
    "Measure an unsharded copy instead: load the full state dict "
    "(torch.distributed.checkpoint.state_dict.get_model_state_dict with "
    "StateDictOptions(full_state_dict=True)) into a plain model on each rank, or use DDP"
)
#: What to use instead of a SAM variant that refuses FSDP2.
SAM_HINT = (
    "SAM (also adaptive=True), GSAM, LookSAM, WSAM, FriendlySAM, ESAM, BayesianSAM and ConsistentSAM "
    "without a preconditioner step FSDP2 models; this variant needs the whole (unsharded) "
    "parameters: train it under DDP"
)


def refuse_sharded(named: list[tuple[str, Tensor]], what: str, hint: str = UNSHARDED_HINT) -> None:
    """Raise ``TypeError`` when a parameter is a ``DTensor``.

    FSDP2 (``torch.distributed.fsdp.fully_shard``) and tensor parallelism
    replace each parameter by a ``DTensor`` that holds one shard per rank.
    A function whose work needs the whole parameters (``torch.func``
    transforms, per-layer Kronecker factors, reparametrized calls that
    bypass FSDP's all-gather) calls this up front, before anything changes,
    instead of failing half-way; ``hint`` says what to do instead.
    """
    cls = _dtensor_class()
    if cls is None:
        return
    sharded = [name for name, p in named if isinstance(p, cls)]
    if sharded:
        shown = ", ".join(sharded[:3]) + (", ..." if len(sharded) > 3 else "")
        raise TypeError(
            f"{what}: sharded (DTensor) parameters are not supported (made by FSDP2's fully_shard "
            f"or tensor parallelism): {shown}. {hint}"
        )


def refuse_mixed(named: list[tuple[str, Tensor]], what: str) -> None:
    """Raise ``TypeError`` when some parameters are ``DTensor`` s and others
    plain tensors (a model sharded in part: ``fully_shard`` on some
    submodules but not on the root, whose own parameters stay plain and
    unsynchronized); global norms cannot mix the two."""
    cls = _dtensor_class()
    if cls is None:
        return
    plain = [name for name, p in named if not isinstance(p, cls)]
    if plain and len(plain) < len(named):
        shown = ", ".join(plain[:3]) + (", ..." if len(plain) > 3 else "")
        raise TypeError(
            f"{what}: some parameters are sharded (DTensor, FSDP2) and others plain tensors ({shown}); "
            "apply fully_shard to the root module too, so that every parameter is sharded"
        )


def gather_or_raise(local: Any, error: BaseException | None, what: str) -> list[Any]:
    """Gather each rank's ``local`` result, or fail on every rank together.

    For work with no collective inside its loop (sharpness over a shard):
    a rank that failed (``error``) sends ``None`` instead of its result and
    re-raises its own exception; the others raise a ``RuntimeError`` naming
    the failed ranks, instead of waiting forever for them.
    """
    parts = gather_objects(None if error is not None else local)
    if error is not None:
        raise error
    failed = [r for r, p in enumerate(parts) if p is None]
    if failed:
        raise RuntimeError(f"{what} failed on rank(s) {failed}; their own errors say why")
    return parts


def cat_over_ranks(tensor: Tensor, dim: int = 0) -> Tensor:
    """Concatenate every rank's ``tensor`` along ``dim`` in rank order (the
    shapes may differ along ``dim``); the tensor itself outside a group."""
    if not enabled():
        return tensor
    parts = gather_objects(tensor.detach().cpu())
    return torch.cat(parts, dim=dim).to(tensor.device)
