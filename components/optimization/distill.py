"""Knowledge distillation (Hinton et al., 2015): a frozen teacher's softened outputs train a student."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from components.errors import TrainingError
from components.models import ModelSpec, build_model
from components.training.module import ClassifierModule, EpochLog, epoch_mean


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """The Hinton loss: alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, targets).

    Takes student and teacher logits (N, C), integer targets (N,), the temperature T > 0 and
    the weight alpha in [0, 1] of the distillation term. The KL is averaged over the batch
    ("batchmean"); T^2 keeps its gradients on the scale of the cross-entropy's. Returns a scalar.
    """
    kd = kd_term(student_logits, teacher_logits, temperature)
    ce = F.cross_entropy(student_logits, targets)
    return alpha * kd + (1 - alpha) * ce


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch-mean; takes (N, C) logits, returns a scalar."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits.detach() / t, dim=1), reduction="batchmean"
    ) * (t * t)


def check_teacher_classes(teacher_classes: list[str], data_classes: list[str]) -> None:
    """Refuse a teacher trained on other classes (or another class order) than the data's.

    Takes both class-name lists in index order; returns None, raises ValueError naming the
    differences otherwise.
    """
    if list(teacher_classes) == list(data_classes):
        return
    missing = sorted(set(data_classes) - set(teacher_classes))
    extra = sorted(set(teacher_classes) - set(data_classes))
    detail = []
    if missing:
        detail.append(f"classes the teacher does not know: {missing}")
    if extra:
        detail.append(f"teacher classes absent from the data: {extra}")
    if not detail:
        detail.append(f"same classes in another order (teacher {list(teacher_classes)}, data {list(data_classes)})")
    raise ValueError("the teacher's classes differ from the data's: " + "; ".join(detail))


class DistillationModule(L.LightningModule):
    """Trains a student `build_model(spec)` with the Hinton loss against a frozen `teacher`.

    `spec`, `optim`, `classes` and `augment` are plain dicts like ClassifierModule's (so the
    hyper-parameters in a checkpoint are the same) and the student's weights are `model.*` in the
    state_dict: `load_classifier` loads a distilled student checkpoint as any other. The teacher
    is held outside the module tree (not a submodule, not in the state_dict or the optimizer),
    kept in eval mode without gradients and moved to the student's device when fitting starts.
    Its logits beyond the first num_classes columns (extra tasks of a multi-task teacher) are
    ignored. Optimizer and schedule are ClassifierModule's, from `optim`.
    Logs per epoch: train/loss, train/kd, train/ce, train/acc, val/loss, val/acc.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        optim: dict[str, Any],
        classes: list[str],
        augment: dict[str, Any],
        teacher: nn.Module,
        temperature: float = 4.0,
        alpha: float = 0.7,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["teacher"], logger=False)
        self.spec = ModelSpec(**spec)
        if self.spec.extra_tasks:
            raise ValueError("a distillation student is single-task: its spec must have no extra_tasks")
        if temperature <= 0 or not 0 <= alpha <= 1:
            raise ValueError(f"distillation needs temperature > 0 and alpha in [0, 1] (got {temperature}, {alpha})")
        self.optim = optim
        self.temperature = temperature
        self.alpha = alpha
        self.model = build_model(self.spec)
        teacher.eval().requires_grad_(False)
        self._teacher = [teacher]  # a plain list keeps it out of the module tree and the checkpoint
        n = self.spec.num_classes
        self.train_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.train_kd_mean, self.train_ce_mean, self.train_loss_mean = epoch_mean(), epoch_mean(), epoch_mean()
        self.val_loss_mean = epoch_mean()
        self.epoch_log = EpochLog()

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher network."""
        return self._teacher[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_fit_start(self) -> None:
        self.teacher.to(self.device).eval()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():
            teacher_logits = self.teacher.eval()(x)[:, : self.spec.num_classes]
        logits = self(x)
        kd = kd_term(logits, teacher_logits, self.temperature)
        ce = F.cross_entropy(logits, y)
        loss = self.alpha * kd + (1 - self.alpha) * ce
        if not torch.isfinite(loss):
            raise TrainingError(f"distillation loss became {loss.item()} at epoch {self.current_epoch}: lower train.lr")
        self.train_acc.update(logits, y)
        self.epoch_log.log(self, "train/acc", self.train_acc)
        self.epoch_log.mean(self, "train/kd", self.train_kd_mean, kd, len(y))
        self.epoch_log.mean(self, "train/ce", self.train_ce_mean, ce, len(y))
        self.epoch_log.mean(self, "train/loss", self.train_loss_mean, loss, len(y), prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc.update(logits, y)
        self.epoch_log.mean(self, "val/loss", self.val_loss_mean, F.cross_entropy(logits, y), len(y), prog_bar=True)
        self.epoch_log.log(self, "val/acc", self.val_acc, prog_bar=True)

    def on_train_epoch_start(self) -> None:
        self.epoch_log.start()

    def on_validation_epoch_start(self) -> None:
        self.epoch_log.start()

    def configure_optimizers(self):
        # The same optimizer and schedule as a plain training run (the module's own parameters
        # are the student's only).
        return ClassifierModule.configure_optimizers(self)
