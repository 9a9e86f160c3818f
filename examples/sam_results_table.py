"""SGD vs SAM (Foret et al., 2021, "Sharpness-Aware Minimization for
Efficiently Improving Generalization"): the results table of an unofficial
JAX implementation of it, at small scale: ACC / NLL / calibrated NLL on
train, valid and test, mean over seeds.

That implementation trains ResNets with BatchNorm on CIFAR (SGD with momentum 0.9, lr 0.1,
weight decay 5e-4, batch 128, 5 warm-up epochs then cosine decay) with
``rho = 0`` (plain SGD) and ``rho = 0.2``, for several epoch budgets.  Here
the same recipe trains a small BN-ReLU CNN on scikit-learn's 8x8 digits,
split into train / valid / test, with ``flatness.optim.SAM`` around
``torch.optim.SGD`` (BatchNorm statistics updated in the first pass only).

cNLL is the NLL after temperature scaling, the temperature fitted on the
valid split (``flatness.diversity.ensemble_metrics`` with
``calibration=valid``) and applied to every split, so train cNLL can exceed
train NLL, as in that implementation's tables.

    python examples/sam_results_table.py           # ~3 min on 2 CPU cores
    python examples/sam_results_table.py --tiny    # smoke test, seconds
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from flatness.diversity import ensemble_metrics
from flatness.optim import SAM

SPLITS = ("train", "valid", "test")
METRICS = ("accuracy", "nll", "cnll")


def digits(n_train: int, n_valid: int):
    """One fixed split for every run (the seeds vary initialization and batch order)."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    a, b = n_train, n_train + n_valid
    return {"train": (x[:a], y[:a]), "valid": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}


def cnn(seed: int) -> nn.Module:
    """Conv-BN-ReLU blocks and global average pooling, a tiny cousin of R20-BN-ReLU."""
    torch.manual_seed(seed)

    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, 16, 1), *block(16, 32, 2), *block(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def train(model, data, *, epochs, rho, lr, weight_decay, batch_size, warmup, seed):
    x, y = data
    kwargs = dict(lr=lr, momentum=0.9, weight_decay=weight_decay)
    if rho > 0:
        opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, model=model, freeze_bn=True, **kwargs)
    else:
        opt = torch.optim.SGD(model.parameters(), **kwargs)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    total, warm = epochs * steps_per_epoch, warmup * steps_per_epoch

    def schedule(step):  # linear warm-up, then cosine decay to 0 (per step)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    # A scheduler sees the base optimizer's groups through SAM.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                return loss

            opt.step(closure)
            sched.step()
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, nargs="+", default=[50, 100])
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.0, 0.2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5, help="warm-up epochs")
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--n-valid", type=int, default=300)
    ap.add_argument("--plot", default="sam_results_table.png", help="PNG path ('' for none)")
    ap.add_argument("--tiny", action="store_true", help="one seed, 2 epochs (smoke test)")
    args = ap.parse_args()
    if args.tiny:
        args.epochs, args.seeds, args.warmup = [2], [0], 1
    torch.set_num_threads(1)  # tiny model: threads only add overhead

    data = digits(args.n_train, args.n_valid)
    t_start = time.perf_counter()
    # results[(epochs, rho)][split][metric] -> list over seeds
    results: dict = {}
    for epochs in args.epochs:
        for rho in args.rhos:
            cell = results[(epochs, rho)] = {s: {m: [] for m in METRICS} for s in SPLITS}
            for seed in args.seeds:
                model = cnn(seed)
                train(model, data["train"], epochs=epochs, rho=rho, lr=args.lr, weight_decay=args.weight_decay,
                      batch_size=args.batch_size, warmup=args.warmup, seed=seed)
                for split in SPLITS:
                    m = ensemble_metrics([model], data[split], calibration=data["valid"]).ensemble
                    for k in METRICS:
                        cell[split][k].append(m[k])

    sizes = " / ".join(f"{len(data[s][1])} {s}" for s in SPLITS)
    print(f"digits (8x8, {sizes}); CNN 16-32-64 BN-ReLU; SGD momentum 0.9, lr {args.lr}, weight decay "
          f"{args.weight_decay}, batch {args.batch_size}, {args.warmup} warm-up epochs then cosine; "
          f"SAM = flatness.optim.SAM(SGD, rho); mean over seeds {args.seeds}; "
          f"{time.perf_counter() - t_start:.0f} s\n")

    def mean(v):
        return statistics.fmean(v)

    def std(v):
        return statistics.stdev(v) if len(v) > 1 else 0.0

    print("| Epoch | ρ    | Train ACC / NLL / cNLL | Valid ACC / NLL / cNLL | Test ACC / NLL / cNLL  |")
    print("| :-:   | :-:  | :-:                    | :-:                    | :-:                    |")
    for epochs in args.epochs:
        for i, rho in enumerate(args.rhos):
            cell = results[(epochs, rho)]
            parts = [f"{100 * mean(cell[s]['accuracy']):.2f} / {mean(cell[s]['nll']):.3f} / "
                     f"{mean(cell[s]['cnll']):.3f}" for s in SPLITS]
            print(f"| {epochs if i == 0 else '':<5} | {rho:.2f} | " + " | ".join(f"{p:<22}" for p in parts) + " |")

    print("\nStandard deviation over seeds (test split):\n")
    print("| Epoch | ρ | Test ACC | Test NLL | Test cNLL |")
    print("| :-: | :-: | :-: | :-: | :-: |")
    for epochs in args.epochs:
        for rho in args.rhos:
            t = results[(epochs, rho)]["test"]
            print(f"| {epochs} | {rho:.2f} | {100 * std(t['accuracy']):.2f} | {std(t['nll']):.3f} | "
                  f"{std(t['cnll']):.3f} |")

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("\nmatplotlib is not installed: no plot")
            return
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        width = 0.8 / len(args.rhos)
        for ax, metric in zip(axes, METRICS):
            for j, rho in enumerate(args.rhos):
                vals = [results[(e, rho)]["test"][metric] for e in args.epochs]
                scale = 100 if metric == "accuracy" else 1
                ax.bar([i + j * width for i in range(len(args.epochs))], [scale * mean(v) for v in vals], width,
                       yerr=[scale * std(v) for v in vals], label=f"rho = {rho:g}" + (" (SGD)" if rho == 0 else ""))
            ax.set_xticks([i + width * (len(args.rhos) - 1) / 2 for i in range(len(args.epochs))],
                          [f"{e} epochs" for e in args.epochs])
            ax.set_title(f"test {'ACC (%)' if metric == 'accuracy' else metric.upper().replace('CNLL', 'cNLL')}")
            lo = min(min(results[(e, r)]["test"][metric]) for e in args.epochs for r in args.rhos)
            if metric == "accuracy":
                ax.set_ylim(scale * lo - 2, 100)
            else:
                ax.set_ylim(bottom=0)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"\nplot saved to {args.plot}")


if __name__ == "__main__":
    main()
