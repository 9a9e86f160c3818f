"""SGD vs SAM vs nonuniformity-guided SAM on scikit-learn's digits.

"Beyond Sharpness: The Role of Nonuniformity in Generalization" argues that
the magnitude of the gradient noise tracks the generalization gap better
than sharpness does.  This example trains one small CNN per optimizer from
the same initial weights on the same mini-batches:

* ``SGD``            - plain SGD with momentum;
* ``SAM``            - :class:`flatness.optim.SAM`;
* ``ConsistentSAM``  - :class:`flatness.optim.ConsistentSAM` (three passes);
* ``NonuniformSAM``  - :class:`flatness.optim.NonuniformSAM` (ascent preconditioned by the
  Kronecker-factored centred gradient covariance, centred as the authors'
  ``GAM`` code does it: its default).

At checkpoints it records the test error, the worst-case adaptive
l-infinity sharpness (``flatness.sharpness(kind="adaptive_linf")``) and the
Kronecker-factored gradient-noise magnitude
(``flatness.nonuniformity.kfac_variance``; ``tr S``), both on the training
set, and prints Kendall's tau between each quantity and the test error over
all checkpoints of all optimizers (with a 95% bootstrap confidence interval
over the checkpoints), and the ranking of the final models.  All of it is
repeated for each of ``--seeds`` (data split, initialization, batch order),
followed by the taus of every seed side by side.  A plot of the first seed
is written to ``nonuniformity.png`` when matplotlib is installed.

    python examples/nonuniformity.py            # 3 seeds, ~4 minutes on 2 CPU cores
    python examples/nonuniformity.py --tiny     # a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import kendalltau
from sklearn.datasets import load_digits
from torch import nn

import flatness
from flatness.nonuniformity import gradient_variance, kfac_variance
from flatness.optim import SAM, ConsistentSAM, NonuniformSAM


def digits(seed: int, n_train: int):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def make_optimizer(name: str, model: nn.Module, lr: float):
    params = model.parameters()
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "SAM":
        return SAM(params, torch.optim.SGD, rho=0.05, lr=lr, momentum=0.9)
    if name == "ConsistentSAM":
        return ConsistentSAM(params, torch.optim.SGD, rho=0.05, rho2=0.1, alpha=0.9, lr=lr, momentum=0.9)
    if name == "NonuniformSAM":
        return NonuniformSAM(params, torch.optim.SGD, rho=0.05, model=model, damping=0.1, update_freq=5,
                             lr=lr, momentum=0.9)
    raise ValueError(name)


def train_epoch(model, opt, data, batch_size, gen):
    x, y = data
    model.train()
    for idx in torch.randperm(len(y), generator=gen).split(batch_size):
        xb, yb = x[idx], y[idx]

        def closure():
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        if isinstance(opt, torch.optim.SGD):
            opt.zero_grad()
            closure()
            opt.step()
        else:
            opt.step(closure)


def measure(model, train_data, test_data, batch_size, n_iters):
    model.eval()
    with torch.no_grad():
        err = (model(test_data[0]).argmax(1) != test_data[1]).float().mean().item()
        train_err = (model(train_data[0]).argmax(1) != train_data[1]).float().mean().item()
    batches = list(zip(train_data[0].split(batch_size), train_data[1].split(batch_size)))
    sharp = flatness.sharpness(model, batches, kind="adaptive_linf", rho=2e-3, n_iters=n_iters, seed=0)
    var = kfac_variance(model, batches)
    return dict(test_error=err, train_error=train_err, sharpness=sharp.value, kfac_variance=var.total,
                noise=var.noise)


def bootstrap_ci(a, b, *, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of Kendall's tau over the points
    (resampled with replacement, private NumPy generator; undefined taus of
    constant resamples dropped)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    taus = np.array([kendalltau(x[i], y[i]).statistic for i in idx])
    taus = taus[~np.isnan(taus)]
    if taus.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(taus, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


NAMES = ["SGD", "SAM", "ConsistentSAM", "NonuniformSAM"]
QUANTITIES = ("sharpness", "kfac_variance")


def run_seed(args, seed: int, n_iters: int) -> dict[str, list[dict]]:
    """Train every optimizer from the same start with one seed; print the
    final models and every checkpoint; return the checkpoints."""
    train_data, test_data = digits(seed, args.n_train)
    start = make_model(seed)
    history: dict[str, list[dict]] = {}
    print(f"== seed {seed}")
    for name in NAMES:
        model = copy.deepcopy(start)
        opt = make_optimizer(name, model, args.lr)
        gen = torch.Generator().manual_seed(seed)  # same batches for everyone
        t0 = time.perf_counter()
        history[name] = []
        for epoch in range(1, args.epochs + 1):
            train_epoch(model, opt, train_data, args.batch_size, gen)
            if epoch % args.every == 0 or epoch == args.epochs:
                m = measure(model, train_data, test_data, 100, n_iters)
                history[name].append(dict(epoch=epoch, **m))
        final = history[name][-1]
        exact = gradient_variance(model, list(zip(train_data[0].split(100), train_data[1].split(100))))
        final["exact_variance"] = exact.total
        print(f"{name:<14} {time.perf_counter() - t0:6.1f} s  test error {final['test_error']:.4f}  "
              f"sharpness {final['sharpness']:.3e}  kfac tr S {final['kfac_variance']:.3e} "
              f"(exact {exact.total:.3e})")

    print(f"\ndigits CNN, {args.n_train} train / {len(test_data[1])} test, {args.epochs} epochs, "
          f"batch {args.batch_size}, lr {args.lr}, momentum 0.9, seed {seed}")
    print(f"{'optimizer':<14} | {'epoch':>5} | {'test err':>8} | {'train err':>9} | {'sharpness':>9} | "
          f"{'KFAC tr S':>9} | {'a tr S':>8}")
    for name in NAMES:
        for h in history[name]:
            print(f"{name:<14} | {h['epoch']:>5} | {h['test_error']:>8.4f} | {h['train_error']:>9.4f} | "
                  f"{h['sharpness']:>9.2e} | {h['kfac_variance']:>9.2e} | {h['noise']:>8.1e}")
    return history


def checkpoint_sets(history):
    points = [h for name in NAMES for h in history[name]]
    return {"all checkpoints": points, "zero train error": [h for h in points if h["train_error"] == 0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--every", type=int, default=4, help="epochs between checkpoints")
    ap.add_argument("--n-train", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="one run per seed (data split, initialization, batch order)")
    ap.add_argument("--seed", type=int, default=None, help="a single seed (same as --seeds SEED)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the tau intervals")
    ap.add_argument("--plot", default="nonuniformity.png", help="output PNG of the first seed ('' for none)")
    ap.add_argument("--tiny", "--quick", action="store_true", help="2 epochs, cheap measurements (smoke test)")
    args = ap.parse_args()
    if args.tiny:
        args.epochs, args.every, args.seeds, args.n_boot = 2, 1, [0, 1], 50
    if args.seed is not None:
        args.seeds = [args.seed]
    n_iters = 2 if args.tiny else 10
    torch.set_num_threads(1)  # tiny model: threads only add overhead

    runs = {}
    taus: dict[tuple[int, str, str], float] = {}
    for seed in args.seeds:
        history = runs[seed] = run_seed(args, seed, n_iters)
        print(f"\nKendall tau with the test error, seed {seed} (95% CI: bootstrap over the checkpoints, "
              f"{args.n_boot} resamples):")
        for label, pts in checkpoint_sets(history).items():
            if len(pts) < 3:
                print(f"  {label:<17} ({len(pts):>2} points): too few")
                continue
            err = [h["test_error"] for h in pts]
            cells = []
            for key in QUANTITIES:
                vals = [h[key] for h in pts]
                t = taus[seed, label, key] = kendalltau(vals, err).statistic
                lo, hi = bootstrap_ci(vals, err, n_boot=args.n_boot, seed=seed)
                cells.append(f"{key} {t:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            print(f"  {label:<17} ({len(pts):>2} points): " + ", ".join(cells))
        finals = {name: history[name][-1] for name in NAMES}
        for key in ("test_error", *QUANTITIES):
            order = sorted(NAMES, key=lambda n: finals[n][key])
            print(f"final models ranked by {key:<14}: {' < '.join(order)}")
        print()

    if len(args.seeds) > 1:
        print(f"== over {len(args.seeds)} seeds: Kendall tau with the test error")
        print(f"{'checkpoints':<17} | {'quantity':<13} | " + " | ".join(f"seed {s:>2}" for s in args.seeds)
              + " |    min |    max")
        for label in ("all checkpoints", "zero train error"):
            for key in QUANTITIES:
                vals = [taus.get((s, label, key), float("nan")) for s in args.seeds]
                known = [v for v in vals if v == v]
                lo, hi = (min(known), max(known)) if known else (float("nan"), float("nan"))
                print(f"{label:<17} | {key:<13} | " + " | ".join(f"{v:+7.3f}" for v in vals)
                      + f" | {lo:+.3f} | {hi:+.3f}")
            better = [s for s in args.seeds if (s, label, "kfac_variance") in taus
                      and taus[s, label, "kfac_variance"] > taus[s, label, "sharpness"]]
            counted = [s for s in args.seeds if (s, label, "kfac_variance") in taus]
            print(f"{label}: KFAC tr S above sharpness in {len(better)}/{len(counted)} seeds")
        for key in ("test_error", *QUANTITIES):
            best = [min(NAMES, key=lambda n, s=s: runs[s][n][-1][key]) for s in args.seeds]
            print(f"lowest final {key:<14} per seed: {', '.join(best)}")

    history = runs[args.seeds[0]]
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot")
            return
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for name in NAMES:
            ep = [h["epoch"] for h in history[name]]
            for ax, key in zip(axes, ("test_error", "sharpness", "kfac_variance")):
                ax.plot(ep, [h[key] for h in history[name]], marker="o", label=name)
        for ax, title in zip(axes, ("test error", "adaptive l-inf sharpness (train)", "KFAC gradient variance tr S (train)")):
            ax.set_title(title)
            ax.set_xlabel("epoch")
        axes[1].set_yscale("log")
        axes[2].set_yscale("log")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
