"""The LightningModule: a classifier network, its loss, metrics and optimizer schedule."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from components.config import AugmentParams
from components.errors import TrainingError
from components.models import ModelSpec, build_model


def warmup_cosine(total_steps: int, warmup_steps: int):
    """A LambdaLR factor: linear warm-up over `warmup_steps`, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class ClassifierModule(L.LightningModule):
    """Trains `build_model(spec)` with cross-entropy.

    `spec`, `optim` and `augment` are plain dicts (ModelSpec, TrainParams and AugmentParams fields)
    so checkpoints load with `torch.load(weights_only=True)` and carry their own eval preprocessing.
    Logs train/loss, train/acc, val/loss, val/acc per epoch.
    """

    def __init__(self, spec: dict[str, Any], optim: dict[str, Any], classes: list[str], augment: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.spec = ModelSpec(**spec)
        self.model = build_model(self.spec)
        self.loss = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes=self.spec.num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=self.spec.num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}: "
                "lower train.lr or check the data normalization"
            )
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", self.loss(logits, y), on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        optim = self.hparams.optim
        if optim["optimizer"] == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(), lr=optim["lr"], momentum=optim["momentum"], weight_decay=optim["weight_decay"]
            )
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=optim["lr"], weight_decay=optim["weight_decay"])
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(total * optim["warmup_epochs"] / max(1, self.trainer.max_epochs))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Classifier(NamedTuple):
    """A trained network loaded from a checkpoint, with what is needed to feed it."""

    model: nn.Module
    spec: ModelSpec
    classes: list[str]
    augment: AugmentParams


def load_classifier(checkpoint_path: str) -> Classifier:
    """Load a visionflow checkpoint safely (weights_only=True); returns a Classifier in eval mode."""
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    hparams = ckpt.get("hyper_parameters") or {}
    if "spec" not in hparams or "classes" not in hparams:
        raise TrainingError(f"{checkpoint_path} is not a visionflow checkpoint (no model spec inside)")
    spec = ModelSpec(**hparams["spec"])
    model = build_model(spec.model_copy(update={"pretrained": False}))
    prefix = "model."
    model.load_state_dict({k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
    return Classifier(model.eval(), spec, list(hparams["classes"]), AugmentParams(**hparams["augment"]))
