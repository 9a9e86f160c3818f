"""SGD vs SAM on scikit-learn's digits, same seed and same budget.

Both models start from the same weights, see the same mini-batches in the
same order and take the same number of optimizer steps (SAM spends two
forward-backward passes per step).  Printed for each: test accuracy, NLL,
calibrated NLL (temperature fitted on a held-out split), the training loss,
and the sharpness of the final weights measured with ``flatness.sharpness``
(worst-case adaptive l-infinity, as in Andriushchenko et al. 2023, and the
top Hessian eigenvalue).

    python examples/sam_digits.py            # ~20 s on 2 CPU cores
    python examples/sam_digits.py --tiny     # a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import flatness
from flatness.diversity import ensemble_metrics
from flatness.optim import SAM


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


def train(model, opt, data, epochs, batch_size, seed, sam: bool):
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    steps = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            xb, yb = x[idx], y[idx]
            if sam:

                def closure():
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    return loss

                opt.step(closure)
            else:
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
            steps += 1
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="2 epochs and a cheap sharpness (smoke test)")
    args = ap.parse_args()
    if args.tiny:
        args.epochs = 2
    n_iters = 3 if args.tiny else 20
    torch.set_num_threads(1)  # tiny model: threads only add overhead

    train_data, cal_data, test_data = digits(args.seed)
    start = make_model(args.seed)
    results = {}
    for name in ("SGD", "SAM"):
        model = copy.deepcopy(start)
        if name == "SAM":
            opt = SAM(model.parameters(), torch.optim.SGD, rho=args.rho, lr=args.lr, momentum=0.9)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        t0 = time.perf_counter()
        steps = train(model, opt, train_data, args.epochs, args.batch_size, args.seed, sam=name == "SAM")
        t_train = time.perf_counter() - t0
        model.eval()
        m = ensemble_metrics([model], test_data, calibration=cal_data).ensemble
        with torch.no_grad():
            train_loss = F.cross_entropy(model(train_data[0]), train_data[1]).item()
        # sharpness on the training set, in batches of 256 (m-sharpness style)
        batches = list(zip(train_data[0].split(256), train_data[1].split(256)))
        sharp = flatness.sharpness(model, batches, kind="adaptive_linf", rho=2e-3, n_iters=n_iters, seed=0)
        eig = flatness.sharpness(model, batches[:1], kind="hessian_max_eig", seed=0)
        results[name] = dict(
            steps=steps,
            acc=m["accuracy"],
            nll=m["nll"],
            cnll=m["cnll"],
            train_loss=train_loss,
            sharp=sharp.value,
            eig=eig.value,
            time=t_train,
        )

    print(f"digits: {len(train_data[1])} train / {len(cal_data[1])} calibration / {len(test_data[1])} test, "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, momentum 0.9, SAM rho {args.rho}")
    cols = ["steps", "acc", "nll", "cnll", "train_loss", "sharp", "eig", "time"]
    titles = ["steps", "test acc", "test NLL", "test cNLL", "train loss",
              "adapt. linf sharp.", "Hessian max eig", "train s"]
    print(f"{'method':<8}" + "".join(f" | {t:>18}" for t in titles))
    for name, r in results.items():
        cells = [f"{r[c]:>18d}" if c == "steps" else f"{r[c]:>18.4f}" for c in cols]
        print(f"{name:<8}" + "".join(f" | {c}" for c in cells))


if __name__ == "__main__":
    main()
