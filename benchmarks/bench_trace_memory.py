"""Peak memory and time per product of ``trace`` and low-memory Lanczos on
a language model and an MLP.

The models: the decoder-only transformer of ``bench_scale.py`` (tied
output head, one batch of 2 x 64 random tokens; the double-backward engine
keeps the gradient's graph) at 10M and 50M parameters, the 5.1M MLP of
``bench_memory.py`` (batch of 8) and, with ``--models cnn5M``, a VGG-style
CNN of 4.7M parameters (eight 3x3 convolutions, 64 to 512 channels, on a
batch of 8 random 32x32 images).  Each measurement runs in a fresh process
(one at a time: the resident-set probe of ``bench_memory.py`` sees the
whole process), after the same call on a tiny model (lazy imports and
first-call caches are not charged).  PyHessian's ``trace`` and power
iteration, where it is installed, are measured the same way (its object
keeps the gradient beside its graph and holds each product).  Columns: the peak extra memory in the
call as a multiple of ``P`` (the parameters' bytes, float32), and the wall
time per product as a multiple of one forward-backward pass of the same
model and batch (the floor with a kept graph is about 2-3: one backward
pass through the gradient's graph, which is about twice a plain backward).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_trace_memory.py            # mlp5M, 10M, 50M (~10 min)
    python benchmarks/bench_trace_memory.py --models 10M --ops hutchinson lowmem
    python benchmarks/bench_trace_memory.py --models cnn5M --ops hutchinson hutchpp10 lowmem
    python benchmarks/bench_trace_memory.py --ops hutchinson pyhessian_trace lowmem pyhessian_eig  # vs PyHessian
    python benchmarks/bench_trace_memory.py --quick                      # tiny models, smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

OPS = {
    "hutchinson": "trace(method='hutchinson', n_samples=10)",
    "hutchpp10": "trace(n_samples=10)  (default sketch)",
    "hutchpp10_s3": "trace(n_samples=10, sketch=3)",
    "hutchpp90": "trace()  (defaults: Hutch++, n_samples=90)",
    "lowmem": "top_eigenvalues(k=1, tol=1e-2, low_memory=True, max_iter=8)",
    "lowmem64": "  same, basis_dtype=torch.float64",
    "pyhessian_trace": "PyHessian trace(maxIter=10)  (Hutchinson)",
    "pyhessian_eig": "PyHessian eigenvalues(top_n=1, maxIter=8, tol=1e-2)",
}
QUICK_MODELS = ("mlp-quick", "cnn-quick", "0.2M")


def _model(name: str):
    from bench_memory import mlp
    from bench_scale import GPT, QUICK, SIZES, lm_loss

    torch.manual_seed(0)
    if name.startswith("cnn"):
        return cnn(8 if name == "cnn-quick" else 64), (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))), \
            F.cross_entropy
    if name.startswith("mlp"):
        width, depth = (256, 2) if name == "mlp-quick" else (1536, 3)
        return mlp(width, depth), (torch.randn(8, 256), torch.randint(0, 10, (8,))), F.cross_entropy
    vocab, d, layers, heads = {**SIZES, **QUICK}[name]
    tokens = torch.randint(0, vocab, (2, 65), generator=torch.Generator().manual_seed(0))
    return GPT(vocab, d, layers, heads, 64), (tokens[:, :-1], tokens[:, 1:]), lm_loss


def cnn(width: int) -> torch.nn.Module:
    """VGG-style: four blocks of two 3x3 convolutions (``width`` to
    ``8 * width`` channels) and a 2x2 pooling, then a linear classifier."""
    from torch import nn

    layers, c = [], 3
    for k in (1, 2, 4, 8):
        layers += [nn.Conv2d(c, k * width, 3, padding=1), nn.ReLU(),
                   nn.Conv2d(k * width, k * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = k * width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 2 * 2, 10))


def _call(op: str, model, batch, loss_fn):
    from flatness.hessian import top_eigenvalues, trace

    if op.startswith("pyhessian"):
        return _pyhessian(op, model, batch, loss_fn)
    kw = {"loss_fn": loss_fn}
    if op == "hutchinson":
        return trace(model, batch, method="hutchinson", n_samples=10, **kw)
    if op == "hutchpp10":
        return trace(model, batch, n_samples=10, **kw)
    if op == "hutchpp10_s3":
        return trace(model, batch, n_samples=10, sketch=3, **kw)
    if op == "hutchpp90":
        return trace(model, batch, **kw)
    if op == "lowmem64":
        kw["basis_dtype"] = torch.float64
    return top_eigenvalues(model, batch, k=1, tol=1e-2, low_memory=True, max_iter=8, **kw)


def _pyhessian(op: str, model, batch, loss_fn):
    """The peer's call (``pip install --no-deps pyhessian``): its Hessian
    object (the loss gradient with its graph and the gradient kept), then
    ``trace`` or ``eigenvalues``; the number of products in ``n_hvp``."""
    import types

    from bench_hessian import import_pyhessian

    pyh, _ = import_pyhessian()
    if pyh is None:
        raise SystemExit("PyHessian is not installed")
    module = sys.modules["pyhessian.hessian"]  # the package re-exports a class of that name
    products = [0]
    original = module.hessian_vector_product

    def counted(grads, params, v):
        products[0] += 1
        return original(grads, params, v)

    module.hessian_vector_product = counted
    # (torch's CPU flash attention has no double backward: a user of the
    # peer selects the math kernel, as flatness does for itself)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.MATH):
            h = module.hessian(model, loss_fn, data=batch, cuda=False)
            if op == "pyhessian_trace":
                # (tol=-inf: its stopping test divides by the signed running
                # trace, so a negative estimate stops it after two samples
                # whatever tol is)
                h.trace(maxIter=10, tol=float("-inf"))
            else:
                h.eigenvalues(maxIter=8, tol=1e-2, top_n=1)
    finally:
        module.hessian_vector_product = original
    return types.SimpleNamespace(n_hvp=products[0], engine="pyhessian")


def one(model_name: str, op: str) -> None:
    """Measure one operation in this process and print one line."""
    from bench_memory import Peak, _fixed_mmap_threshold

    _fixed_mmap_threshold()
    tiny, tiny_batch, tiny_loss = _model({"mlp": "mlp-quick", "cnn": "cnn-quick"}.get(model_name[:3], "0.2M"))
    _call(op, tiny, tiny_batch, tiny_loss)  # warm-up
    model, batch, loss_fn = _model(model_name)
    P = sum(p.numel() * p.element_size() for p in model.parameters())

    def fb() -> None:
        loss_fn(model(batch[0]), batch[1]).backward()
        model.zero_grad(set_to_none=True)

    fb()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fb()
        times.append(time.perf_counter() - t0)
    t_fb = sorted(times)[1]
    with Peak(torch.device("cpu")) as peak:
        t0 = time.perf_counter()
        r = _call(op, model, batch, loss_fn)
        dt = time.perf_counter() - t0
    print(f"{peak.extra / P:.2f} {dt / t_fb / r.n_hvp:.2f} {r.n_hvp} {r.engine}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp5M", "10M", "50M"])
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument("--quick", action="store_true", help="tiny models (smoke run)")
    ap.add_argument("--device", default="cpu", help="cpu only (the resident-set probe)")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "OP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(*args.one)
        return
    if args.device != "cpu" or platform.system() != "Linux":
        raise SystemExit("bench_trace_memory measures the resident set on Linux CPUs only")
    models = QUICK_MODELS if args.quick else args.models
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); peak extra memory in the call (x P) "
          "and wall time per product (x one forward-backward)")
    print()
    print(f"| {'operation':<52} | " + " | ".join(f"{m + ' P':>9} | {m + ' t':>9}" for m in models) + " |")
    print("|" + "-" * 54 + "|" + "|".join("-" * 11 + "|" + "-" * 11 for _ in models) + "|")
    here = os.path.dirname(os.path.abspath(__file__))
    for op in args.ops:
        cells = []
        for m in models:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", m, op], cwd=here,
                                 capture_output=True, text=True)
            if out.returncode != 0:
                cells += ["failed", (out.stderr.strip().splitlines() or ["?"])[-1][:9]]
                continue
            peak, per, *_ = out.stdout.split()
            cells += [peak, per]
        print(f"| {OPS[op]:<52} | " + " | ".join(f"{c:>9}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
