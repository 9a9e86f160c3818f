"""Worst-case sharpness: time per batch of flatness' APGD, side by side with

* the floor: ``n_iters + 1`` plain forward-backward passes of the model, and
* the reference loop: a straightforward re-implementation of the reference
  evaluator's loop (per iteration a forward-backward pass at the current
  point plus a forward pass for the loss, weights written in place, a deep
  copy of the state dict per new best: ``1 + 2n`` forwards, ``n`` backwards).

Prints a table of ratios measured in one run; ``floor / ours`` >= 0.9 and
``reference / ours`` >= 1.3 are the targets.

    python benchmarks/bench_sharpness.py [--device cuda] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from _timing import interleaved_medians
from torch import nn

import flatness


def mlp():
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )


KINDS = (("l2", 0.1), ("adaptive_linf", 2e-3))
MODELS = {"mlp": (mlp, (256,)), "cnn": (cnn, (3, 32, 32))}


def floor(model, x, y, n_iters):
    for _ in range(n_iters + 1):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()


def reference_loop(model, x, y, n_iters, rho):
    """l2 APGD as the reference evaluator runs it (non-adaptive, no restarts)."""
    params = list(model.parameters())
    orig = [p.detach().clone() for p in params]
    with torch.no_grad():
        init_loss = F.cross_entropy(model(x), y).item()
    delta = [torch.zeros_like(p) for p in params]
    prev = [d.clone() for d in delta]
    worst, step = init_loss, 2 * rho
    worst_state = copy.deepcopy(model.state_dict())
    for _ in range(n_iters):
        backup = [d.clone() for d in delta]
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            gnorm = sum(p.grad.norm() ** 2 for p in params) ** 0.5
            for d, p in zip(delta, params):
                d += step / (gnorm + 1e-12) * p.grad
            dnorm = sum(d.norm() ** 2 for d in delta) ** 0.5
            if dnorm > rho:
                for d in delta:
                    d *= rho / dnorm
            for i, (d, pr) in enumerate(zip(delta, prev)):
                delta[i] = 0.75 * d + 0.25 * pr
            for p, o, d in zip(params, orig, delta):
                p.data = o + d
            prev = backup
            loss = F.cross_entropy(model(x), y).item()
            if loss > worst:
                worst = loss
                worst_state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p, o in zip(params, orig):
            p.copy_(o)
    return worst - init_loss, worst_state


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n-iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    n = args.n_iters
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"batch={args.batch} n_iters={n}")
    print(f"{'model':<6}{'kind':<15}{'ours ms':>9}{'floor ms':>10}{'ref ms':>9}"
          f"{'floor/ours':>12}{'ref/ours':>10}")
    for name, (factory, shape) in MODELS.items():
        model = factory().to(device)
        x = torch.randn(args.batch, *shape, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        fns = {
            "floor": lambda: floor(model, x, y, n),
            "ref": lambda: reference_loop(model, x, y, n, rho=0.1),
            **{kind: (lambda kind=kind, rho=rho: flatness.sharpness(
                model, (x, y), kind=kind, rho=rho, n_iters=n)) for kind, rho in KINDS},
        }
        t = interleaved_medians(fns, device, args.repeats)
        for kind, _ in KINDS:
            print(f"{name:<6}{kind:<15}{1e3 * t[kind]:>9.1f}{1e3 * t['floor']:>10.1f}"
                  f"{1e3 * t['ref']:>9.1f}{t['floor'] / t[kind]:>12.2f}{t['ref'] / t[kind]:>10.2f}")

if __name__ == "__main__":
    main()
