"""Does sharpness predict generalization?  A small-scale version of the study of
Andriushchenko et al. (2023), "A modern look at the relationship between
sharpness and generalization".

A grid of MLPs is trained on scikit-learn's digits, varying the width, the
learning rate, the SAM radius and the batch size.  Every model trains until
its training loss is below ``--target-loss`` (or for ``--max-epochs``), so all
of them fit the training set.  For each model several sharpness kinds are
measured on training data with ``flatness.sharpness`` - worst case (APGD) in
l-infinity and l2, standard and adaptive, with and without logit
normalization, and the average case - in batches of ``--bs-sharpness``
samples (m-sharpness with m = the batch, as the reference evaluator does).

The whole grid is trained once per ``--seeds`` value (the seed sets the data
split, the initialization and the batch order).  Training at lr 0.05 with
batch 16 is chaotic: the same seed on another CPU can take another path, so a
single run's Kendall taus move by up to about 0.3 and only what holds across
seeds is worth reading.

Printed (as Markdown), per seed: the models, then Kendall's tau between each
kind and the test error - with a 95% bootstrap confidence interval over the
models (percentile interval of tau over resamples of the compared models,
drawn with replacement) - and between each kind and the generalization gap
(test error - train error), as in the paper's tables, over the models that
reached the loss target.  Then, over the seeds: every kind's tau per seed
with its min / max, and how many seeds agree with each ordering between
kinds.  A PNG of sharpness against test error (all seeds) is saved when
matplotlib is installed.

    python examples/sharpness_vs_generalization.py            # 3 seeds, ~3 min on 2 CPU cores
    python examples/sharpness_vs_generalization.py --tiny     # smoke test, seconds
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import kendalltau
from sklearn.datasets import load_digits
from torch import nn

import flatness
from flatness.optim import SAM

#: (label, kind, rho, normalize_logits).  Radii are chosen so that each kind is
#: well above 0 and far from saturation on these models; the adaptive radii
#: are relative (d / |w|), the normalized-logit radii larger because the loss
#: of unit-norm logits changes slowly.
KINDS = [
    ("linf", "linf", 1e-3, False),
    ("l2", "l2", 0.2, False),
    ("adaptive linf", "adaptive_linf", 0.01, False),
    ("adaptive l2", "adaptive_l2", 0.5, False),
    ("linf, norm. logits", "linf", 5e-3, True),
    ("l2, norm. logits", "l2", 1.0, True),
    ("adaptive linf, norm. logits", "adaptive_linf", 0.03, True),
    ("adaptive l2, norm. logits", "adaptive_l2", 3.0, True),
    # average case: d = rho * c * N(0, I) per coordinate, so much smaller radii
    ("avg l2", "avg_l2", 0.02, False),
    ("avg adaptive l2", "avg_adaptive_l2", 0.2, False),
]


def digits(seed: int, n_train: int):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


@torch.no_grad()
def error_and_loss(model: nn.Module, data) -> tuple[float, float]:
    out = model(data[0])
    return float((out.argmax(1) != data[1]).float().mean()), float(F.cross_entropy(out, data[1]))


def train(model, data, *, lr, rho, batch_size, max_epochs, target_loss, seed) -> int:
    """SGD with momentum 0.9 (rho = 0) or SAM around it; returns the epochs used."""
    x, y = data
    if rho > 0:
        opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(1, max_epochs + 1):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                return loss

            opt.step(closure)
        if error_and_loss(model, data)[1] < target_loss:
            return epoch
    return max_epochs


def tau(a: list[float], b: list[float]) -> tuple[float, float]:
    res = kendalltau(a, b)
    return float(res[0]), float(res[1])


def bootstrap_ci(a: list[float], b: list[float], *, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of Kendall's tau over the models: the
    models are resampled with replacement ``n_boot`` times (private NumPy
    generator) and tau recomputed; resamples where tau is undefined (a
    constant column) are dropped."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    taus = np.array([kendalltau(x[i], y[i])[0] for i in idx])
    taus = taus[~np.isnan(taus)]
    if taus.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(taus, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:+.3f}"


def fmt_ci(ci: tuple[float, float]) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def run_grid(args, seed: int) -> list[dict]:
    """Train and measure every model of the grid with one seed."""
    train_data, test_data = digits(seed, args.n_train)
    x, y = train_data[0][: args.n_eval_sharpness], train_data[1][: args.n_eval_sharpness]
    sharp_batches = list(zip(x.split(args.bs_sharpness), y.split(args.bs_sharpness)))
    t_start = time.perf_counter()
    rows = []
    for width, lr, rho, bs in itertools.product(args.widths, args.lrs, args.sam_rhos, args.batch_sizes):
        model = mlp(width, seed)
        epochs = train(model, train_data, lr=lr, rho=rho, batch_size=bs, max_epochs=args.max_epochs,
                       target_loss=args.target_loss, seed=seed)
        train_err, train_loss = error_and_loss(model, train_data)
        test_err, _ = error_and_loss(model, test_data)
        sharp = {}
        for label, kind, r, norm in KINDS:
            opts = {"n_samples": args.n_samples} if kind.startswith("avg") else {"n_iters": args.n_iters}
            sharp[label] = flatness.sharpness(model, sharp_batches, kind=kind, rho=r, normalize_logits=norm,
                                              seed=seed, **opts).value
        rows.append(dict(width=width, lr=lr, sam_rho=rho, bs=bs, epochs=epochs, train_loss=train_loss,
                         train_err=train_err, test_err=test_err, sharp=sharp))
    print(f"## Seed {seed}\n")
    print(f"digits: {args.n_train} train / {len(test_data[1])} test; MLP 64-w-w-10 trained with SGD or SAM(SGD), "
          f"momentum 0.9, until train loss < {args.target_loss} (at most {args.max_epochs} epochs); sharpness on "
          f"{len(x)} training samples in batches of {args.bs_sharpness}, APGD {args.n_iters} iterations, "
          f"{args.n_samples} draws for the average case; {len(rows)} models, "
          f"{time.perf_counter() - t_start:.0f} s\n")
    return rows


#: orderings between kinds checked in every seed: (claim, kind a, kind b), "tau(a) > tau(b)"
ORDERINGS = [
    ("adaptive above plain, linf", "adaptive linf", "linf"),
    ("adaptive above plain, l2", "adaptive l2", "l2"),
    *[(f"normalized logits below plain, {k}", k, f"{k}, norm. logits")
      for k in ("linf", "l2", "adaptive linf", "adaptive l2")],
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.05])
    ap.add_argument("--sam-rhos", type=float, nargs="+", default=[0.0, 0.05, 0.2])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--target-loss", type=float, default=0.01)
    ap.add_argument("--n-eval-sharpness", type=int, default=512)
    ap.add_argument("--bs-sharpness", type=int, default=128)
    ap.add_argument("--n-iters", type=int, default=20, help="APGD iterations")
    ap.add_argument("--n-samples", type=int, default=50, help="draws for the average case")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="one training grid per seed (data split, initialization, batch order)")
    ap.add_argument("--seed", type=int, default=None, help="a single seed (same as --seeds SEED)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the tau intervals")
    ap.add_argument("--plot", default="sharpness_vs_generalization.png", help="PNG path ('' for none)")
    ap.add_argument("--tiny", action="store_true", help="2 models, 2 epochs, cheap sharpness (smoke test)")
    args = ap.parse_args()
    if args.tiny:
        args.widths, args.lrs, args.sam_rhos, args.batch_sizes = [16], [0.1], [0.0, 0.1], [64]
        args.max_epochs, args.n_eval_sharpness, args.n_iters, args.n_samples = 2, 64, 2, 2
        args.seeds, args.n_boot = [0, 1], 50
    if args.seed is not None:
        args.seeds = [args.seed]
    torch.set_num_threads(1)  # small models: threads only add overhead

    all_rows: dict[int, list[dict]] = {}
    all_taus: dict[int, dict[str, float]] = {}
    all_cis: dict[int, dict[str, tuple[float, float]]] = {}
    all_done: dict[int, list[dict]] = {}
    short = [f"s{i}" for i in range(len(KINDS))]
    for seed in args.seeds:
        rows = run_grid(args, seed)
        all_rows[seed] = rows
        print("| width | lr | SAM rho | batch | epochs | train loss | train err % | test err % | "
              + " | ".join(short) + " |")
        print("|" + "---:|" * (8 + len(KINDS)))
        for r in rows:
            cells = [str(r["width"]), f"{r['lr']:g}", f"{r['sam_rho']:g}", str(r["bs"]), str(r["epochs"]),
                     f"{r['train_loss']:.4f}", f"{100 * r['train_err']:.2f}", f"{100 * r['test_err']:.2f}"]
            cells += [f"{r['sharp'][label]:.4g}" for label, *_ in KINDS]
            print("| " + " | ".join(cells) + " |")

        # As in the paper, only models that fit the training set are compared (a
        # model stopped early is "sharp" simply because its loss is high).
        done = [r for r in rows if r["train_loss"] < args.target_loss]
        which = f"the {len(done)} models that reached train loss < {args.target_loss}"
        if len(done) < 3:
            which = f"all models (only {len(done)} reached train loss < {args.target_loss})"
            done = rows
        all_done[seed] = done
        test_err = [r["test_err"] for r in done]
        gap = [r["test_err"] - r["train_err"] for r in done]
        all_err = [r["test_err"] for r in rows]
        print(f"\nKendall's tau between sharpness and generalization, seed {seed}, over {which} "
              f"(95% CI: bootstrap over these models, {args.n_boot} resamples; last column: all {len(rows)} "
              "models):\n")
        print("| | sharpness kind | rho | tau vs test error | 95% CI | p | tau vs gap | p | tau vs test error (all) |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        taus, cis = {}, {}
        entries = [(s, label, f"{label} (`{kind}`)", f"{r:g}", [row["sharp"][label] for row in done],
                    [row["sharp"][label] for row in rows]) for s, (label, kind, r, _) in zip(short, KINDS)]
        # Baselines that need no perturbation at all, for scale.
        entries += [("", label, label, "", [row[key] for row in done], [row[key] for row in rows])
                    for label, key in (("train loss", "train_loss"), ("SAM rho used in training", "sam_rho"))]
        for s, label, name, r, vals, vals_all in entries:
            (t1, p1), (t2, p2) = tau(vals, test_err), tau(vals, gap)
            t3 = tau(vals_all, all_err)[0]
            taus[label], cis[label] = t1, bootstrap_ci(vals, test_err, n_boot=args.n_boot, seed=seed)
            print(f"| {s} | {name} | {r} | {fmt(t1)} | {fmt_ci(cis[label])} | {p1:.3f} | {fmt(t2)} | {p2:.3f} "
                  f"| {fmt(t3)} |")
        all_taus[seed], all_cis[seed] = taus, cis
        print()

    if len(args.seeds) > 1:
        seeds = args.seeds
        print(f"## Over {len(seeds)} seeds\n")
        print("Kendall's tau vs test error per seed (over the models that reached the loss target; "
              "95% bootstrap CI in brackets):\n")
        print("| sharpness kind | " + " | ".join(f"seed {s}" for s in seeds) + " | min | max |")
        print("|---|" + "---:|" * (len(seeds) + 2))
        for label in all_taus[seeds[0]]:
            vals = [all_taus[s][label] for s in seeds]
            cells = [f"{fmt(all_taus[s][label])} {fmt_ci(all_cis[s][label])}" for s in seeds]
            print(f"| {label} | " + " | ".join(cells) + f" | {fmt(min(vals))} | {fmt(max(vals))} |")
        print("\nModels compared per seed: " + ", ".join(f"{len(all_done[s])}/{len(all_rows[s])}" for s in seeds))
        print("\nOrderings between kinds (tau vs test error), seeds in which each holds:\n")
        for claim, a, b in ORDERINGS:
            held = [s for s in seeds if all_taus[s][a] > all_taus[s][b]]
            print(f"- {claim}: {len(held)}/{len(seeds)} seeds")
        strongest = [s for s in seeds if all(abs(all_taus[s]["SAM rho used in training"]) > all_taus[s][label]
                                             for label, *_ in KINDS)]
        print(f"- |tau| of the SAM radius above every kind: {len(strongest)}/{len(seeds)} seeds")
        excl = [s for s in seeds if all(all_cis[s][label][0] > 0 for label, *_ in KINDS)]
        print(f"- every kind's 95% CI above 0: {len(excl)}/{len(seeds)} seeds")

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("\nmatplotlib is not installed: no plot")
            return
        from matplotlib.ticker import NullFormatter

        n = len(KINDS)
        cols = 5
        fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(3.3 * cols, 3.3 * math.ceil(n / cols)),
                                 constrained_layout=True)
        pooled = [r for s in args.seeds for r in all_done[s]]
        colors = [r["sam_rho"] for r in pooled]
        markers = "os^Dv<>p*h"
        for ax, (label, *_rest) in zip(axes.flat, KINDS):
            for i, s in enumerate(args.seeds):
                sc = ax.scatter([r["sharp"][label] for r in all_done[s]], [100 * r["test_err"] for r in all_done[s]],
                                c=[r["sam_rho"] for r in all_done[s]], cmap="viridis", vmin=min(colors),
                                vmax=max(colors), s=18, marker=markers[i % len(markers)], label=f"seed {s}")
            span = [all_taus[s][label] for s in args.seeds]
            title = f"tau = {fmt(span[0])}" if len(span) == 1 else f"tau {fmt(min(span))} .. {fmt(max(span))}"
            ax.set_title(f"{label}\n{title}", fontsize=9)
            xs = [r["sharp"][label] for r in pooled]
            if min(xs) > 0 and max(xs) > 10 * min(xs):  # log axis only over a decade or more
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(labelsize=7)
            ax.set_xlabel("sharpness", fontsize=8)
            ax.set_ylabel("test error (%)", fontsize=8)
        if len(args.seeds) > 1:
            axes.flat[0].legend(fontsize=6)
        fig.colorbar(sc, ax=axes, label="SAM rho in training", shrink=0.6)
        fig.savefig(args.plot, dpi=110, bbox_inches="tight")
        print(f"\nplot saved to {args.plot}")


if __name__ == "__main__":
    main()
