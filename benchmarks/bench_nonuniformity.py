"""Cost of the gradient-noise measurements as multiples of one forward-backward
pass over the same data.

For each model (an MLP and a small CNN) and the same list of batches, times
side by side, interleaved round-robin so that machine load hits them alike:

* ``fwd-bwd``: one forward-backward pass per batch (``loss.backward()``), the
  unit;
* ``kfac_variance``: traces only (the default);
* ``kfac_variance(factors=True)``: also forms the Kronecker factors;
* ``gradient_variance``: exact per-sample gradients with ``vmap``.

Reported: the best (minimum) and the median over repeats of each total, and
their ratios to the unit.  On a shared machine the minimum is the better
estimate of the cost (contention only adds time); the target for
``kfac_variance`` is <= 1.3x.

Usage::

    python benchmarks/bench_nonuniformity.py                # CPU, ~1 minute
    python benchmarks/bench_nonuniformity.py --device cuda
    python benchmarks/bench_nonuniformity.py --quick        # a smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
import torch.nn.functional as F
from _timing import seconds
from torch import nn

from flatness import nonuniformity as nu


def cases(device, n_batches, batch):
    g = torch.Generator().manual_seed(0)

    def data(shape, classes=10):
        return [
            (torch.randn(batch, *shape, generator=g).to(device),
             torch.randint(0, classes, (batch,), generator=g).to(device))
            for _ in range(n_batches)
        ]

    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    cnn = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )
    return [
        ("MLP 784-512-256-10", mlp.to(device), data((784,))),
        ("CNN 2conv+2fc 32x32", cnn.to(device), data((3, 32, 32))),
    ]


def fwd_bwd(model, batches):
    model.eval()  # the measurements run in eval mode too
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.batches, args.batch_size = 2, 1, 16
    device = torch.device(args.device)
    methods = {
        "fwd-bwd": lambda m, d: fwd_bwd(m, d),
        "kfac_variance": lambda m, d: nu.kfac_variance(m, d),
        "kfac_variance(factors=True)": lambda m, d: nu.kfac_variance(m, d, factors=True),
        "gradient_variance": lambda m, d: nu.gradient_variance(m, d, chunk_size=args.batch_size),
    }
    print(f"# device={device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, {args.batches} batches x {args.batch_size}, "
          f"{args.repeats} repeats")
    print("| model | method | best (s) | x fwd-bwd | median (s) | x fwd-bwd |")
    print("|---|---|---:|---:|---:|---:|")
    for name, model, data in cases(device, args.batches, args.batch_size):
        for fn in methods.values():  # warm-up (vmap tracing, allocator)
            fn(model, data)
        times = {k: [] for k in methods}
        for _ in range(args.repeats):
            for k, fn in methods.items():
                times[k].append(seconds(lambda: fn(model, data), device))
        best_unit, med_unit = min(times["fwd-bwd"]), statistics.median(times["fwd-bwd"])
        for k in methods:
            best, med = min(times[k]), statistics.median(times[k])
            print(f"| {name} | {k} | {best:.4f} | {best / best_unit:.2f} | {med:.4f} | {med / med_unit:.2f} |")


if __name__ == "__main__":
    main()
