"""Pretrained and local weights: the backbone gets them, the head stays new, offline and wrong files are one line."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from components.models import ModelSpec, build_model
from components.models.weights import WeightsError, param_groups, weights_meta
from components.training.fit import FreezeBackbone
from components.training.module import ClassifierModule


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A torchvision resnet18 state dict (random, 1000 classes) saved the way torchvision ships weights."""
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18-local.pth"
    torch.save(state, path)
    return path, state


def _spec(**extra) -> ModelSpec:
    return ModelSpec(name="resnet18", num_classes=3, image_size=32, **extra)


def test_local_weights_fill_the_backbone_and_leave_a_new_head(resnet18_file):
    path, state = resnet18_file
    model = build_model(_spec(weights=str(path)))
    loaded = model.state_dict()
    backbone = [k for k in state if not k.startswith("fc.")]
    assert all(torch.equal(loaded[k], state[k]) for k in backbone)
    assert loaded["fc.1.weight"].shape == (3, 512)  # replaced for the data's 3 classes
    fresh = build_model(_spec())
    assert not torch.equal(fresh.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_a_grey_model_gets_the_rgb_filters_averaged(resnet18_file):
    path, state = resnet18_file
    model = build_model(_spec(weights=str(path), in_channels=1))
    assert torch.allclose(model.conv1.weight, state["conv1.weight"].mean(dim=1, keepdim=True))


def test_pretrained_reads_torchvisions_file_from_the_torch_home_cache(resnet18_file, tmp_path, monkeypatch):
    path, state = resnet18_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / weights_meta("resnet18").file_name).write_bytes(path.read_bytes())
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # any download attempt would fail
    model = build_model(_spec(pretrained=True))
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_pretrained_offline_without_the_file_names_it_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # no network: the proxy refuses every connection
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(WeightsError) as info:
        build_model(_spec(pretrained=True))
    message = str(info.value)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "place resnet18-f37072fd.pth" in message and str(expected) in message and "\n" not in message
    assert not expected.exists()


def test_weights_of_another_architecture_are_refused_by_layer_name(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    with pytest.raises(WeightsError) as info:
        build_model(_spec(weights=str(path)))
    message = str(info.value)
    assert "does not fit resnet18" in message and "layer(s) missing from the file (e.g. conv1.weight)" in message
    assert "\n" not in message
    deeper = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), deeper)
    with pytest.raises(WeightsError, match=r"layer\(s\) the model does not have \(e.g. layer1.2.conv1.weight\)"):
        build_model(_spec(weights=str(deeper)))


def test_a_file_that_is_not_weights_is_one_line(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a tensor file")
    with pytest.raises(WeightsError, match="is not a weights file torch can load safely"):
        build_model(_spec(weights=str(bad)))


def test_backbone_learns_slower_and_stays_frozen_for_the_first_epochs(resnet18_file):
    path, state = resnet18_file
    spec = _spec(weights=str(path)).model_dump()
    optim = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0, "warmup_epochs": 0, "scheduler": "none"}
    module = ClassifierModule(spec, {**optim, "backbone_lr_mult": 0.1}, ["a", "b", "c"], {})
    groups = param_groups(module.model, 0.1, 0.1)
    assert [g["lr"] for g in groups] == [pytest.approx(0.01), 0.1]
    assert sum(len(g["params"]) for g in groups) == len(list(module.model.parameters()))

    snapshots = []

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots.append((pl_module.model.layer1[0].conv1.weight.clone(), pl_module.model.fc[1].weight.clone()))

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32), torch.arange(16) % 3)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FreezeBackbone(1), Snapshot()],
    )
    head_before = module.model.fc[1].weight.clone()
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    (backbone_1, head_1), (backbone_2, _) = snapshots
    assert torch.equal(backbone_1, state["layer1.0.conv1.weight"])  # frozen in epoch 1
    assert not torch.equal(head_1, head_before)  # the head trained alone
    assert not torch.equal(backbone_2, backbone_1)  # unfrozen in epoch 2
