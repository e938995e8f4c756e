"""Lightning with robustclip on the synthetic heavy-tailed problem (robustclip.experiments.data): per-sample
clipping through the RobustClipModule mixin, or a batch-level method through the callback alone.
CPU, well under a minute.

    python examples/lightning_synthetic.py                    # PS-Clip-SGD (mixin)
    python examples/lightning_synthetic.py --method global    # Clip-SGD (callback, module unchanged)

Lines that differ from a plain Lightning script are marked ``# robustclip``.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

import robustclip as rc  # robustclip
from robustclip.experiments.data import synthetic_classification
from robustclip.integrations.lightning import RobustClipCallback, RobustClipModule  # robustclip


class Classifier(pl.LightningModule):
    """A plain LightningModule."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class PerSampleClassifier(RobustClipModule, Classifier):  # robustclip: the mixin first
    def configure_robustclip(self):  # robustclip
        return rc.per_sample_clip(1.0)  # robustclip

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")  # robustclip: one loss per sample


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["per_sample", "global"], default="per_sample")
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()

    torch.manual_seed(0)
    data = synthetic_classification(n_train=4000, n_test=1000, alpha=1.2, seed=0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=64, shuffle=True
    )
    dim, classes = data.x_train.shape[1], data.num_classes
    if args.method == "per_sample":
        model, callbacks = PerSampleClassifier(dim, classes), []
    else:
        model, callbacks = Classifier(dim, classes), [RobustClipCallback(rc.clip_by_global_norm(1.0))]  # robustclip
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(model, loader)
    print(f"method {args.method}: test accuracy {accuracy(model, data.x_test, data.y_test):.3f}")
    print(f"logged readings: { {k: round(float(v), 4) for k, v in trainer.logged_metrics.items()} }")


if __name__ == "__main__":
    main()
