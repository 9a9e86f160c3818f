"""Deep ensemble vs SAM ensemble vs SharpBalance on scikit-learn's digits.

Three members per ensemble, each an MLP trained with SGD + momentum:

* ``deep``: plain training (a deep ensemble);
* ``sam``: SAM on every sample (a SAM ensemble);
* ``sharpbalance``: plain training for ``--initial-epochs``, then per-sample
  Fisher scores of every member (:func:`flatness.diversity.per_sample_sharpness`),
  the split of :func:`flatness.diversity.sharpbalance_split` (highest scores
  first), and mixed training (:func:`flatness.optim.subset_sam_step`) for the
  remaining epochs;
* ``sharpbalance_low``: the same with ``largest=False`` (lowest scores first,
  what the authors' ``main.py`` runs with ``ascend=True``).

Printed per method (mean and spread over ``--seeds`` repetitions): the
ensemble's test accuracy, NLL, calibrated NLL (temperature fitted on a
held-out validation split), ECE, the disagreement-error ratio (DER), the
prediction variance, and each member's adaptive worst-case sharpness on the
training set (``flatness.sharpness(kind="adaptive_linf")``).

Run ``python examples/sharpbalance_ensemble.py`` (about two minutes on two CPU
cores) or ``--quick`` for a smoke test of a few seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import flatness
from flatness import diversity
from flatness.optim import SAM, subset_sam_step

METHODS = ("deep", "sam", "sharpbalance", "sharpbalance_low")


def load(seed: int, quick: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits split into train / validation (calibration) / test."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train, n_val = (300, 100) if quick else (1000, 300)
    return {
        "train": (x[:n_train], y[:n_train]),
        "val": (x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
        "test": (x[n_train + n_val :], y[n_train + n_val :]),
    }


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def train_member(method: str, member_seed: int, data, args, sam_mask=None, model=None, epochs=None):
    """Train one member for ``epochs``; ``sam_mask`` (bool over the training
    set) selects SAM samples for the mixed step."""
    x, y = data["train"]
    model = make_model(member_seed) if model is None else model
    if method == "deep":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    else:
        opt = SAM(model.parameters(), torch.optim.SGD, rho=args.rho, lr=args.lr, momentum=0.9,
                  weight_decay=5e-4)
    gen = torch.Generator().manual_seed(member_seed + 1)
    model.train()
    for _ in range(args.epochs if epochs is None else epochs):
        for idx in batches(len(y), args.batch_size, gen):
            if method == "deep":
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
            elif sam_mask is None:  # SAM on every sample
                def closure():
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    loss.backward()
                    return loss
                opt.step(closure)
            else:
                subset_sam_step(opt, model, x[idx], y[idx], sam_mask[idx])
    return model


def train_ensemble(method: str, seed: int, data, args) -> list[nn.Module]:
    seeds = [seed * 100 + m for m in range(args.members)]
    if not method.startswith("sharpbalance"):
        return [train_member(method, s, data, args) for s in seeds]
    # Phase 1: plain training for initial_epochs.
    members = [train_member("deep", s, data, args, epochs=args.initial_epochs) for s in seeds]
    # Phase 2: every member's per-sample Fisher scores on the training set
    # (in dataset order), then each member's SAM subset.
    x, y = data["train"]
    loader = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(y), 256)]
    scores = torch.stack([diversity.per_sample_sharpness(m, loader, "fisher") for m in members])
    largest = method == "sharpbalance"
    out = []
    for i, (m, s) in enumerate(zip(members, seeds)):
        sam_idx, _ = diversity.sharpbalance_split(scores, i, args.flat_ratio, largest=largest)
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[sam_idx] = True
        # Phase 3: mixed training for the remaining epochs (a fresh SAM
        # optimizer: momentum restarts, as when the authors switch optimizers).
        out.append(train_member("sam", s + 7, data, args, sam_mask=mask, model=m,
                                epochs=args.epochs - args.initial_epochs))
    return out


def evaluate(members, data, args) -> dict[str, float]:
    test, val = data["test"], data["val"]
    metrics = diversity.ensemble_metrics(members, test, calibration=val)
    sharp = [
        flatness.sharpness(m, [(data["train"][0][i : i + 250], data["train"][1][i : i + 250])
                               for i in range(0, len(data["train"][1]), 250)],
                           kind="adaptive_linf", rho=args.sharpness_rho,
                           n_iters=args.sharpness_iters).value
        for m in members
    ]
    return {
        "acc": metrics.ensemble["accuracy"],
        "nll": metrics.ensemble["nll"],
        "cnll": metrics.ensemble["cnll"],
        "ece": metrics.ensemble["ece"],
        "member_acc": statistics.mean(r["accuracy"] for r in metrics.members),
        "der": diversity.disagreement_error_ratio(members, test),
        "var": diversity.prediction_variance(members, test),
        "sharp": statistics.mean(sharp),
        "sharp_members": sharp,
    }


def main(argv=None) -> dict[str, list[dict[str, float]]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    p.add_argument("--seeds", type=int, default=5, help="repetitions of every ensemble")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--initial-epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rho", type=float, default=0.1, help="SAM radius")
    p.add_argument("--flat-ratio", type=float, default=0.5)
    p.add_argument("--sharpness-rho", type=float, default=2e-3)
    p.add_argument("--sharpness-iters", type=int, default=20)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.initial_epochs, args.sharpness_iters = 1, 3, 1, 2
    # Tiny models: one thread is several times faster than two (the
    # per-op synchronisation costs more than the arithmetic).
    torch.set_num_threads(1)

    results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    start = time.perf_counter()
    for seed in range(args.seeds):
        data = load(seed, args.quick)
        for method in METHODS:
            members = train_ensemble(method, seed, data, args)
            results[method].append(evaluate(members, data, args))
    elapsed = time.perf_counter() - start

    def cell(method: str, key: str) -> str:
        vals = [r[key] for r in results[method]]
        if len(vals) == 1:
            return f"{vals[0]:.4f}"
        return f"{statistics.mean(vals):.4f}±{statistics.stdev(vals):.4f}"

    keys = ["acc", "nll", "cnll", "ece", "der", "var", "member_acc", "sharp"]
    header = ["method"] + ["ens " + k if k in ("acc", "nll", "cnll", "ece") else k for k in keys]
    print(f"digits, {args.members} members, {args.seeds} seed(s), {args.epochs} epochs "
          f"(SharpBalance: {args.initial_epochs} plain first), rho={args.rho}, "
          f"flat_ratio={args.flat_ratio}; mean±std over seeds; {elapsed:.0f} s")
    print(" | ".join(f"{h:>18}" for h in header))
    for method in METHODS:
        print(" | ".join(f"{c:>18}" for c in [method] + [cell(method, k) for k in keys]))
    print("sharp = mean over members of flatness.sharpness(kind='adaptive_linf', "
          f"rho={args.sharpness_rho}) on the training set; per member, seed 0:")
    for method in METHODS:
        print(f"  {method:>18}: " + ", ".join(f"{v:.4f}" for v in results[method][0]["sharp_members"]))
    return results


if __name__ == "__main__":
    main()
