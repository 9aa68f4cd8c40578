"""Optuna studies for `visionflow tune`: the TPE sampler, the pruner, the study in the stack's database
(an SQLite file alone, PostgreSQL on the team stack) and the hand-off of one trial to the training process.

The tune flow asks the study for trials (ask-and-tell), runs each as a pipeline, and tells the outcome.
The training process of a trial finds its trial through TRIAL_ENV (storage URL, study name, trial id),
reports `val/acc` after every epoch and stops when the pruner says so (components.tuning.pruning).
"""

from __future__ import annotations

import os
from typing import Any

import optuna
from pydantic import BaseModel

from components.tuning.space import SearchSpace, SpaceError

TRIAL_ENV = "VISIONFLOW_TUNE_TRIAL"
STORAGE_ENV = "VISIONFLOW_TUNE_STORAGE"
SPACE_ATTR = "visionflow.space"  # study user attribute: the fingerprint of the space the study searches
RUN_ATTR = "visionflow.mlflow_run_id"  # study user attribute: the MLflow run of the study
PRUNED_EPOCH_ATTR = "pruned_epoch"  # trial user attribute set by the training process when it stops early

optuna.logging.set_verbosity(optuna.logging.WARNING)


def distributions(space: SearchSpace) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of every searched parameter."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, spec in space.params.items():
        kind = spec.kind()
        if kind == "categorical":
            out[name] = optuna.distributions.CategoricalDistribution(spec.choices)
        elif kind == "int":
            out[name] = optuna.distributions.IntDistribution(int(spec.low), int(spec.high), step=int(spec.step or 1))
        else:
            out[name] = optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
    return out


def make_sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    """TPE: random for the first `startup_trials`, then model-based (constant liar keeps parallel trials apart)."""
    return optuna.samplers.TPESampler(
        seed=space.seed, n_startup_trials=space.startup_trials, constant_liar=True, multivariate=True
    )


def make_pruner(space: SearchSpace) -> optuna.pruners.BasePruner:
    """Median (stop a trial below the median of earlier trials at the same epoch), successive halving
    (keep the top third at each rung) or none; no trial is pruned before `warmup_epochs` epochs."""
    if space.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=max(1, space.startup_trials), n_warmup_steps=space.warmup_epochs
        )
    if space.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, space.warmup_epochs), reduction_factor=3)
    return optuna.pruners.NopPruner()


def storage(url: str) -> optuna.storages.RDBStorage:
    """The study database (sqlite:///FILE or postgresql://...), schema created on first use."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}  # parallel trials write to one SQLite file
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def open_study(url: str, name: str, space: SearchSpace) -> optuna.Study:
    """Create study `name` or load it to resume; raises SpaceError when it exists with another search space."""
    study = optuna.create_study(
        study_name=name,
        storage=storage(url),
        sampler=make_sampler(space),
        pruner=make_pruner(space),
        direction="maximize",
        load_if_exists=True,
    )
    known = study.user_attrs.get(SPACE_ATTR)
    if known is None:
        study.set_user_attr(SPACE_ATTR, space.fingerprint())
    elif known != space.fingerprint():
        raise SpaceError(
            f"study {name!r} exists with another search space: resume it with the same space file, "
            "or choose another study name (--study)"
        )
    return study


def check_study(url: str, name: str, space: SearchSpace) -> None:
    """Raise SpaceError when study `name` exists in `url` with another space (creates nothing)."""
    try:
        study = optuna.load_study(study_name=name, storage=storage(url))
    except KeyError:
        return
    known = study.user_attrs.get(SPACE_ATTR)
    if known is not None and known != space.fingerprint():
        raise SpaceError(
            f"study {name!r} exists with another search space: resume it with the same space file, "
            "or choose another study name (--study)"
        )


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Mark FAIL every trial still RUNNING (its tune process was killed); returns their numbers."""
    stale = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    for number in stale:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    return stale


def finished_count(study: optuna.Study) -> int:
    """Trials that ended (complete, pruned or failed): what `--trials` counts."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return len(study.get_trials(deepcopy=False, states=done))


class TrialContext(BaseModel):
    """What the training process of a trial needs to find its trial and its pruner."""

    storage: str
    study: str
    trial_id: int
    number: int
    space: SearchSpace

    def env(self) -> dict[str, str]:
        return {TRIAL_ENV: self.model_dump_json()}


def trial_context() -> TrialContext | None:
    """The trial of this process (from TRIAL_ENV), or None outside a search. A context without a storage URL
    (one with a password is never put in a flow run's variables) uses this worker's $VISIONFLOW_TUNE_STORAGE."""
    text = os.environ.get(TRIAL_ENV)
    if not text:
        return None
    context = TrialContext.model_validate_json(text)
    if not context.storage:
        context.storage = os.environ.get(STORAGE_ENV, "")
    return context


def load_trial(context: TrialContext) -> optuna.trial.Trial:
    """The running trial of `context`, with its study's pruner, in this process."""
    study = optuna.load_study(
        study_name=context.study, storage=storage(context.storage), pruner=make_pruner(context.space)
    )
    return optuna.trial.Trial(study, context.trial_id)


def best_values(study: optuna.Study) -> tuple[dict[str, Any], float, int] | None:
    """(params, value, trial number) of the best complete trial, or None when no trial completed."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    return dict(best.params), float(best.value), best.number


__all__ = ["SpaceError"]
