"""The LightningModule: a classifier network, its loss and regularizers, metrics and optimizer."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import lightning as L
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MultilabelAveragePrecision, MultilabelExactMatch
from torchvision.transforms import v2

from components.config import AugmentParams, OptimizerName, SchedulerName
from components.errors import CheckpointError, TrainingError
from components.models import ModelSpec, build_model
from components.models.multitask import split_logits
from components.models.weights import param_groups
from components.training.checkpoint import read_checkpoint


def warmup_then(total_steps: int, warmup_steps: int, after: Callable[[float], float]) -> Callable[[int], float]:
    """A LambdaLR factor: linear warm-up over `warmup_steps`, then `after(progress in [0, 1])`."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return after(min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return factor


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 0 at `total_steps` (a LambdaLR factor)."""
    return warmup_then(total_steps, warmup_steps, lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)))


OptimizerBuilder = Callable[[Iterable[nn.Parameter], dict[str, Any]], torch.optim.Optimizer]


def _sgd(params: Iterable[nn.Parameter], o: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=o["lr"], momentum=0.0, weight_decay=o["weight_decay"])


def _momentum(params: Iterable[nn.Parameter], o: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=o["lr"], momentum=o["momentum"], nesterov=o.get("nesterov", False), weight_decay=o["weight_decay"]
    )


def _adam(params: Iterable[nn.Parameter], o: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=o["lr"], weight_decay=o["weight_decay"])


def _adamw(params: Iterable[nn.Parameter], o: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])


# train.optimizer -> builder taking the parameters and the TrainParams dict ("gd" is plain SGD on
# gradients accumulated over the whole training set: the accumulation is the trainer's business).
OPTIMIZERS: dict[OptimizerName, OptimizerBuilder] = {
    "gd": _sgd,
    "sgd": _sgd,
    "momentum": _momentum,
    "adam": _adam,
    "adamw": _adamw,
}


class ScheduleSteps(NamedTuple):
    """Optimizer steps of a fit: in total, per epoch (may be fractional) and of linear warm-up."""

    total: int
    per_epoch: float
    warmup: int


SchedulerBuilder = Callable[
    [torch.optim.Optimizer, dict[str, Any], ScheduleSteps], torch.optim.lr_scheduler.LRScheduler
]


def _cosine(
    optimizer: torch.optim.Optimizer, o: dict[str, Any], steps: ScheduleSteps
) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps.total, steps.warmup))


def _step(
    optimizer: torch.optim.Optimizer, o: dict[str, Any], steps: ScheduleSteps
) -> torch.optim.lr_scheduler.LRScheduler:
    decay_steps = steps.per_epoch * o["step_epochs"]
    span = steps.total - steps.warmup

    def after(progress: float) -> float:
        return o["step_gamma"] ** int(progress * span / decay_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then(steps.total, steps.warmup, after))


def _constant(
    optimizer: torch.optim.Optimizer, o: dict[str, Any], steps: ScheduleSteps
) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then(steps.total, steps.warmup, lambda p: 1.0))


def _onecycle(
    optimizer: torch.optim.Optimizer, o: dict[str, Any], steps: ScheduleSteps
) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=o["lr"], total_steps=steps.total)


# train.scheduler -> builder of a per-step scheduler (linear warm-up first, except one-cycle's own).
SCHEDULERS: dict[SchedulerName, SchedulerBuilder] = {
    "cosine": _cosine,
    "step": _step,
    "onecycle": _onecycle,
    "none": _constant,
}


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |w| over weight matrices and kernels (parameters with ≥ 2 dims): biases and norm scales excluded."""
    return sum(p.abs().sum() for p in model.parameters() if p.ndim >= 2)


def epoch_mean() -> MeanMetric:
    """A batch-size-weighted mean over an epoch (all processes together under DDP), for a loss."""
    return MeanMetric(nan_strategy="disable")  # a non-finite loss stops training before it is recorded


class EpochLog:
    """Per-epoch metrics at a per-step cost of a torchmetrics update (about 0.1 ms), where `self.log` in every
    step cost about 1 ms a call on a CPU, a tenth of a digits step.

    A step updates the metric object and `log` hands it to Lightning once per loop and epoch; Lightning computes
    it (synced across processes) when the epoch ends and resets it, exactly as when it was logged every step.
    The owning module calls `start()` from on_train_epoch_start and on_validation_epoch_start.
    """

    def __init__(self) -> None:
        self.logged: set[str] = set()

    def start(self) -> None:
        self.logged.clear()

    def log(self, module: L.LightningModule, name: str, metric: Metric, prog_bar: bool = False) -> None:
        if name not in self.logged:
            module.log(name, metric, on_step=False, on_epoch=True, prog_bar=prog_bar)
            self.logged.add(name)

    def mean(self, module: L.LightningModule, name: str, mean: MeanMetric, value: torch.Tensor, n: int, **kw) -> None:
        """Add a batch's `value` (a mean over its `n` samples) to the epoch's `mean` and log it."""
        # n copies of the value, not weight=n: MeanMetric drops the weights when nan_strategy is "disable"
        # (torchmetrics 1.9), and the other strategies check for NaN, a device sync per step on a GPU
        mean.update(value.detach().expand(n))
        self.log(module, name, mean, **kw)


