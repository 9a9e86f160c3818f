"""Quickstart: train a small MLP on scikit-learn's digits, then measure its
sharpness with every kind that ``flatness.sharpness`` offers.

A sharpness value of a perturbation kind is a loss increase: the training
loss at the perturbed weights minus the loss at the trained weights (the
worst perturbation within radius ``rho`` found by APGD, or the mean over
random ones).  The curvature kinds are Hessian quantities at the weights.

    python examples/quickstart.py            # about 5 s of CPU time on one thread
    python examples/quickstart.py --tiny     # a smoke run of a few seconds
"""

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import flatness

#: A radius per kind, in the ranges used in the literature for each set.
RHO = {
    "linf": 1e-3, "l2": 0.1, "adaptive_linf": 2e-3, "adaptive_l2": 0.1,
    "avg_linf": 1e-2, "avg_l2": 1e-2, "avg_adaptive_linf": 0.05, "avg_adaptive_l2": 0.05,
}
#: What each kind measures, one line each (docs/definitions.rst has the formulas).
MEANING = {
    "linf": "worst loss increase, |d_i| <= rho for every weight",
    "l2": "worst loss increase, ||d|| <= rho",
    "adaptive_linf": "worst loss increase, |d_i| <= rho |w_i| (scale-invariant)",
    "adaptive_l2": "worst loss increase, ||d / |w| || <= rho (scale-invariant)",
    "avg_linf": "mean loss increase, d uniform in the linf box",
    "avg_l2": "mean loss increase, d Gaussian with std rho",
    "avg_adaptive_linf": "mean loss increase, d uniform, scaled by |w|",
    "avg_adaptive_l2": "mean loss increase, d Gaussian, scaled by |w|",
    "hessian_max_eig": "largest Hessian eigenvalue (Lanczos)",
    "hessian_trace": "Hessian trace (Hutch++)",
    "minimum": "minimum sharpness: Hessian trace minimised over ReLU rescalings",
}
CURVATURE = ("hessian_max_eig", "hessian_trace", "minimum")


def digits(seed=0):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def train(model, data, epochs, seed=0):
    x, y = data
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--tiny", action="store_true", help="2 epochs, 2 batches, 3 iterations")
    args = parser.parse_args()
    epochs, n_batches, n_iters = (2, 2, 3) if args.tiny else (args.epochs, None, 20)
    torch.set_num_threads(1)  # small model: threads only add overhead
    torch.manual_seed(0)
    train_data, test_data = digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    train(model, train_data, epochs)
    with torch.no_grad():
        acc = (model(test_data[0]).argmax(1) == test_data[1]).float().mean()
    print(f"test accuracy: {acc:.3f}\n")

    # Sharpness on the training data, in batches of 256 (m-sharpness with m = 256).
    x, y = train_data
    loader = list(zip(x.split(256), y.split(256)))
    print(f"{'kind':<20}{'rho':>9}{'sharpness':>13}{'seconds':>9}  what it measures")
    for kind, rho in RHO.items():
        t = time.perf_counter()
        # worst case: APGD iterations per batch; average case: random draws per batch
        option = {"n_samples": 20} if kind.startswith("avg_") else {"n_iters": n_iters}
        r = flatness.sharpness(model, loader, kind=kind, rho=rho, seed=0, n_batches=n_batches, **option)
        print(f"{kind:<20}{rho:>9.0e}{r.value:>13.5f}{time.perf_counter() - t:>9.2f}  {MEANING[kind]}")
    # Curvature of the loss on the first 512 training samples.
    for kind in CURVATURE:
        t = time.perf_counter()
        r = flatness.sharpness(model, loader, kind=kind, seed=0, n_batches=n_batches or 2)
        print(f"{kind:<20}{'':>9}{r.value:>13.5f}{time.perf_counter() - t:>9.2f}  {MEANING[kind]}")


if __name__ == "__main__":
    main()
