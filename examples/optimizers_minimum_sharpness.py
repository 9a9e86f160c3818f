"""Optimizers, SAM and minimum sharpness: a small-scale version of Ibayashi et
al. (2021), "Generalization properties of learning algorithms and SAM based
on minimum sharpness".

One MLP (64-128-128-10, ReLU, with biases) is trained on scikit-learn's
digits from the same initial weights by SGD, heavy-ball SGD (PHB), Adagrad
and Adam - and by AdaBound and AdaShift when ``pytorch_optimizer`` is
installed (it is optional; the output says whether they ran) - each alone
and inside ``flatness.optim.SAM``.  Every run trains until its training loss
is below ``--target-loss`` (the paper's "converged" checkpoint) or for
``--max-epochs``.

For each run: train and test accuracy, the generalization gap (test loss -
train loss, and train accuracy - test accuracy), and on training data the
Hessian trace, the top Hessian eigenvalue and minimum sharpness (Ibayashi et
al. 2021: the trace minimized over the rescalings that leave the ReLU network
unchanged), per layer as in the paper and per neuron, all through
``flatness.sharpness``.  The traces are exact, as in the paper: for
cross-entropy on a ReLU network the Hessian diagonal equals the Gauss-Newton
one, about 10 per-sample backward passes per sample (``method="gn"``, the
default); the trace column is the same exact trace.  Then Kendall's tau
(with a bootstrap 95 % interval over the runs) and Pearson's r between each
measure and the gap, and the effect of SAM on each.  With several seeds
(``--seed 0 1 2``: another split, initialization and batch order each) the
study ends with the spread of every tau over the seeds.

    python examples/optimizers_minimum_sharpness.py --seed 0 1 2   # ~5 min on 2 CPU cores
    python examples/optimizers_minimum_sharpness.py --tiny         # smoke test, seconds
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import kendalltau, pearsonr
from sklearn.datasets import load_digits
from torch import nn

import flatness
from flatness.optim import SAM

try:  # optional: AdaBound and AdaShift come from a maintained package
    import pytorch_optimizer
except ImportError:  # pragma: no cover - depends on the environment
    pytorch_optimizer = None

#: name -> (optimizer class, keyword arguments); learning rates tuned so that
#: every optimizer reaches the loss target in the epoch budget.
OPTIMIZERS = {
    "SGD": (torch.optim.SGD, {"lr": 0.1}),
    "PHB": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "Adagrad": (torch.optim.Adagrad, {"lr": 0.02}),
    "Adam": (torch.optim.Adam, {"lr": 1e-3}),
}
if pytorch_optimizer is not None:
    OPTIMIZERS["AdaBound"] = (pytorch_optimizer.AdaBound, {"lr": 1e-3, "final_lr": 0.1})
    OPTIMIZERS["AdaShift"] = (pytorch_optimizer.AdaShift, {"lr": 3e-3})

#: column -> (flatness.sharpness kind, options).  The Hessian trace is the
#: exact one that minimum sharpness computes (its ``settings["trace"]``).
MEASURES = {
    "max eig": ("hessian_max_eig", {"tol": 1e-4}),
    "min. sharpness": ("minimum", {"granularity": "layer"}),
    "min. sharpness (neuron)": ("minimum", {"granularity": "neuron"}),
}


def digits(seed: int, n_train: int):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


@torch.no_grad()
def acc_and_loss(model: nn.Module, data) -> tuple[float, float]:
    out = model(data[0])
    return float((out.argmax(1) == data[1]).float().mean()), float(F.cross_entropy(out, data[1]))


def train(model, opt, data, *, batch_size, max_epochs, target_loss, seed) -> int:
    x, y = data
    gen = torch.Generator().manual_seed(seed)  # same batches in the same order for every run
    for epoch in range(1, max_epochs + 1):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                return loss

            opt.step(closure)
        if acc_and_loss(model, data)[1] < target_loss:
            return epoch
    return max_epochs


def correlations(values: list[float], target: list[float]) -> tuple[float, float]:
    if len(values) < 3:
        return math.nan, math.nan
    return float(kendalltau(values, target)[0]), float(pearsonr(values, target)[0])


def bootstrap_tau(values: list[float], target: list[float], n_boot: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of Kendall's tau over runs resampled with
    replacement (resamples with a constant column are skipped)."""
    if len(values) < 3 or n_boot < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    v, t = np.asarray(values), np.asarray(target)
    taus = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(v), len(v))
        if np.ptp(v[idx]) > 0 and np.ptp(t[idx]) > 0:
            taus.append(kendalltau(v[idx], t[idx])[0])
    taus = np.asarray(taus, dtype=float)
    taus = taus[np.isfinite(taus)]
    if taus.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(taus, [2.5, 97.5])
    return float(lo), float(hi)


