"""`visionflow tune`: the search space checked against PipelineParams before anything runs, a real Optuna
study in an SQLite file whose trials are pipeline runs (MLflow child runs of one study run) with a trial
pruned by its own training process, and a killed search resumed with its running trial marked FAIL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from components import tracking
from components.config import load_params
from components.tuning.space import SpaceError, load_space, overrides_for, scalar
from components.tuning.study import PRUNED_EPOCH_ATTR, distributions, open_study
from tests.flows.test_stack import _cli
from tests.helpers.params import tiny_overrides


def _space(tmp_path, text: str, name: str = "space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("params:\n  train.lrr: {low: 0.001, high: 0.1}\n", "train.lrr"),
        ("params:\n  train.lr: {low: 0.1, high: 0.01}\n", "impossible range"),
        ("params:\n  train.lr: {low: 0.0, high: 0.1, log: true}\n", "log range needs low > 0"),
        ("params:\n  train.batch_size: {low: 0, high: 64}\n", "train.batch_size=0"),
        ("params:\n  train.optimizer: {choices: [sgd, nope]}\n", "train.optimizer='nope'"),
        ("params:\n  train.optimizer: {choices: []}\n", "choices is empty"),
        ("pruner: hyperband\nparams:\n  train.lr: {low: 0.001, high: 0.1}\n", "pruner"),
        ("params: {}\n", "params"),
    ],
)
def test_a_bad_space_is_one_clear_error(tmp_path, text, words):
    with pytest.raises(SpaceError, match=None) as err:
        load_space(_space(tmp_path, text))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_space_becomes_distributions_and_overrides_that_read_back(tmp_path):
    space = load_space(
        _space(
            tmp_path,
            "params:\n  train.lr: {low: 0.00001, high: 0.1, log: true}\n"
            "  train.batch_size: {low: 16, high: 64, step: 16}\n"
            "  augment.vflip_p: {low: 0, high: 1}\n  train.optimizer: {choices: [sgd, adam]}\n",
        )
    )
    dists = distributions(space)
    assert isinstance(dists["train.lr"], optuna.distributions.FloatDistribution) and dists["train.lr"].log
    assert isinstance(dists["train.batch_size"], optuna.distributions.IntDistribution)
    assert isinstance(dists["augment.vflip_p"], optuna.distributions.FloatDistribution)  # a float field
    assert scalar(1e-05) == "1.0e-05"
    params = load_params(None, overrides_for({"train.lr": 1e-05, "train.optimizer": "sgd", "train.batch_size": 32}))
    assert params.train.lr == 1e-05 and params.train.optimizer == "sgd" and params.train.batch_size == 32


def test_a_study_with_another_space_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = load_space(_space(tmp_path, "params:\n  train.lr: {low: 0.001, high: 0.1}\n"))
    other = load_space(_space(tmp_path, "params:\n  train.lr: {low: 0.001, high: 0.2}\n", "other.yaml"))
    open_study(url, "s", first)
    open_study(url, "s", first)  # the same space: resumed
    with pytest.raises(SpaceError, match="exists with another search space"):
        open_study(url, "s", other)


def test_bad_tune_input_exits_2_before_anything_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL",)}
    bad = _space(tmp_path, "params:\n  train.nope: {low: 1, high: 2}\n")
    out = _cli("tune", "--space", str(bad), "--trials", "2", env=env, timeout=120)
    assert out.returncode == 2 and "train.nope" in out.stderr and "Traceback" not in out.stderr
    good = _space(tmp_path, "params:\n  train.lr: {low: 0.001, high: 0.1}\n", "good.yaml")
    out = _cli("tune", "--space", str(good), "--storage", "postgresql://u:pw@127.0.0.1:1/optuna", env=env, timeout=120)
    assert out.returncode == 2 and "cannot open the study database" in out.stderr and "pw" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = _cli("tune", "--space", str(good), "--parallel", "2", env=env, timeout=120)
    assert out.returncode == 2 and "--parallel needs" in out.stderr


def test_the_zombie_window_is_a_setting_checked_before_use(monkeypatch):
    """$VISIONFLOW_ZOMBIE_AFTER_S: whole seconds, at least two heartbeats; it becomes the automation's window
    (the real automation firing is tested on a live stack in test_stack.py)."""
    from components.errors import VisionflowError
    from flows.prefect_api import HEARTBEAT_S, ZOMBIE_ENV, _zombie_automation, zombie_after_s

    monkeypatch.delenv(ZOMBIE_ENV, raising=False)
    assert zombie_after_s() == 120 and HEARTBEAT_S == 30
    monkeypatch.setenv(ZOMBIE_ENV, "90")
    assert zombie_after_s() == 90
    for bad, words in (("45", "at least 60 s"), ("2m", "whole seconds")):
        monkeypatch.setenv(ZOMBIE_ENV, bad)
        with pytest.raises(VisionflowError, match=words):
            zombie_after_s()
    rule = _zombie_automation("visionflow", 90)
    assert rule.trigger.within.total_seconds() == 90 and rule.trigger.posture == "Proactive"
    assert rule.trigger.after == {"prefect.flow-run.heartbeat", "prefect.flow-run.Running"}
    assert rule.actions[0].state.value == "CRASHED"


@pytest.mark.slow
def test_a_search_prunes_a_hopeless_trial_and_reports_the_best(tmp_path, shapes_dir, prefect_harness):
    from flows.tune import STUDY_TAG, plan_tune, tune

    params = load_params(None, tiny_overrides(tmp_path, shapes_dir, train__max_epochs=4, train__scheduler="none"))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    space = _space(
        tmp_path,
        "pruner: median\nwarmup_epochs: 1\nstartup_trials: 1\n"
        "params:\n  train.lr: {low: 0.0000001, high: 0.05, log: true}\n",
    )
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    plan = plan_tune(str(params_file), [], str(space), trials=3, study="shapes", storage=url)
    study = open_study(url, "shapes", plan.space)
    study.enqueue_trial({"train.lr": 0.02})  # a good trial first, then a hopeless one (lr 1e-7 learns nothing)
    study.enqueue_trial({"train.lr": 0.0000001})
    result = tune(plan)

    trials = optuna.load_study(study_name="shapes", storage=url).trials
    assert [t.state.name for t in trials[:2]] == ["COMPLETE", "PRUNED"], [
        (t.state, t.intermediate_values) for t in trials
    ]
    assert trials[1].user_attrs[PRUNED_EPOCH_ATTR] < 4 and len(trials[1].intermediate_values) < 4
    assert result.trials["COMPLETE"] + result.trials.get("PRUNED", 0) == 3 and result.best_params["train.lr"] > 1e-3
    best = load_params(result.best_params_file)
    assert best.train.lr == result.best_params["train.lr"] and best.train.max_epochs == 4

    client = tracking.client()
    study_run = client.get_run(result.run_id)
    assert study_run.info.status == "FINISHED" and study_run.data.metrics["best_val_acc"] == result.best_value
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "tune")}
    assert {"tune/optimization_history.png", "tune/param_importances.png", "tune/trials.md"} <= artifacts
    children = client.search_runs(
        [study_run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.run_id}'"
    )
    assert len(children) == 3 and all(c.data.tags[STUDY_TAG] == "shapes" for c in children)
    pruned = {c.data.tags["visionflow.tune.trial"]: c for c in children if c.data.tags.get("visionflow.tune.pruned")}
    assert "1" in pruned and all(t.state.name == "PRUNED" for t in trials if str(t.number) in pruned)
    for run in pruned.values():  # the training process itself stopped at the epoch it was pruned
        stopped = int(run.data.tags["visionflow.tune.pruned_epoch"])
        assert stopped < 4
        assert len(client.get_metric_history(tracking.child_run(run.info.run_id, "train"), "val/acc")) == stopped


@pytest.mark.slow
def test_a_killed_search_resumes_with_its_running_trial_failed(tmp_path, shapes_dir):
    params = load_params(None, tiny_overrides(tmp_path, shapes_dir, train__max_epochs=30))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    space = _space(tmp_path, "params:\n  train.lr: {low: 0.001, high: 0.05, log: true}\n")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL",)}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"  # a loaded machine
    args = ["tune", "--params", str(params_file), "--space", str(space), "--storage", url, "--study", "killed"]
    search = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args, "--trials", "3"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:  # until the first trial has reported an epoch
            study = _loaded(url, "killed")
            if study is not None and study.trials and study.trials[0].intermediate_values:
                break
            assert search.poll() is None, "the search ended before it was killed"
            time.sleep(2)
        else:
            raise AssertionError("no trial reported an epoch")
    finally:
        os.killpg(search.pid, signal.SIGKILL)  # no handler runs: the trial and its MLflow runs stay RUNNING
        search.wait(timeout=60)
    assert _loaded(url, "killed").trials[0].state.name == "RUNNING"

    out = _cli(*args, "--trials", "1", env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    trial = _loaded(url, "killed").trials[0]
    assert trial.state.name == "FAIL"
    runs = tracking.client().search_runs(
        [tracking.client().get_experiment_by_name(params.run.experiment).experiment_id],
        filter_string="tags.`visionflow.tune.trial` = '0'",
    )
    assert [r.info.status for r in runs] == ["FAILED"]
    other = _space(tmp_path, "params:\n  train.lr: {low: 0.002, high: 0.05, log: true}\n", "other.yaml")
    out = _cli(*args[:4], str(other), *args[5:], env=env, timeout=120)
    assert out.returncode == 2 and "exists with another search space" in out.stderr


def _loaded(url: str, name: str):
    try:
        return optuna.load_study(study_name=name, storage=url)
    except KeyError:
        return None


@pytest.mark.parametrize(("task", "metric"), [("single", "val/acc"), ("multilabel", "val/map")])
def test_a_trial_reports_the_metric_its_checkpoint_follows(tmp_path, shapes_dir, monkeypatch, task, metric):
    from components.training.fit import build_trainer
    from components.tuning.pruning import TrialPruning
    from components.tuning.space import SearchSpace
    from components.tuning.study import TrialContext
    from tests.helpers.params import planned_fit_spec

    spec = planned_fit_spec(tmp_path, shapes_dir, data__task=task)
    context = TrialContext(
        storage="sqlite://",
        study="s",
        trial_id=1,
        number=0,
        space=SearchSpace(params={"train.lr": {"low": 0.001, "high": 0.1}}),
    )
    monkeypatch.setenv(*next(iter(context.env().items())))
    trainer, checkpoint = build_trainer(spec, logger=False)
    (pruning,) = [c for c in trainer.callbacks if isinstance(c, TrialPruning)]
    assert pruning.monitor == checkpoint.monitor == metric
