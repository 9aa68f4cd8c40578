"""The pruning hook of the training process: in a trial of `visionflow tune` (TRIAL_ENV set), report
`val/acc` to the trial after every validation epoch and stop training when the study's pruner says so.

Stopping is Lightning's own `trainer.should_stop` (rank zero decides, every rank follows under DDP), so the
trial's process ends normally with its checkpoints; the epoch it stopped at is kept on the trial.
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import Callback

from components.tuning.space import EPOCH_METRIC

TRIAL_ENV = "VISIONFLOW_TUNE_TRIAL"  # components.tuning.study.TRIAL_ENV (not imported: optuna only in trials)


class TrialPruning(Callback):
    """Report each epoch's validation metric to the Optuna trial; stop when the trial should be pruned."""

    def __init__(self, context, monitor: str = EPOCH_METRIC):
        self.context = context
        self.monitor = monitor
        self._trial = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        stop = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
                from components.tuning.study import PRUNED_EPOCH_ATTR, load_trial

                if self._trial is None:
                    self._trial = load_trial(self.context)
                epoch = trainer.current_epoch + 1
                self._trial.report(float(value), step=epoch)
                if epoch < trainer.max_epochs and self._trial.should_prune():
                    self._trial.set_user_attr(PRUNED_EPOCH_ATTR, epoch)
                    print(f"[visionflow] trial {self.context.number} pruned after epoch {epoch}", flush=True)
                    stop = True
        stop = trainer.strategy.broadcast(stop)
        trainer.should_stop = trainer.should_stop or stop


def trial_callbacks(monitor: str = EPOCH_METRIC) -> list[Callback]:
    """[TrialPruning] reporting `monitor` (the metric the checkpoint follows) inside a trial of a search, else []."""
    if not os.environ.get(TRIAL_ENV):
        return []
    from components.tuning.study import trial_context

    return [TrialPruning(trial_context(), monitor)]