class ClassifierModule(L.LightningModule):
    """Trains `build_model(spec)` with cross-entropy and the regularizers of `optim`.

    `spec`, `optim` and `augment` are plain dicts (ModelSpec, TrainParams and AugmentParams fields)
    so checkpoints load with `torch.load(weights_only=True)` and carry their own eval preprocessing.
    `class_weights` (one per class) weights the loss when given. Logs per epoch: train/loss,
    train/ce, train/l1, train/acc, val/loss, val/acc (and val/acc_ema with an EMA of the weights).

    Multi-task (spec.extra_tasks): targets are (N, T) class indices, primary first; the loss is the
    `task_weights`-weighted sum of the tasks' cross-entropies; train/acc, val/acc are the primary
    task's; each extra task also logs train/<task>/loss and val/<task>/acc.

    `network` trains a given network (a pruned copy, say) instead of building one from `spec`.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        optim: dict[str, Any],
        classes: list[str],
        augment: dict[str, Any],
        class_weights: list[float] | None = None,
        task_classes: dict[str, list[str]] | None = None,
        task_weights: dict[str, float] | None = None,
        network: nn.Module | None = None,
        task: str = "single",
        pos_weight: list[float] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["network"], logger=False)
        self.spec = ModelSpec(**spec)
        self.optim = optim
        self.model = network if network is not None else build_model(self.spec)
        self.extra_tasks = list(self.spec.extra_tasks)
        weights = task_weights or {}
        self.task_weights = [weights.get("label", 1.0), *(weights.get(t, 1.0) for t in self.extra_tasks)]
        self.extra_val_acc = nn.ModuleList(
            MulticlassAccuracy(num_classes=n, average="micro") for n in self.spec.extra_tasks.values()
        )
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=optim.get("label_smoothing", 0.0))
        self.val_loss = nn.CrossEntropyLoss()
        n = self.spec.num_classes
        self.train_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.train_ce_mean, self.train_loss_mean, self.train_l1_mean = epoch_mean(), epoch_mean(), epoch_mean()
        self.val_loss_mean = epoch_mean()
        self.extra_train_loss = nn.ModuleList(epoch_mean() for _ in self.extra_tasks)
        self.epoch_log = EpochLog()
        self.mixup = v2.MixUp(alpha=optim.get("mixup_alpha", 0.2), num_classes=n)
        self.cutmix = v2.CutMix(alpha=optim.get("cutmix_alpha", 1.0), num_classes=n)
        self.ema = None
        if optim.get("ema_decay", 0.0) > 0:
            self.ema = AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(optim["ema_decay"]), use_buffers=True
            )
            self.val_acc_ema = MulticlassAccuracy(num_classes=n, average="micro")
        self.multilabel = task == "multilabel"
        if self.multilabel:
            self._multilabel_head(n, pos_weight)

    def _multilabel_head(self, n: int, pos_weight: list[float] | None) -> None:
        """data.task multilabel: one sigmoid per label, BCE-with-logits loss (positives weighted by `pos_weight`
        when given); train/acc and val/acc are the exact-match ratio at 0.5, val/map the macro average precision
        (what the best checkpoint is chosen by)."""
        # A validation batch (the sanity check's two) may hold no positive of a label: its AP is 0, said once here.
        warnings.filterwarnings("ignore", message="No positive samples found in target", category=UserWarning)
        weight = torch.tensor(pos_weight, dtype=torch.float32) if pos_weight else None
        self.loss = nn.BCEWithLogitsLoss(pos_weight=weight)
        self.val_loss = nn.BCEWithLogitsLoss()
        self.train_acc = MultilabelExactMatch(num_labels=n)
        self.val_acc = MultilabelExactMatch(num_labels=n)
        self.val_map = MultilabelAveragePrecision(num_labels=n, average="macro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def mix_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply mixup or cutmix (each with its probability) to a batch; targets become soft labels
        (N, C) when mixed, stay class indices otherwise."""
        draw = torch.rand(()).item()
        if draw < self.optim.get("mixup_p", 0.0):
            return self.mixup(x, y)
        if draw < self.optim.get("mixup_p", 0.0) + self.optim.get("cutmix_p", 0.0):
            return self.cutmix(x, y)
        return x, y

    def _task_losses(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(weighted cross-entropy, primary logits, [(task, logits, targets) of the extra tasks])."""
        if not self.extra_tasks:
            return self.loss(logits, target), logits, []
        parts = split_logits(logits, self.spec.task_sizes())
        ce = self.task_weights[0] * self.loss(parts[0], target[:, 0])
        extra = []
        for i, task in enumerate(self.extra_tasks, start=1):
            task_ce = self.val_loss(parts[i], target[:, i])
            self.epoch_log.mean(self, f"train/{task}/loss", self.extra_train_loss[i - 1], task_ce, len(target))
            ce = ce + self.task_weights[i] * task_ce
            extra.append((task, parts[i], target[:, i]))
        return ce, parts[0], extra

    def training_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch[0], batch[1]  # a third item, the samples' row positions, is for callbacks (training/margins.py)
        inputs = x
        x, target = self.mix_batch(x, y)
        logits = self(x)
        ce, logits, _ = self._task_losses(logits, target)
        if self.extra_tasks:
            target = target[:, 0]
        loss = ce
        if self.optim.get("l1", 0.0) > 0:
            l1 = l1_penalty(self.model)
            loss = ce + self.optim["l1"] * l1
            self.epoch_log.mean(self, "train/l1", self.train_l1_mean, l1, len(y))
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}: "
                "lower train.lr or check the data normalization"
            )
        if self.multilabel:
            self.train_acc.update(logits, target.int())
        else:
            self.train_acc.update(logits, target.argmax(dim=1) if target.ndim == 2 else target)
        self.epoch_log.mean(self, "train/ce", self.train_ce_mean, ce, len(y))
        self.epoch_log.mean(self, "train/loss", self.train_loss_mean, loss, len(y), prog_bar=True)
        self.epoch_log.log(self, "train/acc", self.train_acc)
        # The primary task's logits of an unmixed batch go to callbacks (on_train_batch_end's outputs).
        return {"loss": loss} if x is not inputs else {"loss": loss, "logits": logits.detach()}

    def on_train_epoch_start(self) -> None:
        self.epoch_log.start()

    def on_validation_epoch_start(self) -> None:
        self.epoch_log.start()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        if self.extra_tasks:
            parts = split_logits(logits, self.spec.task_sizes())
            for i, (task, metric) in enumerate(zip(self.extra_tasks, self.extra_val_acc, strict=False), start=1):
                metric.update(parts[i], y[:, i])
                self.epoch_log.log(self, f"val/{task}/acc", metric)
            logits, y = parts[0], y[:, 0]
        if self.multilabel:
            self.val_map.update(logits, y.int())
            self.epoch_log.log(self, "val/map", self.val_map, prog_bar=True)
        self.val_acc.update(logits, y.int() if self.multilabel else y)
        self.epoch_log.mean(self, "val/loss", self.val_loss_mean, self.val_loss(logits, y), len(y), prog_bar=True)
        self.epoch_log.log(self, "val/acc", self.val_acc, prog_bar=True)
        if self.ema is not None:
            ema_logits = self.ema(x)[:, : self.spec.num_classes]
            self.val_acc_ema.update(ema_logits, y)
            self.epoch_log.log(self, "val/acc_ema", self.val_acc_ema)

    def configure_optimizers(self):
        o = self.optim
        mult = o.get("backbone_lr_mult", 1.0)  # fine-tuning: the backbone learns slower than the new head
        params = self.parameters() if mult in (1.0, "auto") else param_groups(self.model, o["lr"], mult)
        optimizer = OPTIMIZERS[o["optimizer"]](params, o)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = total / max(1, self.trainer.max_epochs)
        steps = ScheduleSteps(total, per_epoch, int(per_epoch * o["warmup_epochs"]))
        scheduler = SCHEDULERS[o.get("scheduler", "cosine")](optimizer, o, steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Classifier(NamedTuple):
    """A trained network loaded from a checkpoint, with what is needed to feed it."""

    model: nn.Module
    spec: ModelSpec
    classes: list[str]
    augment: AugmentParams
    task_classes: dict[str, list[str]]
    task: str = "single"  # "multilabel": one sigmoid per class (data.task)


def load_classifier(checkpoint_path: str) -> Classifier:
    """Load a visionflow checkpoint safely (weights_only=True); returns a Classifier in eval mode.

    Raises CheckpointError, one line naming the file and why, for a file that is not one (missing, empty,
    text, another PyTorch file, weights that do not fit the spec inside)."""
    ckpt = read_checkpoint(checkpoint_path)
    hparams = ckpt["hyper_parameters"]
    prefix = "model."
    try:
        spec = ModelSpec(**hparams["spec"])
        model = build_model(spec.model_copy(update={"pretrained": False, "weights": None}))
        model.load_state_dict({k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
        augment = AugmentParams(**hparams["augment"])
    except (TypeError, KeyError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(
            f"{checkpoint_path} is not a visionflow checkpoint (its model spec and weights do not fit: {first})"
        ) from None
    task_classes = dict(hparams.get("task_classes") or {})
    return Classifier(
        model.eval(), spec, list(hparams["classes"]), augment, task_classes, hparams.get("task", "single")
    )
