"""Loss landscapes on scikit-learn's digits: SGD vs SAM, a training
trajectory, and the loss barriers of an ensemble.

Three figures, written to ``--out`` (default ``docs/results/``):

* ``landscape_sgd_vs_sam.png``: 2-D filter-normalised slices (Li et al.,
  2018) around an SGD and a SAM solution trained from the same start on the
  same batches, on one colour scale;
* ``landscape_pca_trajectory.png``: the loss on the plane of the two
  principal directions of SGD's trajectory (a checkpoint per epoch),
  the trajectory overlaid;
* ``landscape_barriers.png``: the pairwise loss barrier (Entezari et al.,
  2022) of three SGD runs from different seeds, and the loss along one line.

and ``landscape.json`` with the numbers.

    python examples/landscape.py            # ~15 s on one CPU core
    python examples/landscape.py --tiny     # seconds (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import flatness.landscape as L
from flatness.optim import SAM


def digits(seed: int):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train(model, data, *, epochs, lr, batch_size, seed, rho=None, checkpoints=None):
    """SGD (``rho=None``) or SAM; appends a state dict per epoch to ``checkpoints``."""
    x, y = data
    if rho is None:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    if checkpoints is not None:
        checkpoints.append(copy.deepcopy(model.state_dict()))
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            xb, yb = x[idx], y[idx]

            def closure(xb=xb, yb=yb):
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            opt.zero_grad()
            if rho is None:
                closure()
                opt.step()
            else:
                opt.step(closure)
        if checkpoints is not None:
            checkpoints.append(copy.deepcopy(model.state_dict()))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=25, help="grid points per axis")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "results"))
    ap.add_argument("--tiny", action="store_true", help="2 epochs, a 5x5 grid (smoke test)")
    args = ap.parse_args()
    if args.tiny:
        args.epochs, args.steps = 2, 5
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_data, test_data = digits(0)
    report: dict = {"settings": vars(args)}

    # SGD and SAM from the same start on the same batches
    ckpts: list = []
    sgd = train(make_model(0), train_data, epochs=args.epochs, lr=args.lr, batch_size=64, seed=1, checkpoints=ckpts)
    sam = train(make_model(0), train_data, epochs=args.epochs, lr=args.lr, batch_size=64, seed=1, rho=args.rho)
    grid = (-1.0, 1.0, args.steps)
    surfaces = {}
    for name, model in (("SGD", sgd), ("SAM", sam)):
        d = L.directions(model, "filter", seed=0)
        surfaces[name] = L.slice(model, train_data, d, grid=grid)
        report[name] = {"center_loss": surfaces[name].center_loss,
                        "mean_loss_on_plane": float(surfaces[name].loss.mean()),
                        "test_accuracy": float((model(test_data[0]).argmax(1) == test_data[1]).float().mean())}
    lo = min(float(s.loss.min()) for s in surfaces.values())
    hi = min(max(float(s.loss.max()) for s in surfaces.values()), 5.0)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
    for ax, (name, s) in zip(axes, surfaces.items()):
        s.plot(ax, vmin=lo, vmax=hi, colorbar=name == "SAM")
        ax.set_title(f"{name}: train loss {s.center_loss:.3f} at the centre")
    fig.suptitle("Filter-normalised 2-D slices, one colour scale")
    fig.savefig(out / "landscape_sgd_vs_sam.png", dpi=110)
    plt.close(fig)

    # PCA of SGD's trajectory (one checkpoint per epoch, relative to the end)
    pca = L.directions(sgd, "pca", checkpoints=ckpts[:-1])
    traj = torch.tensor(pca.trajectory)
    pad = 0.25 * (traj.max(0).values - traj.min(0).values) + 1e-3
    axes_grid = [(float(traj[:, k].min() - pad[k]), float(traj[:, k].max() + pad[k]), args.steps) for k in range(2)]
    plane = L.slice(sgd, train_data, pca, grid=axes_grid)
    fig, ax = plt.subplots(figsize=(5.5, 4.5), constrained_layout=True)
    plane.plot(ax, log=True)
    r1, r2 = pca.explained_variance_ratio
    ax.set_xlabel(f"PC1 ({100 * r1:.1f}% of the variance)")
    ax.set_ylabel(f"PC2 ({100 * r2:.1f}%)")
    ax.set_title("SGD trajectory on the PCA plane (star: final weights)")
    fig.savefig(out / "landscape_pca_trajectory.png", dpi=110)
    plt.close(fig)
    report["pca"] = {"explained_variance_ratio": pca.explained_variance_ratio}

    # Loss barriers of a 3-member ensemble (SGD, different seeds)
    members = [train(make_model(s), train_data, epochs=args.epochs, lr=args.lr, batch_size=64, seed=10 + s)
               for s in (1, 2, 3)]
    barrier = L.loss_barrier(members, test_data, n_points=args.steps)
    line = L.interpolate(members[0], members[1], test_data, n_points=args.steps)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    barrier.plot(axes[0])
    axes[0].set_title("test-loss barrier (Entezari et al.)")
    line.plot(axes[1])
    axes[1].set_title(f"members 0 -> 1: barrier {line.barrier:.3f}")
    fig.savefig(out / "landscape_barriers.png", dpi=110)
    plt.close(fig)
    report["barrier_matrix"] = barrier.matrix.tolist()
    report["wall_time_s"] = time.perf_counter() - start

    lines = [f"{'':5} {'centre loss':>12} {'mean on plane':>14} {'test acc':>9}"]
    for name in ("SGD", "SAM"):
        r = report[name]
        lines.append(f"{name:5} {r['center_loss']:12.4f} {r['mean_loss_on_plane']:14.4f} {r['test_accuracy']:9.3f}")
    lines.append(f"PCA explained variance ratios: {', '.join(f'{v:.3f}' for v in pca.explained_variance_ratio)}")
    lines.append("test-loss barrier matrix (Entezari et al.):")
    lines += ["  " + "  ".join(f"{v:7.4f}" for v in row) for row in barrier.matrix.tolist()]
    text = "\n".join(lines)
    print(text)
    command = "python examples/landscape.py" + (" --tiny" if args.tiny else "")
    (out / "landscape.md").write_text(f"{command}  ({args.epochs} epochs, {args.steps}x{args.steps} grid)\n\n"
                                      + text + "\n", encoding="utf-8")
    (out / "landscape.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"figures and landscape.json in {out} ({report['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
