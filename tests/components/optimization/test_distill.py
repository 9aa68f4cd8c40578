"""Knowledge distillation: the Hinton loss, the teacher/data class check, a student checkpoint that loads."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from components.config import AugmentParams, TrainParams
from components.models import build_model
from components.optimization.distill import DistillationModule, check_teacher_classes, distillation_loss
from components.training.module import load_classifier
from tests.helpers.tiny import CLASSES, SPEC, tiny_data, trained_cnn

STUDENT = SPEC.model_copy(update={"width": 0.25})


def test_alpha_zero_is_plain_cross_entropy():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    targets = torch.randint(0, 3, (8,), generator=g)
    assert torch.allclose(distillation_loss(student, teacher, targets, 4.0, 0.0), F.cross_entropy(student, targets))


def test_kl_term_vanishes_when_student_equals_teacher():
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    targets = torch.zeros(6, dtype=torch.long)
    assert distillation_loss(logits, logits.clone(), targets, 3.0, 1.0).abs().item() < 1e-6
    mixed = distillation_loss(logits, logits.clone(), targets, 3.0, 0.4)
    assert torch.allclose(mixed, 0.6 * F.cross_entropy(logits, targets), atol=1e-6)


def test_loss_equals_a_hand_computed_value():
    student = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0]])
    targets = torch.tensor([0])
    t, alpha = 2.0, 0.5
    p_t = [math.exp(0) / (math.exp(0) + math.exp(0.5)), math.exp(0.5) / (math.exp(0) + math.exp(0.5))]
    p_s = [math.exp(0.5) / (math.exp(0.5) + math.exp(0)), math.exp(0) / (math.exp(0.5) + math.exp(0))]
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=False))
    ce = -math.log(math.exp(1) / (math.exp(1) + math.exp(0)))
    expected = alpha * t * t * kl + (1 - alpha) * ce
    assert distillation_loss(student, teacher, targets, t, alpha).item() == pytest.approx(expected, rel=1e-5)


def test_teacher_classes_must_match_the_data():
    check_teacher_classes(["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="does not know: \\['c'\\]"):
        check_teacher_classes(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="absent from the data: \\['z'\\]"):
        check_teacher_classes(["a", "z"], ["a"])
    with pytest.raises(ValueError, match="another order"):
        check_teacher_classes(["b", "a"], ["a", "b"])


def test_distilled_student_trains_and_its_checkpoint_loads_with_load_classifier(tmp_path):
    teacher = trained_cnn()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = DistillationModule(
        STUDENT.model_dump(),
        TrainParams(lr=0.01, warmup_epochs=0).model_dump(),
        CLASSES,
        AugmentParams(image_size=16, mean=[0.5], std=[0.5]).model_dump(),
        teacher=teacher,
        temperature=4.0,
        alpha=0.7,
    )
    assert not any(k.startswith("teacher") or "_teacher" in k for k in module.state_dict())
    x, y = tiny_data(96)
    held_out_x, held_out_y = tiny_data(48, seed=1)  # other noise: validation never sees a training tensor
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    trainer = L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader, DataLoader(TensorDataset(held_out_x, held_out_y), batch_size=48))
    for key in ("train/loss", "train/kd", "train/ce", "val/loss", "val/acc"):
        assert key in trainer.callback_metrics
    assert trainer.callback_metrics["val/acc"] >= 0.9  # 1.0 on the held-out images for torch seeds 0-4
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())  # teacher frozen

    trainer.save_checkpoint(tmp_path / "student.ckpt")
    ckpt = torch.load(tmp_path / "student.ckpt", weights_only=True)
    assert all(k.startswith(("model.", "train_acc", "val_acc")) for k in ckpt["state_dict"])
    assert "teacher" not in ckpt["hyper_parameters"]
    classifier = load_classifier(str(tmp_path / "student.ckpt"))
    assert classifier.classes == CLASSES and classifier.spec.width == 0.25
    student_params = sum(p.numel() for p in classifier.model.parameters())
    assert student_params * 3 < sum(p.numel() for p in build_model(SPEC).parameters())
    module.eval()
    with torch.no_grad():
        assert torch.allclose(classifier.model(x[:5]), module.model(x[:5]))


def test_bad_distillation_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        DistillationModule(
            STUDENT.model_dump(),
            TrainParams().model_dump(),
            CLASSES,
            AugmentParams().model_dump(),
            teacher=build_model(SPEC),
            temperature=0.0,
            alpha=0.5,
        )
