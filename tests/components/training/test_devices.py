"""Device requests checked before Lightning starts: one clear line instead of a hang, a traceback or a silent change."""

from __future__ import annotations

import os

import pytest
import torch

from components.config import ParamsError, TrainerParams, load_params
from components.errors import TrainingError
from components.training.devices import DevicePlan, effective_batch_size, launcher_environment, plan_devices, scaled_lr

LAUNCHER_VARIABLES = (
    "TORCHELASTIC_RUN_ID",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_NNODES",
    "SLURM_JOB_NAME",
    "MASTER_ADDR",
    "NODE_RANK",
    "LSB_JOBID",
)
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without GPUs")


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def test_a_plain_cpu_run_plans_one_process():
    plan = plan_devices(TrainerParams(accelerator="cpu"))
    assert plan == DevicePlan(accelerator="cpu", devices=1, num_nodes=1, launcher=None)


def test_more_devices_than_the_machine_has_is_refused():
    with pytest.raises(TrainingError, match=rf"trainer.devices is {_cores() + 1} but this machine has {_cores()} CPU"):
        plan_devices(TrainerParams(accelerator="cpu", devices=_cores() + 1, strategy="ddp"))


@needs_no_gpu
@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        ({"accelerator": "gpu"}, "has no GPU"),
        ({"strategy": "fsdp", "devices": 1}, "fsdp needs CUDA GPUs but training would run on cpu"),
        ({"precision": "16-mixed"}, "16-mixed needs a GPU"),
    ],
)
def test_gpu_only_requests_on_a_cpu_machine_are_refused(trainer, message):
    with pytest.raises(TrainingError, match=message):
        plan_devices(TrainerParams(**trainer))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.strategy=fsdp", "strategy fsdp needs GPUs"),
        ("trainer.precision=16-mixed", "precision 16-mixed needs a GPU"),
    ],
)
def test_explicit_cpu_with_gpu_only_options_is_refused_at_validation(override, message):
    with pytest.raises(ParamsError, match=rf"invalid parameter trainer: {message}"):
        load_params(None, ["trainer.accelerator=cpu", override])


def test_gd_with_extra_accumulation_is_refused_at_validation():
    with pytest.raises(ParamsError, match="optimizer gd already accumulates"):
        load_params(None, ["train.optimizer=gd", "trainer.accumulate_grad_batches=4"])


def test_several_nodes_without_a_launcher_is_refused():
    with pytest.raises(
        TrainingError, match=r"num_nodes is 2 but no launcher environment was found: .*torchrun \(--nnodes 2"
    ):
        plan_devices(TrainerParams(accelerator="cpu", num_nodes=2, strategy="ddp"))


def test_under_torchrun_auto_devices_are_the_launched_processes(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launcher_environment() == "torchrun"
    plan = plan_devices(TrainerParams(accelerator="cpu", devices="auto", strategy="ddp"))
    assert (plan.devices, plan.world_size, plan.launcher) == (2, 2, "torchrun")
    with pytest.raises(TrainingError, match=r"torchrun started 2 process\(es\) \(2 per node\) .*set trainer.devices=2"):
        plan_devices(TrainerParams(accelerator="cpu", devices=1, strategy="ddp"))


def test_slurm_multi_node_is_a_launcher(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")
    assert launcher_environment() == "slurm"
    plan = plan_devices(TrainerParams(accelerator="cpu", devices=1, num_nodes=4, strategy="ddp"))
    assert plan.world_size == 4


@pytest.mark.parametrize(("rule", "expected"), [("none", 0.001), ("linear", 0.004), ("sqrt", 0.002)])
def test_effective_batch_size_and_lr_scaling(rule, expected):
    params = load_params(
        None,
        [
            f"train.lr_scaling={rule}",
            "train.lr=0.001",
            "train.batch_size=32",
            "train.lr_base_batch_size=64",
            "trainer.accumulate_grad_batches=2",
        ],
    )
    plan = DevicePlan(accelerator="cpu", devices=2, num_nodes=2, launcher="torchrun")
    effective = effective_batch_size(params, plan, params.trainer.accumulate_grad_batches)
    assert effective == 32 * 4 * 2
    assert scaled_lr(params, effective) == pytest.approx(expected)


def test_the_entry_point_reports_a_refused_request_as_its_error(tmp_path):
    from components.training.fit import FitResult, FitSpec, main

    params = load_params(None, ["trainer.accelerator=cpu", f"trainer.devices={_cores() + 1}", "trainer.strategy=ddp"])
    spec = FitSpec(
        params=params,
        manifest_path=str(tmp_path / "none.csv"),
        classes=["a", "b"],
        run_dir=str(tmp_path / "train"),
        result_path=str(tmp_path / "result.json"),
    )
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    assert main([str(tmp_path / "spec.json")]) == 3
    result = FitResult.model_validate_json((tmp_path / "result.json").read_text())
    assert (
        result.error
        == f"trainer.devices is {_cores() + 1} but this machine has {_cores()} CPU core(s) available to this process"
    )
