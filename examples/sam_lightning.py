"""SAM with PyTorch Lightning's manual optimization.

SAM evaluates the loss twice per step, so it needs manual optimization
(``automatic_optimization = False``): ``training_step`` gives the SAM
optimizer a closure that computes the loss and calls
``self.manual_backward``; Lightning's ``optimizer.step(closure=...)``
hands it to SAM, which calls it at ``w`` and at ``w + e``.  The LR
scheduler from ``configure_optimizers`` is stepped by hand, as manual
optimization requires.

Needs ``pip install lightning`` (the ``lightning`` extra).  Run
``python examples/sam_lightning.py`` (synthetic data, CPU, seconds).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatness.optim import SAM


class SAMClassifier(L.LightningModule):
    def __init__(self, rho: float = 0.05, lr: float = 0.1, total_steps: int = 40) -> None:
        super().__init__()
        self.automatic_optimization = False  # SAM needs two passes per step
        self.rho, self.lr, self.total_steps = rho, lr, total_steps
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            return loss

        loss = optimizer.step(closure=closure)  # SAM calls the closure at w and at w + e
        self.lr_schedulers().step()
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss.detach())
        return loss

    def configure_optimizers(self):
        optimizer = SAM(self.parameters(), torch.optim.SGD, rho=self.rho, lr=self.lr, momentum=0.9)
        # OneCycleLR cycles SGD's momentum through the SAM object
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def data(n: int = 160, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def train(rho: float = 0.05, epochs: int = 4, seed: int = 0) -> SAMClassifier:
    L.seed_everything(seed, verbose=False)
    loader = data(seed=seed)
    module = SAMClassifier(rho=rho, total_steps=epochs * len(loader))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return module


def main() -> None:
    module = train()
    print(f"SAM(SGD) with Lightning: first loss {module.losses[0]:.4f}, last loss {module.losses[-1]:.4f}")


if __name__ == "__main__":
    main()
