"""The LightningModule: learns, refuses a non-finite loss, checkpoints load with weights_only=True."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from components.config import AugmentParams, TrainParams
from components.errors import CheckpointError, TrainingError
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


class _StepRecorder(L.Callback):
    """Each epoch's training-step losses, correct predictions and batch sizes, and what the epoch logged."""

    def __init__(self):
        self.steps, self.epochs = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        correct = (outputs["logits"].argmax(1) == batch[1]).sum().item()
        self.steps.append((outputs["loss"].item(), correct, len(batch[1])))

    def on_train_epoch_end(self, trainer, pl_module):
        n = sum(s[2] for s in self.steps)
        expected = {
            "train/loss": sum(s[0] * s[2] for s in self.steps) / n,
            "train/acc": sum(s[1] for s in self.steps) / n,
        }
        self.epochs.append((expected, {k: trainer.callback_metrics[k].item() for k in expected}))


def test_epoch_metrics_are_batch_weighted_means_of_that_epoch_alone(tmp_path):
    """Metrics are updated every step and handed to Lightning once an epoch: each epoch's train/loss and train/acc
    are its own steps' batch-size-weighted means (the last batch is smaller), and val/loss and val/acc are the
    whole validation set's, without the sanity check's two batches."""
    module, recorder = _module(lr=0.01, warmup_epochs=0), _StepRecorder()
    trainer = _trainer(tmp_path, epochs=2)
    trainer.callbacks.append(recorder)
    val = _data(70)
    trainer.fit(module, _data(70), val)
    assert len(recorder.epochs) == 2
    for expected, logged in recorder.epochs:
        assert logged == pytest.approx(expected, rel=1e-5)
    module.eval()
    with torch.no_grad():
        pairs = [(module(x), y) for x, y in val]
    logits, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    assert trainer.callback_metrics["val/loss"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert trainer.callback_metrics["val/acc"].item() == pytest.approx((logits.argmax(1) == y).float().mean().item())


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    module = _module(lr=1e30, warmup_epochs=0)
    with pytest.raises(TrainingError, match="loss became"):
        _trainer(tmp_path, epochs=5).fit(module, _data(), _data())


def test_warmup_then_cosine():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


class _NotAllowed:
    """A class the safe loader (weights_only=True) refuses to unpickle."""


def _write_bad(kind: str, path):
    if kind == "text":
        path.write_text("epoch,loss\n1,0.5\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random binary":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(64, 64)}}, path)
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "a tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "a plain state dict":
        torch.save({"state_dict": {}}, path)
    elif kind == "a pickled object":
        torch.save({"x": _NotAllowed()}, path)
    elif kind == "a directory":
        path.mkdir()
    # "missing": nothing written


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("text", "not a PyTorch file"),
        ("empty", "empty file"),
        ("random binary", "not a PyTorch file"),
        ("truncated", "not a PyTorch file"),
        ("a tensor", "a Tensor without a visionflow model spec"),
        ("a plain state dict", "a Lightning checkpoint without a visionflow model spec"),
        ("a pickled object", "test_module._NotAllowed, that the safe loader, torch.load(weights_only=True), refuses"),
        ("a directory", "a directory"),
        ("missing", "no such file"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_one_clear_line(tmp_path, kind, reason):
    path = tmp_path / "model.ckpt"
    _write_bad(kind, path)
    with pytest.raises(CheckpointError) as caught:
        load_classifier(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path} is not a visionflow checkpoint (") and reason in message
    assert "\n" not in message


def test_weights_that_do_not_fit_the_spec_are_not_a_checkpoint(tmp_path):
    module = _module()
    _trainer(tmp_path, epochs=1).fit(module, _data(16), _data(16))
    ckpt = torch.load(_trainer_checkpoint(tmp_path, module), weights_only=True)
    ckpt["hyper_parameters"]["spec"]["num_classes"] = 5  # a spec the saved weights do not fit
    torch.save(ckpt, tmp_path / "edited.ckpt")
    with pytest.raises(
        CheckpointError, match=r"edited.ckpt is not a visionflow checkpoint \(its model spec and weights"
    ):
        load_classifier(str(tmp_path / "edited.ckpt"))


def _trainer_checkpoint(tmp_path, module):
    module.trainer.save_checkpoint(tmp_path / "m.ckpt")
    return tmp_path / "m.ckpt"
