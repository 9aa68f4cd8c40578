"""Every training technique acts: each test would fail if its option silently did nothing."""

from __future__ import annotations

import io
from typing import get_args

import lightning as L
import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from components.config import AugmentParams, OptimizerName, SchedulerName, TrainParams, load_params
from components.models import MODELS, ModelSpec, build_model
from components.training.module import OPTIMIZERS, SCHEDULERS, ClassifierModule, l1_penalty, warmup_cosine

SPEC = {"name": "cnn", "num_classes": 3, "in_channels": 1, "image_size": 8, "dropout": 0.0, "mean": [0.5], "std": [0.5]}
AUGMENT = AugmentParams(mean=[0.5], std=[0.5], image_size=8).model_dump()


def _module(spec=None, **optim) -> ClassifierModule:
    optim = {"warmup_epochs": 0, "scheduler": "none", "weight_decay": 0.0, **optim}
    return ClassifierModule(spec or SPEC, TrainParams(**optim).model_dump(), ["a", "b", "c"], AUGMENT)


def _loader(n=48, batch_size=16, channels=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, channels, size, size, generator=g) * 0.3 + y.view(-1, 1, 1, 1).float()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _fit(module, epochs=2, loader=None, **trainer_kwargs):
    loader = loader or _loader()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **trainer_kwargs,
    )
    trainer.fit(module, loader, loader)
    return trainer


def _weight_norm(module) -> float:
    return float(l1_penalty(module.model).detach())


def test_l1_is_in_the_logged_loss_and_shrinks_the_weights():
    torch.manual_seed(0)
    plain = _module(lr=0.01, optimizer="sgd")
    torch.manual_seed(0)
    penalised = _module(lr=0.01, optimizer="sgd", l1=1e-3)
    _fit(plain, epochs=3)
    trainer = _fit(penalised, epochs=3)
    metrics = trainer.callback_metrics
    assert metrics["train/l1"] > 0
    # loss = ce + l1 * penalty, logged as such (epoch means of the same steps)
    assert float(metrics["train/loss"]) == pytest.approx(
        float(metrics["train/ce"]) + 1e-3 * float(metrics["train/l1"]), rel=1e-3
    )
    assert _weight_norm(penalised) < _weight_norm(plain)


def test_l1_skips_biases_and_norm_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    assert float(l1_penalty(model)) == 16.0  # only the 4x4 weight matrix


def test_dropout_changes_outputs_in_train_mode_only():
    model = build_model(ModelSpec(name="cnn", num_classes=3, in_channels=1, image_size=8, dropout=0.5))
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_gd_takes_exactly_one_optimizer_step_per_epoch():
    from components.training.fit import gd_accumulation

    rows = [{"split": "train"}] * 48
    params = load_params(None, ["train.optimizer=gd", "train.batch_size=16"])
    accumulate = gd_accumulation(rows, params)
    assert accumulate == 3
    trainer = _fit(_module(optimizer="gd", lr=0.1), epochs=4, accumulate_grad_batches=accumulate)
    assert trainer.global_step == 4


def test_momentum_keeps_a_buffer_and_nesterov_is_set():
    module = _module(optimizer="momentum", momentum=0.9, nesterov=True, lr=0.01)
    trainer = _fit(module, epochs=1)
    optimizer = trainer.optimizers[0]
    assert optimizer.param_groups[0]["nesterov"] is True
    assert all("momentum_buffer" in optimizer.state[p] for p in module.model.parameters())
    plain = _fit(_module(optimizer="sgd", lr=0.01), epochs=1).optimizers[0]
    assert plain.param_groups[0]["momentum"] == 0.0


