"""Optimizers, SAM and minimum sharpness: a small-scale version of seed 001
("Generalization properties of learning algorithms and SAM based on minimum
sharpness").

One MLP (64-128-128-10, ReLU, with biases) is trained on scikit-learn's
digits from the same initial weights by SGD, heavy-ball SGD (PHB), Adagrad
and Adam - and by AdaBound and AdaShift when ``pytorch_optimizer`` is
installed (it is optional; the output says whether they ran) - each alone
and inside ``flatness.optim.SAM``.  Every run trains until its training loss
is below ``--target-loss`` (the seed's "converged" checkpoint) or for
``--max-epochs``.

For each run: train and test accuracy, the generalization gap (test loss -
train loss, and train accuracy - test accuracy), and on training data the
Hessian trace, the top Hessian eigenvalue and minimum sharpness (Ibayashi et
al. 2021: the trace minimized over the rescalings that leave the ReLU network
unchanged, per layer as in the paper), all through ``flatness.sharpness``,
and the fraction of the trace that minimum sharpness keeps (both from the
same Hutchinson probes).  Then Kendall's tau and Pearson's r between each
measure and the gap across runs, and the mean effect of SAM on each.

    python examples/optimizers_minimum_sharpness.py          # ~3 min on 2 CPU cores
    python examples/optimizers_minimum_sharpness.py --tiny   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import math
import time

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

#: column -> (flatness.sharpness kind, options)
#: (Hutchinson estimates; the per-neuron minimum is left out because with
#: estimated diagonals its many small blocks are dominated by clipped noise.)
MEASURES = {
    "trace": ("hessian_trace", {"n_samples": 90}),
    "max eig": ("hessian_max_eig", {"tol": 1e-4}),
    "min. sharpness": ("minimum", {"granularity": "layer", "n_samples": 100}),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--rho", type=float, default=0.05, help="SAM radius")
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-epochs", type=int, default=150)
    ap.add_argument("--target-loss", type=float, default=0.01)
    ap.add_argument("--n-eval", type=int, default=512, help="training samples for the curvature")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="optimizers_minimum_sharpness.png", help="PNG path ('' for none)")
    ap.add_argument("--tiny", action="store_true", help="SGD and Adam, 2 epochs, cheap estimates")
    args = ap.parse_args()
    measures = MEASURES
    if args.tiny:
        args.optimizers, args.max_epochs, args.n_eval = ["SGD", "Adam"], 2, 64
        measures = {k: (kind, {**o, "n_samples": 4} if "n_samples" in o else {"max_iter": 5})
                    for k, (kind, o) in MEASURES.items()}
    torch.set_num_threads(1)  # small model: threads only add overhead

    train_data, test_data = digits(args.seed, args.n_train)
    curv_data = list(zip(train_data[0][: args.n_eval].split(128), train_data[1][: args.n_eval].split(128)))
    t_start = time.perf_counter()
    rows = []
    for name in args.optimizers:
        cls, kwargs = OPTIMIZERS[name]
        for use_sam in (False, True):
            model = mlp(args.seed)
            opt = SAM(model.parameters(), cls, rho=args.rho, **kwargs) if use_sam else cls(model.parameters(), **kwargs)
            t0 = time.perf_counter()
            epochs = train(model, opt, train_data, batch_size=args.batch_size, max_epochs=args.max_epochs,
                           target_loss=args.target_loss, seed=args.seed)
            train_acc, train_loss = acc_and_loss(model, train_data)
            test_acc, test_loss = acc_and_loss(model, test_data)
            row = dict(name=name + (" + SAM" if use_sam else ""), opt=name, sam=use_sam, epochs=epochs,
                       train_acc=train_acc, test_acc=test_acc, train_loss=train_loss, test_loss=test_loss,
                       loss_gap=test_loss - train_loss, acc_gap=train_acc - test_acc)
            for col, (kind, opts) in measures.items():
                res = flatness.sharpness(model, curv_data, kind=kind, seed=args.seed, **opts)
                row[col] = res.value
                if kind == "minimum":  # its own trace estimate, from the same probes
                    row["min / trace"] = res.value / res.settings["trace"]
            row["time"] = time.perf_counter() - t0
            rows.append(row)

    print(f"digits: {args.n_train} train / {len(test_data[1])} test; MLP 64-128-128-10 from the same "
          f"initial weights and the same batches (size {args.batch_size}); until train loss < "
          f"{args.target_loss} or {args.max_epochs} epochs; SAM rho {args.rho}; curvature on "
          f"{args.n_eval} training samples; {time.perf_counter() - t_start:.0f} s in all")
    if pytorch_optimizer is None:
        print("AdaBound and AdaShift: skipped (pip install pytorch_optimizer to include them)")
    else:
        print(f"AdaBound and AdaShift: from pytorch_optimizer {getattr(pytorch_optimizer, '__version__', '')}".rstrip()
              + (" (not selected in this run)" if not {"AdaBound", "AdaShift"} & set(args.optimizers) else ""))
    print()
    cols = list(measures)
    all_cols = [*cols, "min / trace"]
    print("| optimizer | epochs | train acc % | test acc % | train loss | test loss | loss gap | acc gap % | "
          + " | ".join(all_cols) + " |")
    print("|---|" + "---:|" * (7 + len(all_cols)))
    for r in rows:
        cells = [r["name"], str(r["epochs"]), f"{100 * r['train_acc']:.2f}", f"{100 * r['test_acc']:.2f}",
                 f"{r['train_loss']:.4f}", f"{r['test_loss']:.4f}", f"{r['loss_gap']:.4f}",
                 f"{100 * r['acc_gap']:.2f}"] + [f"{r[c]:.4g}" for c in all_cols]
        print("| " + " | ".join(cells) + " |")

    # Only runs that reached the loss target are compared (the seed's
    # "converged" checkpoints): an unconverged run is sharp because it is early.
    done = [r for r in rows if r["train_loss"] < args.target_loss]
    which = f"the {len(done)} runs that reached train loss < {args.target_loss}"
    if len(done) < 3:
        done, which = rows, f"all runs (only {len(done)} reached train loss < {args.target_loss})"
    print(f"\nCorrelation with the generalization gap over {which} (Kendall's tau / Pearson's r):\n")
    print("| measure | vs loss gap: tau | r | vs acc gap: tau | r |")
    print("|---|---:|---:|---:|---:|")
    for col in all_cols:
        vals = [r[col] for r in done]
        (t1, r1), (t2, r2) = (correlations(vals, [r[g] for r in done]) for g in ("loss_gap", "acc_gap"))
        print(f"| {col} | {t1:+.3f} | {r1:+.3f} | {t2:+.3f} | {r2:+.3f} |")

    print("\nEffect of SAM, per optimizer (SAM run minus plain run):\n")
    print("| optimizer | test acc % | loss gap | " + " | ".join(f"{c} ratio" for c in cols) + " |")
    print("|---|" + "---:|" * (2 + len(cols)))
    for name in args.optimizers:
        plain, sam = (next(r for r in rows if r["opt"] == name and r["sam"] == s) for s in (False, True))
        cells = [f"{100 * (sam['test_acc'] - plain['test_acc']):+.2f}", f"{sam['loss_gap'] - plain['loss_gap']:+.4f}"]
        cells += [f"{sam[c] / plain[c]:.3f}" if plain[c] else "nan" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("\nmatplotlib is not installed: no plot")
            return
        from matplotlib.ticker import NullFormatter

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
        axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.savefig(args.plot, dpi=110)
        print(f"\nplot saved to {args.plot}")


if __name__ == "__main__":
    main()