def run_seed(args, seed: int, measures) -> tuple[list[dict], float, tuple]:
    """Train every (optimizer, SAM) pair for one seed and measure each run."""
    train_data, test_data = digits(seed, args.n_train)
    curv_data = list(zip(train_data[0][: args.n_eval].split(128), train_data[1][: args.n_eval].split(128)))
    t_start = time.perf_counter()
    rows = []
    for name in args.optimizers:
        cls, kwargs = OPTIMIZERS[name]
        for use_sam in (False, True):
            model = mlp(seed)
            opt = SAM(model.parameters(), cls, rho=args.rho, **kwargs) if use_sam else cls(model.parameters(), **kwargs)
            t0 = time.perf_counter()
            epochs = train(model, opt, train_data, batch_size=args.batch_size, max_epochs=args.max_epochs,
                           target_loss=args.target_loss, seed=seed)
            train_acc, train_loss = acc_and_loss(model, train_data)
            test_acc, test_loss = acc_and_loss(model, test_data)
            row = dict(name=name + (" + SAM" if use_sam else ""), opt=name, sam=use_sam, epochs=epochs,
                       train_acc=train_acc, test_acc=test_acc, train_loss=train_loss, test_loss=test_loss,
                       loss_gap=test_loss - train_loss, acc_gap=train_acc - test_acc)
            t1 = time.perf_counter()
            for col, (kind, opts) in measures.items():
                res = flatness.sharpness(model, curv_data, kind=kind, seed=seed, **opts)
                row[col] = res.value
                if kind == "minimum":  # the exact Hessian trace, from the same diagonal
                    row["trace"] = res.settings["trace"]
            row["min / trace"] = row["min. sharpness"] / row["trace"]
            row["curvature time"] = time.perf_counter() - t1
            row["time"] = time.perf_counter() - t0
            rows.append(row)
    return rows, time.perf_counter() - t_start, (train_data, test_data)


