"""Cost of every measurement on decoder-only language models of growing size.

A GPT-style model is built in the script (token embedding, ``N`` pre-norm
blocks of causal self-attention and an MLP, output head tied to the
embedding; no downloads) at about 10M, 50M, 125M and 350M parameters, and fed
random tokens.  For each size the script runs, once each:

* one plain training step (SGD) and one SAM step (with a new optimizer,
  which builds its state, and the second step of an optimizer: the
  steady state of a training run),
* ``sharpness(kind="adaptive_linf", n_iters=5)`` (``rho=2e-3``; 0.05 in
  bfloat16, which cannot represent a smaller relative perturbation),
* ``top_eigenvalues(k=1, tol=1e-2)`` (``low_memory=True``: the float64
  Lanczos basis of a 350M model would not fit in 24 GiB),
* ``trace(n_samples=10)``,
* ``kfac_variance``,

and reports the wall time as a multiple of one forward-backward pass (the
floor of each measurement is written next to it) and the peak memory inside
the call as a multiple of ``P``, the bytes of the parameters (the probe of
``bench_memory.py``: the RSS high-water mark on CPU,
``max_memory_allocated`` on CUDA).  The exponent ``a`` of ``cost ~
params**a`` fitted over the sizes says whether an operation scales linearly
(``a <= 1.1``).

On the CPU each line also gives, in brackets, the user CPU time against
the forward-backward pass's own and the memory the kernel mapped in fresh
(minor page faults): a wall-time ratio well above the user-time ratio is
the kernel's time faulting in new buffers, which the fixed mmap threshold of
the memory probe makes every large allocation pay.  The header says
whether PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (transparent huge pages for
large CPU tensors, set before the process starts) is on; a huge page then
counts as one fault, so the MiB figure, 4 KiB per fault, undercounts.  It
cuts the time of first touching new memory several-fold
(``bench_sharpness_lm.py``), but under this script's fixed mmap threshold
one run with it was no faster (the forward-backward pass of the 125M model
was slower: every large allocation is a fresh mapping to be backed by huge
pages).

An operation that fails prints its error in the table instead of a number;
the script never stops on one.

Usage::

    python benchmarks/bench_scale.py                 # CPU: 10M-350M, ~20 min on 2 cores
    python benchmarks/bench_scale.py --device cuda   # adds 1B where memory allows
    python benchmarks/bench_scale.py --quick         # tiny models, seconds (smoke test)
    python benchmarks/bench_scale.py --plot docs/results/scale_cpu.png
    python benchmarks/bench_scale.py --sizes 10M --batch 8 --ops sharpness   # one row, one size
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from bench_memory import Peak, _fixed_mmap_threshold
from torch import nn

try:  # user CPU time and page faults (Unix)
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

import flatness
from flatness.hessian import top_eigenvalues, trace
from flatness.nonuniformity import kfac_variance
from flatness.optim import SAM


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final LayerNorm
    and an output head that shares the token embedding's weight."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of every sequence."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# name -> (vocab, d_model, layers, heads)
SIZES = {
    "10M": (8192, 256, 10, 4),
    "50M": (8192, 512, 14, 8),
    "125M": (50257, 768, 12, 12),
    "350M": (50257, 1024, 24, 16),
    "1B": (50257, 1536, 34, 16),
}
QUICK = {"0.2M": (512, 32, 2, 2), "0.8M": (1024, 64, 4, 4)}
#: rows whose function is ``prepare(model) -> run`` (see :data:`Operation`)
STEADY = {"SAM step, steady (2nd step)"}


@dataclass
class Row:
    op: str
    floor: str
    times: dict[str, float | str]
    peaks: dict[str, float | str]


#: ``run(model)``, or a row measured in steady state: ``prepare(model)``,
#: untimed and outside the memory probe, returns the ``run`` to measure
Operation = Callable[[nn.Module], object]


def sharpness_rho(model: nn.Module) -> float:
    """The adaptive radius of the sharpness row: 2e-3, or 0.05 for a
    bfloat16 model, whose 8 significant bits round a relative perturbation
    of 2e-3 away (flatness.sharpness warns: 91% of it lost), so that the row
    times a measurement that means something in both dtypes."""
    return 0.05 if next(model.parameters()).dtype == torch.bfloat16 else 2e-3


def operations(
    batch: tuple[torch.Tensor, torch.Tensor], lanczos_steps: int | None = None, trace_batch: int | None = None
) -> dict[str, tuple[str, Operation]]:
    """name -> (floor in forward-backward passes, run(model)); see
    :data:`STEADY` for the rows whose function prepares the run."""
    x, y = batch

    def sgd_step(model: nn.Module) -> None:
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        lm_loss(model(x), y).backward()
        opt.step()
        model.zero_grad(set_to_none=True)

    def sam_step(model: nn.Module) -> None:
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-4)

        def closure() -> torch.Tensor:
            loss = lm_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        model.zero_grad(set_to_none=True)

    def sam_steady(model: nn.Module) -> Callable[[nn.Module], None]:
        # an optimizer that has stepped once: its saved-weights buffer
        # exists and is reused, as in every step of a training run after
        # the first (the row above also builds that state)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-4)

        def closure() -> torch.Tensor:
            loss = lm_loss(model(x), y)
            loss.backward()
            return loss

        def step(model: nn.Module) -> None:
            opt.step(closure)
            model.zero_grad(set_to_none=True)

        step(model)
        return step

    return {
        "SGD step": ("1", sgd_step),
        "SAM step": ("2", sam_step),
        "SAM step, steady (2nd step)": ("2", sam_steady),
        "sharpness adaptive_linf, 5 iters": (
            "6 (5 fb + 1 fwd)",
            lambda m: flatness.sharpness(m, batch, kind="adaptive_linf", rho=sharpness_rho(m), n_iters=5,
                                         loss_fn=lm_loss),
        ),
        "top_eigenvalues k=1 tol=1e-2": (
            "~3 per HVP",
            lambda m: top_eigenvalues(m, batch, k=1, tol=1e-2, loss_fn=lm_loss, low_memory=True,
                                      max_iter=lanczos_steps),
        ),
        "trace n_samples=10": (
            "~3 per HVP x 10", lambda m: trace(m, batch, n_samples=10, loss_fn=lm_loss, batch=trace_batch)),
        "kfac_variance": ("1 + exact layers", lambda m: kfac_variance(m, batch, loss_fn=lm_loss)),
    }


def _cpu_use() -> tuple[float, float]:
    """(user CPU seconds of this process, MiB of minor page faults so far)."""
    if resource is None:
        return 0.0, 0.0
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime, use.ru_minflt * resource.getpagesize() / 2**20


def fit_exponent(params: list[float], values: list[float | str]) -> str:
    """Least-squares slope of log(value) on log(params)."""
    pts = [(math.log(p), math.log(v)) for p, v in zip(params, values) if isinstance(v, float) and v > 0]
    if len(pts) < 2:
        return "-"
    mx = sum(p for p, _ in pts) / len(pts)
    my = sum(v for _, v in pts) / len(pts)
    sxx = sum((p - mx) ** 2 for p, _ in pts)
    if sxx == 0:
        return "-"
    return f"{sum((p - mx) * (v - my) for p, v in pts) / sxx:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="two tiny models (smoke test)")
    parser.add_argument("--sizes", nargs="*", help="subset of " + ", ".join(SIZES))
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (default 2 CPU, 8 CUDA)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--plot", default=None, help="write a log-log plot of time and memory to this file")
    parser.add_argument("--lanczos-steps", type=int, default=None,
                        help="cap on top_eigenvalues' Lanczos steps (default: its own, 100)")
    parser.add_argument("--trace-batch", type=int, default=None,
                        help="vectors per product pass in trace (default: the library's, 1 for one batch)")
    parser.add_argument("--ops", nargs="*", default=None,
                        help="run only the operations whose name contains one of these words "
                             "(e.g. --ops sharpness SAM); default all")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        _fixed_mmap_threshold()
    dtype = getattr(torch, args.dtype)
    batch_size = args.batch or (2 if device.type == "cpu" else 8)
    default = [s for s in SIZES if s != "1B"]
    if device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= 60 * 2**30:
        default.append("1B")  # 4 GiB of float32 weights, the heaviest operation about 12 P
    sizes = QUICK if args.quick else {k: SIZES[k] for k in (args.sizes or default)}

    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}),"
          f" torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    print(f"batch {batch_size} x sequence {args.seq} random tokens; each operation run once")
    if device.type == "cpu":
        print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')} "
              "(1: large tensors on transparent huge pages)")
    print()
    # Warm-up on a tiny model: lazy imports and first-call caches are not
    # charged to the first size.
    tiny = GPT(64, 16, 1, 2, args.seq).to(device=device, dtype=dtype)
    warm = torch.randint(0, 64, (batch_size, args.seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    for name, (_, run) in operations((warm[:, :-1], warm[:, 1:])).items():
        try:
            out = run(tiny)
            if name in STEADY:
                out(tiny)  # type: ignore[operator]
        except Exception:  # reported when measured
            pass
    n_params: list[float] = []
    rows: dict[str, Row] = {}
    fb_ms: list[float] = []
    for label, (vocab, d, layers, heads) in sizes.items():
        torch.manual_seed(0)
        model = GPT(vocab, d, layers, heads, args.seq).to(device=device, dtype=dtype)
        P = sum(p.numel() * p.element_size() for p in model.parameters())
        n_params.append(sum(p.numel() for p in model.parameters()))
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (batch_size, args.seq + 1), generator=g).to(device)
        batch = (tokens[:, :-1], tokens[:, 1:])

        def fwd_bwd(model: nn.Module = model, batch: tuple = batch) -> None:
            lm_loss(model(batch[0]), batch[1]).backward()
            model.zero_grad(set_to_none=True)

        fwd_bwd()  # warm-up
        ts, user = [], []
        for _ in range(3):
            u0, t0 = _cpu_use(), time.perf_counter()
            fwd_bwd()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ts.append(time.perf_counter() - t0)
            user.append(_cpu_use()[0] - u0[0])
        fb, fb_user = sorted(ts)[1], sorted(user)[1]
        fb_ms.append(fb * 1e3)
        print(f"{label}: {n_params[-1] / 1e6:.1f}M parameters, P = {P / 2**20:.0f} MiB, "
              f"forward-backward {fb * 1e3:.0f} ms", flush=True)
        for name, (floor, run) in operations(batch, args.lanczos_steps, args.trace_batch).items():
            if args.ops and not any(word in name for word in args.ops):
                continue
            row = rows.setdefault(name, Row(name, floor, {}, {}))
            try:
                if name in STEADY:
                    run = run(model)  # type: ignore[assignment]
                with Peak(device) as peak:
                    u0, t0 = _cpu_use(), time.perf_counter()
                    out = run(model)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    dt = time.perf_counter() - t0
                    u1 = _cpu_use()
                row.times[label] = dt / fb
                row.peaks[label] = peak.extra / P
                # curvature results count their products: the time per product
                # separates the cost of one HVP from the number Lanczos needed
                products = f"  ({out.n_hvp} products)" if hasattr(out, "n_hvp") else ""
                # On the CPU, the user time against the pass's own user time
                # and the memory the kernel had to map fresh (page faults):
                # wall-time ratios that the user-time ratio does not show are
                # the kernel's time faulting in new buffers.
                cpu = (f"  [user {(u1[0] - u0[0]) / max(fb_user, 1e-9):.1f} x fb, {u1[1] - u0[1]:.0f} MiB faulted in]"
                       if device.type == "cpu" and resource is not None else "")
                print(f"  {name:<34} {dt / fb:7.1f} x fb  {peak.extra / P:6.2f} x P{products}{cpu}", flush=True)
            except Exception as exc:  # report, never stop the whole run
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}" if str(exc) else type(exc).__name__
                row.times[label] = row.peaks[label] = "failed"
                print(f"  {name:<34} failed: {reason}", flush=True)
                traceback.print_exc(limit=2)
            model.zero_grad(set_to_none=True)
            run = out = None  # a prepared optimizer's state and a result go before the next row
        del model
    labels = list(sizes)
    print()
    head = " | ".join(f"{lab} time" for lab in labels) + " | " + " | ".join(f"{lab} mem" for lab in labels)
    print(f"| operation | floor (fb) | {head} | time exp. | mem exp. |")
    print("|---|---|" + "---:|" * (2 * len(labels) + 2))
    fb_row = " | ".join(f"{ms:.0f} ms" for ms in fb_ms)
    print(f"| forward-backward | 1 | {fb_row} | {' | '.join('-' for _ in labels)} | "
          f"{fit_exponent(n_params, [m / 1e3 for m in fb_ms])} | - |")
    for row in rows.values():
        t = " | ".join(f"{v:.1f}x" if isinstance(v, float) else v for v in (row.times[lab] for lab in labels))
        m = " | ".join(f"{v:.2f} P" if isinstance(v, float) else v for v in (row.peaks[lab] for lab in labels))
        # exponent of the absolute time (ratio x forward-backward time)
        abs_t = [r * f / 1e3 if isinstance(r, float) else r for r, f in zip((row.times[lab] for lab in labels), fb_ms)]
        abs_m = [r * n * 4 if isinstance(r, float) else r for r, n in zip((row.peaks[lab] for lab in labels), n_params)]
        print(f"| {row.op} | {row.floor} | {t} | {m} | {fit_exponent(n_params, abs_t)} | {fit_exponent(n_params, abs_m)} |")
    print()
    print("time: wall time / one forward-backward of the same model; mem: peak extra memory in the call / P;")
    print("exp.: fitted a in seconds ~ params**a and bytes ~ params**a (linear scaling: a <= 1.1).")
    if args.plot:
        _plot(args.plot, n_params, fb_ms, rows, labels)


def _plot(path: str, n_params: list[float], fb_ms: list[float], rows: dict[str, Row], labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_t.plot(n_params, [m / 1e3 for m in fb_ms], "k--", marker="o", label="forward-backward")
    for row in rows.values():
        pts = [(n, r * f / 1e3) for n, r, f in zip(n_params, (row.times[lab] for lab in labels), fb_ms)
               if isinstance(r, float)]
        if pts:
            ax_t.plot(*zip(*pts), marker="o", label=row.op)
        pts_m = [(n, r * n * 4 / 2**30) for n, r in zip(n_params, (row.peaks[lab] for lab in labels))
                 if isinstance(r, float) and r > 0]
        if pts_m:
            ax_m.plot(*zip(*pts_m), marker="o", label=row.op)
    ax_m.plot(n_params, [n * 4 / 2**30 for n in n_params], "k:", label="P (parameters)")
    for ax, ylabel in ((ax_t, "seconds per call"), (ax_m, "peak extra memory in the call (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle("flatness on decoder-only transformers (CPU, batch 2 x 64 tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
