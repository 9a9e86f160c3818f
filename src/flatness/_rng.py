"""Private randomness: a seeded generator that leaves the global RNG state
untouched (:func:`private_rng`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from flatness._checks import is_int


@contextlib.contextmanager
def keep_global_rng(device: torch.device) -> Iterator[None]:
    """Restore the global RNG state of the CPU (and of ``device`` if it is a
    GPU) on exit: what a ``DataLoader`` draws from it (each iteration takes
    a base seed), or dropout, does not reach the caller's stream."""
    # torch.random.fork_rng, for the CPU and this one CUDA device only, without
    # its accelerator lookup (~10 ms per call, paid by every product)
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


class RngSnapshot:
    """The global CPU RNG state plus the CUDA states of ``devices``, to
    replay the same random draws (dropout masks) in several passes."""

    def __init__(self, devices: list[torch.device]) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda:
            torch.cuda.set_rng_state(state, d)


def check_seed(seed: object, *, allow_none: bool = True) -> int | None:
    """Refuse a seed that is not an int (or ``None`` where allowed) or that
    does not fit in 64 bits: checked up front by the measurements, so that a
    bad seed fails before any work, not at the first random draw.

    Any integer is accepted (NumPy integers included, ``bool`` not) and
    returned as a Python int, the form the results' settings record.
    """
    if seed is None and allow_none:
        return None
    if not is_int(seed):
        raise TypeError(f"seed must be an int{' or None' if allow_none else ''}, got {type(seed).__name__}")
    seed = int(seed)  # type: ignore[call-overload]
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits (-2**63 <= seed < 2**64), got {seed}")
    return seed


@contextlib.contextmanager
def private_rng(seed: int | None, device: torch.device) -> Iterator[torch.Generator]:
    """A private generator seeded with ``seed``; the global RNG state is saved
    and restored, so dropout inside the measurement is reproducible from
    ``seed`` without disturbing the caller's random stream.  Inside a
    ``torch.distributed`` process group ``seed=None`` draws one seed on
    rank 0 and shares it (see :mod:`flatness._distributed`)."""
    seed = check_seed(seed)
    # Inside a process group, seed=None means one fresh seed for all ranks:
    # random vectors applied to an all-reduced operator must agree.
    from ._distributed import shared_seed

    seed = shared_seed(seed)
    with keep_global_rng(device):
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
            seed_default_generators(seed, device)  # dropout etc., inside the forked state
        yield gen


def seed_default_generators(seed: int, device: torch.device) -> None:
    """Seed the CPU's default generator and, for a CUDA ``device``, that
    device's: the generators directly, where ``torch.manual_seed`` would
    seed every CUDA device (not only one whose state the caller forked and
    restores) and record a stack trace (about 10 ms per call)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)
