"""The SAM family against plain SGD on scikit-learn's digits, same budget.

Every optimizer trains the same MLP (64-128-128-10) from the same weights on
the same mini-batches for the same number of epochs (optimizer steps), over
several seeds.  Printed per optimizer (mean +- std over the seeds): test
accuracy, test NLL, calibrated NLL (temperature fitted on a held-out split),
the adaptive l-infinity sharpness of the final weights (worst case,
``flatness.sharpness``) and the wall time per epoch (median over epochs).  ``--out DIR`` also
writes the table (Markdown) and a plot of accuracy against time per epoch.

    python examples/sam_family.py                         # 5 seeds, ~5 min on 2 CPU cores
    python examples/sam_family.py --out docs/results      # + sam_family.md / .png
    python examples/sam_family.py --tiny                  # seconds (smoke test)

Settings: SGD with momentum 0.9 as the base everywhere; BayesianSAM is its
own Adam-like optimizer (lr 10x, as its momentum is averaged, rho / 2 in its
1 / s metric, prior precision 1e-3); rho 0.1 for the other variants; LookSAM k=5;
ESAM beta=0.6, gamma=0.5; MESA with an EMA decay of 0.99 (about five epochs
of memory at this scale, the paper's 0.9998 is for ImageNet) from the
second epoch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import flatness
from flatness.diversity import ensemble_metrics
from flatness.optim import ESAM, GSAM, MESA, SAM, WSAM, BayesianSAM, FriendlySAM, LookSAM

NAMES = ["SGD", "SAM", "GSAM", "LookSAM", "WSAM", "FriendlySAM", "BayesianSAM", "ESAM", "MESA"]


def digits(seed: int):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    # train / calibration (for the calibrated NLL) / test
    return (x[:1200], y[:1200]), (x[1200:1400], y[1200:1400]), (x[1400:], y[1400:])


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def make_optimizer(name: str, model: nn.Module, args, steps_per_epoch: int, seed: int):
    p, sgd = model.parameters(), {"lr": args.lr, "momentum": 0.9}
    rho = args.rho
    if name == "SGD":
        return torch.optim.SGD(p, **sgd)
    if name == "SAM":
        return SAM(p, torch.optim.SGD, rho=rho, **sgd)
    if name == "GSAM":
        return GSAM(p, torch.optim.SGD, rho=rho, alpha=0.1, **sgd)
    if name == "LookSAM":
        return LookSAM(p, torch.optim.SGD, rho=rho, k=5, alpha=0.7, **sgd)
    if name == "WSAM":
        return WSAM(p, torch.optim.SGD, rho=rho, gamma=0.8, **sgd)
    if name == "FriendlySAM":
        return FriendlySAM(p, torch.optim.SGD, rho=rho, sigma=1.0, lmbda=0.9, **sgd)
    if name == "BayesianSAM":
        # its step is lr g_m / s with an averaged (not summed) momentum and s ~ 1:
        # lr 10x SGD-momentum's is the same step size (the paper uses 0.5)
        return BayesianSAM(p, num_data=1200, lr=10 * args.lr, weight_decay=1e-3, rho=rho / 2, seed=seed)
    if name == "ESAM":
        return ESAM(p, torch.optim.SGD, rho=rho, beta=0.6, gamma=0.5, seed=seed, **sgd)
    if name == "MESA":
        return MESA(p, torch.optim.SGD, model=model, decay=0.99, lam=0.3, tau=5.0,
                    start_step=steps_per_epoch, **sgd)
    raise ValueError(name)


def train_step(name: str, model: nn.Module, opt, xb, yb) -> None:
    if name == "SGD":
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    elif name == "ESAM":
        def closure(mask=None):
            xs, ys = (xb, yb) if mask is None else (xb[mask], yb[mask])
            return F.cross_entropy(model(xs), ys, reduction="none")

        opt.step(closure)
    elif name == "MESA":
        opt.zero_grad()
        out = model(xb)
        (F.cross_entropy(out, yb) + opt.trajectory_loss(out, xb)).backward()
        opt.step()
    else:
        def closure():
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)


def run(name: str, seed: int, args) -> dict[str, float]:
    train_data, cal_data, test_data = digits(seed)
    model = make_model(seed)
    x, y = train_data
    steps_per_epoch = -(-len(y) // args.batch_size)
    opt = make_optimizer(name, model, args, steps_per_epoch, seed)
    gen = torch.Generator().manual_seed(seed)
    epoch_times = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        for idx in torch.randperm(len(y), generator=gen).split(args.batch_size):
            train_step(name, model, opt, x[idx], y[idx])
        epoch_times.append(time.perf_counter() - t0)
    per_epoch = statistics.median(epoch_times)  # robust to bursts of load on a shared machine
    model.eval()
    m = ensemble_metrics([model], test_data, calibration=cal_data).ensemble
    batches = list(zip(x.split(256), y.split(256)))
    sharp = flatness.sharpness(model, batches, kind="adaptive_linf", rho=2e-3, n_iters=args.sharp_iters, seed=0)
    return {"acc": m["accuracy"], "nll": m["nll"], "cnll": m["cnll"], "sharp": sharp.value, "epoch_s": per_epoch}


def summarize(results: dict[str, list[dict[str, float]]]) -> list[tuple[str, dict[str, tuple[float, float]]]]:
    rows = []
    for name, runs in results.items():
        stats = {}
        for key in runs[0]:
            vals = [r[key] for r in runs]
            stats[key] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        rows.append((name, stats))
    return rows


def table(rows, header: str) -> str:
    cols = [("acc", "test acc", 4), ("nll", "test NLL", 4), ("cnll", "test cNLL", 4),
            ("sharp", "adapt. linf sharpness", 4), ("epoch_s", "s / epoch", 4)]
    lines = [header, "", "| optimizer | " + " | ".join(t for _, t, _ in cols) + " | time vs SGD |",
             "|---|" + "---|" * (len(cols) + 1)]
    base = dict(rows)["SGD"]["epoch_s"][0] if "SGD" in dict(rows) else None
    for name, st in rows:
        cells = [f"{st[k][0]:.{d}f} +- {st[k][1]:.{d}f}" for k, _, d in cols]
        ratio = f"{st['epoch_s'][0] / base:.2f}x" if base else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def plot(rows, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, st in rows:
        ax.errorbar(st["epoch_s"][0] * 1e3, st["acc"][0], xerr=st["epoch_s"][1] * 1e3, yerr=st["acc"][1],
                    fmt="o", capsize=3)
        ax.annotate(name, (st["epoch_s"][0] * 1e3, st["acc"][0]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xlabel("wall time per epoch (ms)")
    ax.set_ylabel("test accuracy")
    ax.set_title("digits MLP, same number of epochs (mean +- std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--sharp-iters", type=int, default=20, help="APGD iterations of the sharpness")
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(NAMES))
    ap.add_argument("--out", type=Path, default=None, help="write sam_family.md and sam_family.png here")
    ap.add_argument("--tiny", action="store_true", help="1 seed, 1 epoch, a cheap sharpness (smoke test)")
    args = ap.parse_args()
    if args.tiny:
        args.epochs, args.seeds, args.sharp_iters = 1, 1, 2
    torch.set_num_threads(1)  # tiny model: threads only add overhead
    names = NAMES if args.only is None else args.only.split(",")

    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for seed in range(args.seeds):
        for name in names:  # interleaved over seeds, so machine load hits all alike
            results[name].append(run(name, seed, args))
    rows = summarize(results)
    header = (f"digits (1200 train / 200 calibration / 397 test), MLP 64-128-128-10, {args.epochs} epochs, "
              f"batch {args.batch_size}, lr {args.lr}, momentum 0.9, rho {args.rho}, {args.seeds} seeds; "
              f"torch {torch.__version__}, 1 CPU thread")
    text = table(rows, header)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sam_family.md").write_text(text + "\n")
        if plot(rows, args.out / "sam_family.png"):
            print(f"wrote {args.out / 'sam_family.md'} and {args.out / 'sam_family.png'}")


if __name__ == "__main__":
    main()
