"""SAM in a Hugging Face style training loop, written with torch schedulers.

The loop has the shape of a ``transformers`` fine-tuning script without
``accelerate``: AdamW with weight decay on all but biases and LayerNorm
weights, ``get_scheduler("linear")``'s warmup then linear decay (written as
a ``LambdaLR``), gradient clipping, a step per batch.  Only the optimizer
line and the step change for SAM:

* ``SAM(groups, torch.optim.AdamW, rho=..., lr=...)`` wraps AdamW; the
  scheduler and ``clip_grad_norm_`` take the SAM object like any optimizer;
* ``optimizer.step(closure)`` calls the closure at ``w`` and at ``w + e``.

Run ``python examples/sam_hf_loop.py`` (synthetic data, CPU, seconds).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from flatness.optim import SAM


def linear_schedule_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    """``transformers.get_linear_schedule_with_warmup`` as a ``LambdaLR``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TinyEncoder(nn.Module):
    """A one-layer transformer classifier over token sequences."""

    def __init__(self, vocab: int = 32, dim: int = 16, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.layer(self.embed(tokens))).mean(dim=1))


def synthetic_batches(n_batches: int, batch: int = 16, length: int = 8, seed: int = 0):
    """Sequences labelled by whether token 1 occurs more often than token 2."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        tokens = torch.randint(0, 32, (batch, length), generator=g)
        labels = ((tokens == 1).sum(1) > (tokens == 2).sum(1)).long()
        out.append((tokens, labels))
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Hugging Face's split: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(
    rho: float = 0.05,
    epochs: int = 3,
    n_batches: int = 8,
    lr: float = 3e-3,
    warmup_ratio: float = 0.1,
    max_grad_norm: float = 1.0,
    seed: int = 0,
) -> dict:
    """Train ``TinyEncoder``; ``rho=None`` runs plain AdamW.  Returns the
    losses at ``w`` and the learning rates of every step, and the model."""
    torch.manual_seed(seed)
    model = TinyEncoder()
    data = synthetic_batches(n_batches, seed=seed)
    total = epochs * len(data)
    groups = param_groups(model, weight_decay=0.01)
    if rho is None:
        optimizer = torch.optim.AdamW(groups, lr=lr)
    else:
        optimizer = SAM(groups, torch.optim.AdamW, rho=rho, lr=lr)
    scheduler = linear_schedule_with_warmup(optimizer, int(warmup_ratio * total), total)
    losses, lrs = [], []
    model.train()
    for _ in range(epochs):
        for tokens, labels in data:

            def closure():
                optimizer.zero_grad()
                loss = F.cross_entropy(model(tokens), labels)
                loss.backward()
                # clipping inside the closure clips the gradient of each pass
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                return loss

            lrs.append(scheduler.get_last_lr()[0])
            loss = optimizer.step(closure)
            scheduler.step()
            losses.append(float(loss.detach()))
    return {"losses": losses, "lrs": lrs, "model": model, "optimizer": optimizer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rho", type=float, default=0.05)
    args = parser.parse_args()
    for name, rho in (("AdamW", None), (f"SAM(AdamW, rho={args.rho})", args.rho)):
        out = train(rho=rho, epochs=args.epochs)
        first, last = out["losses"][0], sum(out["losses"][-4:]) / 4
        print(f"{name:24s} first loss {first:.4f}  last loss {last:.4f}  peak lr {max(out['lrs']):.2e}")


if __name__ == "__main__":
    main()
