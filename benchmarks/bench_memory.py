"""Peak memory of the library's heavy operations, as a multiple of the parameter size.

For each operation: the model, the data (and an optimizer with its state)
are set up first; the peak memory *above* that baseline while the operation
runs is reported, divided by ``P``, the bytes of the model's parameters.
The model is a wide MLP run on a small batch, so parameter-sized tensors
dominate and activations are a small part of every number (the plain
forward-backward row shows how much they are).

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
  (exact: the caching allocator's live tensors).
* CPU: the process's resident-set high-water mark (``VmHWM``), reset before
  each operation through ``/proc/self/clear_refs`` (Linux).  tracemalloc
  does not see torch's allocations.  Large tensors are ``mmap``-ed by the
  C allocator and returned on free, so the high-water mark tracks them; it
  also counts anything else the process touches (a lazy import on the first
  call), so every operation runs once on a tiny model first.

"state held" is what the set-up leaves allocated for the operation (the
optimizer's momentum and, for SAM, its saved copy of the weights); "peak in
op" is the extra peak while the operation runs.  What each row should be,
from the algorithms:

* forward-backward: the gradients (1 P) plus activations.
* SGD step (momentum): the gradients (1 P); the momentum exists already.
* SAM step: gradients (1 P) + the saved weights (1 P) + the perturbation
  (1 P, freed before the base step) + activations.
* APGD sharpness: a fixed set of parameter-sized buffers, independent of
  ``n_iters`` and the same for adaptive kinds (``|w|`` is never stored):
  the iterate, the previous iterate and the best iterate (three buffers at
  most, shared while two of them are equal), what a restart needs of the
  best point's gradient (its signs, a quarter of ``P``, for linf; a copy
  for l2), and the perturbed weights, whose buffers the gradient takes over
  as backpropagation completes it (plus the one layer's gradient in
  flight): 4.25 P + a layer for linf kinds, 5 P + a layer for l2 kinds.
* average-case sharpness: one draw's perturbed weights (1 P).
* one HVP (the vector is set up outside the row, "state held" 1 P): the
  product (1 P); double backward keeps the gradient's graph but not the
  gradient's values; the torch.func engine (``jvp`` of ``grad``) holds the
  gradient beside its tangent.  Both add the transients of one layer's
  backward (the double-backward engine hands a weight's product over in
  two parts, each as it is formed; it held every layer's first part until
  the pass reached the layer, about 1 P more, before).
* trace: ``batch`` random vectors (the default batch is 1 here: one batch
  of data, whose graph the double-backward engine keeps, built before the
  vectors exist) and no product vector (each parameter's product is dotted
  with its vector as it is formed), plus the transients above; Hutch++
  also holds its sketch, ``sketch`` P (one vector by default).
* gradient_variance: the chunk's per-sample gradients (``chunk`` P) and the
  running mean (1 P); with ``memory_limit`` below ``P`` one group of layers'
  per-sample gradients at a time.
* Lanczos: the float64 Krylov basis, ``2 * steps`` P for float32
  parameters (full reorthogonalization keeps every basis vector), plus the
  product (a few P); ``steps`` P with a float32 basis; with ``max_basis``
  (thick restarts) ``2 * max_basis`` P (float64) or ``max_basis`` P
  (float32) whatever the steps; with
  ``low_memory=True`` (no stored basis) three vectors whatever the steps,
  in the parameters' dtype by default (3 P; 6 P in float64), plus the
  product's transients.
* spectral density (stochastic Lanczos quadrature): per start vector the
  same as Lanczos (the basis of ``steps`` vectors, or with
  ``low_memory=True`` the three-term recurrence's two or three vectors);
  one start vector at a time.

Usage::

    python benchmarks/bench_memory.py                       # CPU, ~6M parameters
    python benchmarks/bench_memory.py --device cuda --large # >= 50M parameters
    python benchmarks/bench_memory.py --quick               # smoke run
    python benchmarks/bench_memory.py --large --skip 'Lanczos top|float32 basis|batch 8'  # ~50M on CPU, < 6 GiB
    python benchmarks/bench_memory.py --skip '^(?!forward|SGD|APGD|average)'  # the sharpness rows only
"""

from __future__ import annotations

import argparse
import gc
import platform

import torch
import torch.nn.functional as F
from torch import nn

import flatness
from flatness.hessian import hvp, spectral_density, top_eigenvalues, trace
from flatness.nonuniformity import gradient_variance, kfac_variance
from flatness.optim import GSAM, SAM, FriendlySAM, LookSAM


