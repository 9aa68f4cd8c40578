"""Checkpoints written by a background thread: what a load or a removal reads is what was saved before it, and
the setting reaches the trainer."""

from __future__ import annotations

import time

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from components.config import TrainerParams
from components.training.fit import WaitingAsyncCheckpointIO, checkpoint_plugins, state_dict_sha256


class SlowDisk(TorchCheckpointIO):
    """A real torch.save to a disk that takes a second to write (a large checkpoint on a slow volume)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        time.sleep(1.0)
        super().save_checkpoint(checkpoint, path, storage_options)


def test_a_load_right_after_a_save_reads_the_saved_checkpoint(tmp_path):
    io = WaitingAsyncCheckpointIO(SlowDisk())
    weights = {"w": torch.arange(6.0)}
    io.save_checkpoint({"state_dict": weights, "epoch": 1}, tmp_path / "tuner.ckpt")
    weights["w"].add_(100.0)  # training goes on: the checkpoint holds the tensors as they were at the save
    loaded = io.load_checkpoint(tmp_path / "tuner.ckpt")  # as the Tuner restores what it saved
    assert loaded["epoch"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.arange(6.0))
    io.save_checkpoint({"state_dict": weights, "epoch": 2}, tmp_path / "tuner.ckpt")  # the writer starts again
    io.remove_checkpoint(tmp_path / "tuner.ckpt")  # waits for that write, then removes the file
    assert not (tmp_path / "tuner.ckpt").exists()
    io.teardown()


def test_the_async_writer_is_on_by_default_off_when_asked_and_under_fsdp():
    (plugin,) = checkpoint_plugins(TrainerParams())
    assert isinstance(plugin, WaitingAsyncCheckpointIO)
    assert checkpoint_plugins(TrainerParams(async_checkpoints=False)) == []
    assert checkpoint_plugins(TrainerParams(accelerator="gpu", strategy="fsdp")) == []


def test_a_checkpoints_state_dict_hashes_as_its_module():
    module = torch.nn.Linear(3, 2)
    saved = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    assert state_dict_sha256(saved) == state_dict_sha256(module)
    module.bias.data.add_(1.0)
    assert state_dict_sha256(saved) != state_dict_sha256(module)
