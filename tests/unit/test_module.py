"""The LightningModule: learns, refuses a non-finite loss, checkpoints load with weights_only=True."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from components.config import AugmentParams, TrainParams
from components.errors import TrainingError
from components.training.module import ClassifierModule, load_classifier, warmup_cosine


def _module(**optim) -> ClassifierModule:
    spec = {
        "name": "cnn",
        "num_classes": 2,
        "in_channels": 1,
        "image_size": 8,
        "dropout": 0.0,
        "mean": [0.5],
        "std": [0.5],
    }
    return ClassifierModule(
        spec,
        TrainParams(**optim).model_dump(),
        ["a", "b"],
        AugmentParams(mean=[0.5], std=[0.5], image_size=8).model_dump(),
    )


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.1 + y.view(-1, 1, 1, 1).float()
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _trainer(tmp_path, epochs=3):
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def test_learns_a_separable_problem_and_checkpoint_loads_safely(tmp_path):
    module = _module(lr=0.01, warmup_epochs=0)
    trainer = _trainer(tmp_path, epochs=5)
    trainer.fit(module, _data(), _data())
    assert trainer.callback_metrics["val/acc"] > 0.9
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    classifier = load_classifier(str(tmp_path / "m.ckpt"))  # torch.load(weights_only=True) inside
    assert classifier.classes == ["a", "b"] and classifier.spec.image_size == 8
    x = torch.randn(4, 1, 8, 8)
    module.eval()
    torch.testing.assert_close(classifier.model(x), module(x))


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    module = _module(lr=1e30, warmup_epochs=0)
    with pytest.raises(TrainingError, match="loss became"):
        _trainer(tmp_path, epochs=5).fit(module, _data(), _data())


def test_warmup_then_cosine():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_not_a_visionflow_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(TrainingError, match="not a visionflow checkpoint"):
        load_classifier(str(tmp_path / "x.ckpt"))