def mlp(width: int, depth: int, d_in: int = 256, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------
# peak-memory probes
# --------------------------------------------------------------------------


def _fixed_mmap_threshold() -> None:
    """Make glibc return freed large blocks to the system at once.

    By default glibc raises its mmap threshold after a large block is freed,
    so later parameter-sized tensors come from the heap and stay resident
    after ``free``: the baseline RSS would then include free memory and the
    high-water mark would miss re-used space.  A fixed threshold of 64 KiB
    (``M_MMAP_THRESHOLD``, which also turns off the dynamic adjustment) and
    a small ``M_TRIM_THRESHOLD`` keep RSS equal to the live allocations.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - not glibc
        return
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _current(device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return _status("VmRSS")


class Peak:
    """Peak bytes above the current level while the block runs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.extra = 0

    def __enter__(self) -> Peak:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            self.base = _status("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.extra = _status("VmHWM") - self.base


# --------------------------------------------------------------------------
# the operations
# --------------------------------------------------------------------------


def operations(n_iters: int, lanczos_steps: int):
    """name -> (setup(model, batch) -> state, run(state)); setup runs outside
    the measurement."""

    def fwd_bwd_setup(model, batch):
        return model, batch

    def fwd_bwd(state):
        model, (x, y) = state
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def sgd_setup(model, batch):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        x, y = batch
        F.cross_entropy(model(x), y).backward()
        opt.step()  # momentum buffers exist before the measurement
        opt.zero_grad(set_to_none=True)
        return model, opt, batch

    def sgd_step(state):
        model, opt, (x, y) = state
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sam_setup(model, batch, cls=SAM, **kw):
        opt = cls(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9, **kw)
        state = (model, opt, batch)
        for _ in range(2):  # momentum (and the variant's own state) exist before the measurement
            sam_step(state)
        return state

    def variant(cls, **kw):
        return lambda model, batch: sam_setup(model, batch, cls, **kw)

    def sam_step(state):
        model, opt, (x, y) = state

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad(set_to_none=True)

    def apgd(kind, iters=n_iters):
        return lambda state: flatness.sharpness(state[0], state[1], kind=kind, rho=1e-3, n_iters=iters)

    def lanczos(**kw):
        return lambda state: top_eigenvalues(state[0], state[1], k=1, max_iter=lanczos_steps, tol=1e-300, **kw)

    def slq(**kw):
        return lambda state: spectral_density(state[0], state[1], n_vectors=2, n_steps=lanczos_steps,
                                              grid_size=64, **kw)

    def avg(kind):
        return lambda state: flatness.sharpness(state[0], state[1], kind=kind, rho=1e-3, n_samples=5, seed=0)

    def hutch(method, batch=None, **kw):
        return lambda state: trace(state[0], state[1], method=method, n_samples=12, batch=batch, **kw)

    def variance(fn):
        return lambda state: fn(state[0], state[1])

    def hvp_setup(model, batch):  # the vector exists before the product
        return model, batch, [torch.ones_like(p) for p in model.parameters()]

    def one_hvp(engine="auto"):
        def run(state):
            model, batch, v = state
            hvp(model, batch, v, engine=engine)
        return run

    def variance_kw(fn, **kw):
        return lambda state: fn(state[0], state[1], **kw)

    def quarter_of_p(state):  # a memory_limit below one sample's gradient
        model = state[0]
        return sum(p.numel() * p.element_size() for p in model.parameters()) // 4

    return {
        "forward-backward (reference)": (fwd_bwd_setup, fwd_bwd),
        "SGD step, momentum (reference)": (sgd_setup, sgd_step),
        "SAM step (SGD momentum)": (sam_setup, sam_step),
        "  GSAM step": (variant(GSAM), sam_step),
        "  FriendlySAM step": (variant(FriendlySAM), sam_step),
        "  LookSAM step (k=2: a full step)": (variant(LookSAM, k=2), sam_step),
        f"APGD sharpness linf, {max(1, n_iters // 4)} iters": (fwd_bwd_setup, apgd("linf", max(1, n_iters // 4))),
        f"APGD sharpness linf, {n_iters} iters": (fwd_bwd_setup, apgd("linf")),
        f"APGD sharpness l2, {n_iters} iters": (fwd_bwd_setup, apgd("l2")),
        f"APGD sharpness adaptive_linf, {n_iters} iters": (fwd_bwd_setup, apgd("adaptive_linf")),
        f"APGD sharpness adaptive_l2, {n_iters} iters": (fwd_bwd_setup, apgd("adaptive_l2")),
        "average-case sharpness avg_l2, 5 samples": (fwd_bwd_setup, avg("avg_l2")),
        "average-case avg_linf, 5 samples": (fwd_bwd_setup, avg("avg_linf")),
        "average-case avg_adaptive_linf, 5 samples": (fwd_bwd_setup, avg("avg_adaptive_linf")),
        "average-case avg_adaptive_l2, 5 samples": (fwd_bwd_setup, avg("avg_adaptive_l2")),
        "one Hessian-vector product (auto engine)": (hvp_setup, one_hvp()),
        "  same, forward-over-reverse": (hvp_setup, one_hvp("forward-over-reverse")),
        "  same, double-backward": (hvp_setup, one_hvp("double-backward")),
        "trace, Hutch++, 12 products, default batch": (fwd_bwd_setup, hutch("hutch++")),
        "trace, Hutch++, 12 products, batch 1": (fwd_bwd_setup, hutch("hutch++", 1)),
        "trace, Hutch++, 12 products, batch 8": (fwd_bwd_setup, hutch("hutch++", 8)),
        "trace, Hutch++, 12 products, sketch=4 (n // 3)": (fwd_bwd_setup, hutch("hutch++", sketch=4)),
        "trace, Hutchinson, 12 products, default batch": (fwd_bwd_setup, hutch("hutchinson")),
        "trace, Hutchinson, 12 products, batch 1": (fwd_bwd_setup, hutch("hutchinson", 1)),
        "trace, Hutchinson, 12 products, batch 8": (fwd_bwd_setup, hutch("hutchinson", 8)),
        "kfac_variance": (fwd_bwd_setup, variance(kfac_variance)),
        "gradient_variance (exact, per-sample)": (fwd_bwd_setup, variance(gradient_variance)),
        "  same, chunk_size=1": (fwd_bwd_setup, variance_kw(gradient_variance, chunk_size=1)),
        "  same, memory_limit=P/4 (layer groups)": (
            fwd_bwd_setup, lambda state: gradient_variance(state[0], state[1], memory_limit=quarter_of_p(state))),
        f"Lanczos top eigenvalue, {lanczos_steps} steps": (fwd_bwd_setup, lanczos()),
        "  same, float32 basis": (fwd_bwd_setup, lanczos(basis_dtype=torch.float32)),
        "  same, max_basis=5 (thick restarts)": (fwd_bwd_setup, lanczos(max_basis=5)),
        "  same, float32 basis, max_basis=5": (fwd_bwd_setup, lanczos(basis_dtype=torch.float32, max_basis=5)),
        "  same, low_memory (no basis, float32 default)": (fwd_bwd_setup, lanczos(low_memory=True)),
        "  same, low_memory (no basis, float64)": (
            fwd_bwd_setup, lanczos(low_memory=True, basis_dtype=torch.float64)),
        f"spectral density, 2 vectors x {lanczos_steps} steps": (fwd_bwd_setup, slq()),
        "  spectral density, float32 basis": (fwd_bwd_setup, slq(basis_dtype=torch.float32)),
        "  spectral density, low_memory (no basis)": (fwd_bwd_setup, slq(low_memory=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--large", action="store_true", help="a >= 50M-parameter model (width 4096)")
    parser.add_argument("--quick", action="store_true", help="a small model and few iterations (smoke test)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--skip", default=None, metavar="REGEX",
                        help="leave out the rows whose name matches (e.g. the float64 Lanczos basis at --large)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        if platform.system() != "Linux":
            raise SystemExit("CPU peak memory needs Linux (/proc/self/clear_refs); use --device cuda")
        _fixed_mmap_threshold()
    torch.manual_seed(0)
    if args.large:
        width, depth = 4096, 4
    elif args.quick:
        width, depth = 256, 2
    else:
        width, depth = 1536, 3
    n_iters, steps = (3, 4) if args.quick else (20, 20)
    model = mlp(width, depth).to(device)
    x = torch.randn(args.batch, 256, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    P = sum(p.numel() * p.element_size() for p in model.parameters())
    ops = operations(n_iters, steps)
    if args.skip:
        import re

        ops = {name: op for name, op in ops.items() if not re.search(args.skip, name)}

    # Warm-up on a tiny model: lazy imports and first-call caches are not
    # charged to the measured operation.
    tiny = mlp(8, 1, d_in=256).to(device)
    for setup, run in ops.values():
        run(setup(tiny, (x, y)))

    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'})")
    print(f"torch {torch.__version__}; model: MLP width {width}, depth {depth}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, P = {P / 2**20:.1f} MiB (float32); batch {args.batch}")
    print(f"probe: {'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'VmHWM - VmRSS (RSS high-water mark)'}")
    print()
    print(f"| {'operation':<42} | {'state held':>10} | {'peak in op':>10} | {'peak in op':>10} |")
    print(f"| {'':<42} | {'(x P)':>10} | {'(MiB)':>10} | {'(x P)':>10} |")
    print(f"|{'-' * 44}|{'-' * 12}|{'-' * 12}|{'-' * 12}|")
    for name, (setup, run) in ops.items():
        before = _current(device)
        state = setup(model, (x, y))
        held = _current(device) - before  # optimizer state kept between steps
        with Peak(device) as peak:
            run(state)
        del state
        model.zero_grad(set_to_none=True)
        print(f"| {name:<42} | {held / P:>10.2f} | {peak.extra / 2**20:>10.1f} | {peak.extra / P:>10.2f} |", flush=True)


if __name__ == "__main__":
    main()