@pytest.mark.parametrize("optimizer, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_weight_decay_shrinks_weights_with_zero_gradient(optimizer, cls):
    module = _module(optimizer=optimizer, weight_decay=0.5, lr=0.1)
    opt = _fit(module, epochs=1).optimizers[0]
    assert type(opt) is cls and opt.param_groups[0]["weight_decay"] == 0.5
    opt.state.clear()  # no momentum / moment estimates: the step is the decay alone
    weights = [p for p in module.model.parameters() if p.ndim >= 2]
    before = [float(p.detach().abs().sum()) for p in weights]
    for p in module.model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(float(p.detach().abs().sum()) < b for p, b in zip(weights, before, strict=False))


def test_mixup_and_cutmix_change_the_targets():
    x, y = next(iter(_loader()))
    mixed_x, soft = _module(mixup_p=1.0).mix_batch(x, y)
    assert soft.shape == (len(y), 3) and not torch.equal(soft, torch.nn.functional.one_hot(y, 3).float())
    assert not torch.equal(mixed_x, x)
    torch.manual_seed(0)
    cut_x, soft = _module(cutmix_p=1.0, mixup_p=0.0).mix_batch(x, y)
    # CutMix: one rectangle of every image replaced by the same rectangle of the previous image in the batch...
    rolled = x.roll(1, 0)
    box = (cut_x == rolled).all(dim=0).all(dim=0) & (x != rolled).any(dim=0).any(dim=0)
    rows, cols = box.any(dim=1), box.any(dim=0)
    assert box.any() and torch.equal(box, rows[:, None] & cols[None, :])  # a non-empty rectangle
    assert torch.equal(cut_x, torch.where(box, rolled, x))  # and nothing else changed
    # ...and the targets mixed in proportion to the areas.
    area = box.float().mean()
    one_hot = torch.nn.functional.one_hot(y, 3).float()
    assert torch.allclose(soft, (1 - area) * one_hot + area * one_hot.roll(1, 0))
    same_x, same_y = _module().mix_batch(x, y)
    assert same_y is y and same_x is x


def test_label_smoothing_is_in_the_loss():
    assert _module(label_smoothing=0.2).loss.label_smoothing == 0.2


def test_ema_is_evaluated_beside_the_raw_weights():
    module = _module(ema_decay=0.9, lr=0.05)
    trainer = _fit(module, epochs=2)
    assert "val/acc_ema" in trainer.callback_metrics and "val/acc" in trainer.callback_metrics
    raw = torch.cat([p.flatten() for p in module.model.parameters()])
    ema = torch.cat([p.flatten() for p in module.ema.module.parameters()])
    assert not torch.equal(raw, ema)  # the average lags the raw weights


def test_class_weights_weight_the_loss():
    from components.training.fit import class_weights

    rows = [{"split": "train", "label": "a"}] * 6 + [{"split": "train", "label": "b"}] * 2
    weights = class_weights(rows, ["a", "b"])
    assert weights[1] == pytest.approx(3 * weights[0])
    module = ClassifierModule(SPEC, TrainParams().model_dump(), ["a", "b", "c"], AUGMENT, class_weights=[1.0, 2.0, 3.0])
    assert module.loss.weight.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("schedule", ["cosine", "step", "onecycle"])
def test_schedules_change_the_learning_rate(schedule):
    module = _module(scheduler=schedule, warmup_epochs=1, step_epochs=1, step_gamma=0.5, lr=0.1)
    trainer = _fit(module, epochs=3)
    final = trainer.optimizers[0].param_groups[0]["lr"]
    assert final < 0.1


def test_optimizer_and_scheduler_tables_cover_exactly_the_config_names():
    assert set(OPTIMIZERS) == set(get_args(OptimizerName))
    assert set(SCHEDULERS) == set(get_args(SchedulerName))


class _LearningRates(L.Callback):
    """The learning rate each optimizer step uses."""

    def __init__(self):
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_cosine_training_follows_warmup_cosine():
    # 48 images in batches of 16, 3 epochs: 9 steps, the first 3 of warm-up
    rates = _LearningRates()
    _fit(_module(scheduler="cosine", warmup_epochs=1, lr=0.1), epochs=3, callbacks=[rates])
    factor = warmup_cosine(total_steps=9, warmup_steps=3)
    assert rates.seen == pytest.approx([0.1 * factor(step) for step in range(9)])


FAMILIES = ["cnn", "rnn", "vit", "resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_learns_exports_to_onnx_and_matches(name):
    assert name in MODELS
    spec = {**SPEC, "name": name, "in_channels": 3, "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    torch.manual_seed(0)
    module = _module(spec=spec, optimizer="adam", lr=1e-3)
    loader = _loader(n=32, batch_size=16, channels=3, size=32)
    x, y = next(iter(loader))
    module.train()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = module.loss(module(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model = module.model.eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (x[:2],),
        buffer,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}},
        dynamo=False,
    )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x[:5]).numpy()
    got = session.run(None, {"image": x[:5].numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