def report_seed(args, seed: int, rows: list[dict], seconds: float, split, cols: list[str]) -> dict:
    """Print one seed's tables; return its taus {(measure, gap): tau}."""
    test_data = split[1]
    curv = sum(r["curvature time"] for r in rows)
    print(f"seed {seed} - digits: {args.n_train} train / {len(test_data[1])} test; MLP 64-128-128-10 from the "
          f"same initial weights and the same batches (size {args.batch_size}); until train loss < "
          f"{args.target_loss} or {args.max_epochs} epochs; SAM rho {args.rho}; curvature on "
          f"{args.n_eval} training samples; {seconds:.0f} s in all, {curv:.0f} s of it curvature")
    print()
    all_cols = [*cols, "min / trace"]
    print("| optimizer | epochs | train acc % | test acc % | train loss | test loss | loss gap | acc gap % | "
          + " | ".join(all_cols) + " |")
    print("|---|" + "---:|" * (7 + len(all_cols)))
    for r in rows:
        cells = [r["name"], str(r["epochs"]), f"{100 * r['train_acc']:.2f}", f"{100 * r['test_acc']:.2f}",
                 f"{r['train_loss']:.4f}", f"{r['test_loss']:.4f}", f"{r['loss_gap']:.4f}",
                 f"{100 * r['acc_gap']:.2f}"] + [f"{r[c]:.4g}" for c in all_cols]
        print("| " + " | ".join(cells) + " |")

    # Only runs that reached the loss target are compared (the paper's
    # "converged" checkpoints): an unconverged run is sharp because it is early.
    done = [r for r in rows if r["train_loss"] < args.target_loss]
    which = f"the {len(done)} runs that reached train loss < {args.target_loss}"
    if len(done) < 3:
        done, which = rows, f"all runs (only {len(done)} reached train loss < {args.target_loss})"
    print(f"\nCorrelation with the generalization gap over {which} (Kendall's tau with a bootstrap "
          f"95 % interval over the runs, {args.bootstrap} resamples; Pearson's r):\n")
    print("| measure | vs loss gap: tau | 95 % CI | r | vs acc gap: tau | 95 % CI | r |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    taus = {}
    for col in all_cols:
        vals = [r[col] for r in done]
        cells = []
        for g in ("loss_gap", "acc_gap"):
            target = [r[g] for r in done]
            tau, r_ = correlations(vals, target)
            lo, hi = bootstrap_tau(vals, target, args.bootstrap, seed)
            taus[col, g] = tau
            cells += [f"{tau:+.3f}", f"[{lo:+.2f}, {hi:+.2f}]", f"{r_:+.3f}"]
        print(f"| {col} | " + " | ".join(cells) + " |")

    print("\nEffect of SAM, per optimizer (SAM run minus plain run):\n")
    print("| optimizer | test acc % | loss gap | " + " | ".join(f"{c} ratio" for c in cols) + " |")
    print("|---|" + "---:|" * (2 + len(cols)))
    for name in args.optimizers:
        plain, sam = (next(r for r in rows if r["opt"] == name and r["sam"] == s) for s in (False, True))
        cells = [f"{100 * (sam['test_acc'] - plain['test_acc']):+.2f}", f"{sam['loss_gap'] - plain['loss_gap']:+.4f}"]
        cells += [f"{sam[c] / plain[c]:.3f}" if plain[c] else "nan" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    return taus


def report_spread(args, all_rows: dict, all_taus: dict, cols: list[str]) -> None:
    """Every tau over the seeds, and how often SAM lowered each measure."""
    seeds = list(all_rows)
    all_cols = [*cols, "min / trace"]
    print(f"Spread over the {len(seeds)} seeds ({', '.join(map(str, seeds))}): Kendall's tau with the gap\n")
    head = " | ".join(f"seed {s}" for s in seeds)
    print(f"| measure | gap | {head} | mean | min | max |")
    print("|---|---|" + "---:|" * (len(seeds) + 3))
    for col in all_cols:
        for g, label in (("loss_gap", "loss"), ("acc_gap", "acc")):
            t = [all_taus[s][col, g] for s in seeds]
            cells = [f"{v:+.3f}" for v in t] + [f"{np.mean(t):+.3f}", f"{min(t):+.3f}", f"{max(t):+.3f}"]
            print(f"| {col} | {label} | " + " | ".join(cells) + " |")
    for g, label in (("loss_gap", "loss"), ("acc_gap", "accuracy")):
        best = []
        for s in seeds:
            top = max(all_taus[s][c, g] for c in cols)
            best.append(" = ".join(c for c in cols if all_taus[s][c, g] == top))
        print(f"\nHighest tau with the {label} gap, per seed: " + "; ".join(f"{s}: {b}" for s, b in zip(seeds, best)))
    pairs = [(s, name) for s in seeds for name in args.optimizers]
    print(f"\nSAM run below the plain run, out of {len(pairs)} (seed, optimizer) pairs:")
    for c in [*cols, "loss_gap"]:
        lower = 0
        for s, name in pairs:
            plain, sam = (next(r for r in all_rows[s] if r["opt"] == name and r["sam"] == x) for x in (False, True))
            lower += sam[c] < plain[c]
        print(f"- {c}: {lower}")
    acc = [(next(r for r in all_rows[s] if r["opt"] == n and r["sam"])["test_acc"]
            - next(r for r in all_rows[s] if r["opt"] == n and not r["sam"])["test_acc"]) for s, n in pairs]
    print(f"- SAM test accuracy higher / equal / lower: {sum(a > 0 for a in acc)} / "
          f"{sum(a == 0 for a in acc)} / {sum(a < 0 for a in acc)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--rho", type=float, default=0.05, help="SAM radius")
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-epochs", type=int, default=150)
    ap.add_argument("--target-loss", type=float, default=0.01)
    ap.add_argument("--n-eval", type=int, default=512, help="training samples for the curvature")
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="one study per seed, then their spread")
    ap.add_argument("--bootstrap", type=int, default=2000, help="resamples for the tau intervals")
    ap.add_argument("--plot", default="optimizers_minimum_sharpness.png", help="PNG path ('' for none)")
    ap.add_argument("--tiny", action="store_true", help="SGD and Adam, 2 epochs, cheap estimates")
    args = ap.parse_args()
    measures = MEASURES
    if args.tiny:
        args.optimizers, args.max_epochs, args.n_eval, args.bootstrap = ["SGD", "Adam"], 2, 64, 50
        measures = {k: (kind, {**o, "max_iter": 5} if kind == "hessian_max_eig" else o)
                    for k, (kind, o) in MEASURES.items()}
    torch.set_num_threads(1)  # small model: threads only add overhead

    if pytorch_optimizer is None:
        print("AdaBound and AdaShift: skipped (pip install pytorch_optimizer to include them)")
    else:
        print(f"AdaBound and AdaShift: from pytorch_optimizer {getattr(pytorch_optimizer, '__version__', '')}".rstrip()
              + (" (not selected in this run)" if not {"AdaBound", "AdaShift"} & set(args.optimizers) else ""))
    print()
    cols = ["trace", *measures]
    all_rows, all_taus = {}, {}
    for seed in args.seed:
        rows, seconds, split = run_seed(args, seed, measures)
        all_rows[seed] = rows
        all_taus[seed] = report_seed(args, seed, rows, seconds, split, cols)
    if len(args.seed) > 1:
        report_spread(args, all_rows, all_taus, cols)

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("\nmatplotlib is not installed: no plot")
            return
        from matplotlib.ticker import NullFormatter

        rows = all_rows[args.seed[0]]
        fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols) + 2.2, 3.4), constrained_layout=True)
        for ax, col in zip(axes, cols):
            for r in rows:
                ax.scatter(r[col], r["loss_gap"], marker="o" if r["sam"] else "s",
                           color=f"C{args.optimizers.index(r['opt'])}", label=r["name"])
            xs = [r[col] for r in rows]
            if min(xs) > 0 and max(xs) > 10 * min(xs):  # log axis only over a decade or more
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(col)
            ax.set_ylabel("test loss - train loss")
        axes[0].set_title(f"seed {args.seed[0]}", fontsize=9, loc="left")
        axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.savefig(args.plot, dpi=110)
        print(f"\nplot saved to {args.plot}")


if __name__ == "__main__":
    main()
