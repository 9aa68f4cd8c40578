"""The plan from the data: rules on synthetic fingerprints, explicit values win, the mirror test on generated images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from components.config import load_params, unresolved_fields
from components.planning import Machine, MirrorTest, PlanError, fingerprint_of, format_plan, mirror_test, plan_params
from components.planning.plan import MEMORY_SHARE, activation_bytes

CPU = Machine(accelerator="cpu", memory_bytes=16 * 2**30)
GPU = Machine(accelerator="cuda", memory_bytes=80 * 2**30)
SAFE = MirrorTest(accuracy=0.9, mirrored_accuracy=0.88, chance=0.5, images=60, verdict="safe")
UNSAFE = MirrorTest(accuracy=0.89, mirrored_accuracy=0.38, chance=0.1, images=358, verdict="unsafe")
UNSURE = MirrorTest(accuracy=0.3, mirrored_accuracy=0.3, chance=0.25, images=40, verdict="inconclusive")


def rows(counts: dict[str, int], width: int, height: int, mode: str) -> list[dict[str, str]]:
    """Manifest rows (no files): `counts` images per class, 70/15/15 split."""
    out = []
    for label, n in counts.items():
        for i in range(n):
            split = "train" if i % 20 < 14 else "val" if i % 20 < 17 else "test"
            out.append({"label": label, "split": split, "width": str(width), "height": str(height), "mode": mode})
    return out


def plan_of(overrides, data_rows, mirror, machine=CPU, params_file=None):
    params = load_params(params_file, overrides)
    return plan_params(params, fingerprint_of(data_rows, mirror), machine)


def values(plan) -> dict:
    return {d.field: d.value for d in plan.decisions}


DIGITS = rows({str(d): 180 for d in range(10)}, 8, 8, "L")
FACES = rows({"face": 100, "other": 100}, 25, 25, "L")
PHOTOS = rows({c: 150 for c in "abcd"}, 128, 96, "RGB")


def test_digits_plan_is_the_digits_recipe():
    plan = plan_of([], DIGITS, UNSAFE)
    recipe = load_params("params/default.yaml")
    resolved = plan.params
    assert resolved.data.channels == recipe.data.channels == 1
    assert resolved.augment.image_size == recipe.augment.image_size == 32
    assert resolved.augment.hflip_p == recipe.augment.hflip_p == 0.0
    assert resolved.augment.mean == recipe.augment.mean and resolved.augment.std == recipe.augment.std
    assert resolved.augment.eval_resize_ratio == 1.0
    assert resolved.model.name == "cnn" and resolved.model.width == 1.0 and resolved.model.pretrained is False
    assert resolved.train.max_epochs == recipe.train.max_epochs == 30
    assert resolved.train.batch_size == recipe.train.batch_size == 64
    assert resolved.train.early_stopping_patience == recipe.train.early_stopping_patience == 8
    assert resolved.train.class_balance == "none" and resolved.train.find == []
    assert unresolved_fields(resolved) == []
    assert all(d.source == "plan" for d in plan.decisions)
    reasons = {d.field: d.reason for d in plan.decisions}
    assert "mirroring changes the class" in reasons["augment.hflip_p"]
    assert "too small for ImageNet weights" in reasons["model.pretrained"]


def test_small_grey_faces_get_one_channel_flips_and_patience():
    plan = values(plan_of([], FACES, SAFE))
    assert plan["data.channels"] == 1 and plan["augment.image_size"] == 32
    assert plan["augment.hflip_p"] == 0.5
    assert plan["train.early_stopping_patience"] == 15 and plan["train.max_epochs"] == 60
    assert plan["train.batch_size"] == 16  # 140 training images / 8


def test_rgb_photos_without_cached_weights_train_from_scratch_and_name_the_file():
    plan = plan_of([], PHOTOS, UNSURE)
    v = values(plan)
    assert v["data.channels"] == 3 and v["augment.image_size"] == 96 and v["model.name"] == "cnn"
    assert v["model.pretrained"] is False and v["augment.hflip_p"] == 0.5
    reason = {d.field: d.reason for d in plan.decisions}["model.pretrained"]
    assert "resnet18-f37072fd.pth" in reason and "$TORCH_HOME/hub/checkpoints" in reason


def test_rgb_photos_with_cached_weights_fine_tune_with_the_weights_preprocessing():
    machine = CPU.model_copy(update={"cached_weights": ["resnet18"]})
    plan = plan_of([], PHOTOS, UNSURE, machine)
    p = plan.params
    assert p.model.pretrained is True and p.model.name == "resnet18" and p.data.channels == 3
    assert p.augment.image_size == 224 and p.augment.eval_resize_ratio == pytest.approx(256 / 224, abs=1e-3)
    assert p.augment.mean == pytest.approx([0.485, 0.456, 0.406])
    assert p.augment.std == pytest.approx([0.229, 0.224, 0.225])
    assert p.train.freeze_backbone_epochs == 1 and p.train.backbone_lr_mult == 0.1 and p.train.max_epochs == 15
    cross_stitch = plan_of(["multitask.mode=shared_features", "multitask.tasks=[shape]"], PHOTOS, UNSURE, machine)
    assert cross_stitch.params.model.name == "cnn" and cross_stitch.params.model.pretrained is False


def test_imbalanced_classes_get_a_weighted_loss():
    data = rows({"common": 400, "rare": 60, "mid": 200}, 32, 32, "RGB")
    plan = values(plan_of([], data, SAFE))
    assert plan["train.class_balance"] == "loss"
    assert values(plan_of([], DIGITS, UNSAFE))["train.class_balance"] == "none"


def test_an_explicit_value_always_wins_and_is_shown_as_such():
    plan = plan_of(
        ["augment.image_size=48", "augment.hflip_p=0.0", "train.class_balance=sampler", "data.channels=3"],
        FACES,
        SAFE,
    )
    by_field = {d.field: d for d in plan.decisions}
    assert plan.params.augment.image_size == 48 and by_field["augment.image_size"].source == "explicit"
    assert plan.params.augment.hflip_p == 0.0 and by_field["augment.hflip_p"].source == "explicit"
    assert plan.params.train.class_balance == "sampler" and plan.params.data.channels == 3
    assert plan.params.augment.mean == [0.5, 0.5, 0.5]  # planned for the explicit channels
    assert by_field["augment.mean"].source == "plan"
    table = format_plan(plan)
    assert "explicit" in table and "augment.image_size" in table


def test_a_plan_over_the_machines_memory_is_refused_in_one_line():
    small = Machine(accelerator="cuda", memory_bytes=8 * 2**30)
    with pytest.raises(PlanError) as info:
        plan_of(["augment.image_size=1024", "train.batch_size=512"], PHOTOS, SAFE, small)
    message = str(info.value)
    assert "does not fit this machine" in message and "train.batch_size 512" in message and "\n" not in message
    # Left to the plan, the batch shrinks to what fits instead.
    plan = plan_of(["augment.image_size=1024"], PHOTOS, SAFE, small)
    batch, model, width = plan.params.train.batch_size, plan.params.model.name, plan.params.model.width
    budget = small.memory_bytes * MEMORY_SHARE
    # the largest power of two that fits (420 training images cap it at 32), and smaller than the unbounded 64
    assert batch < 32 and batch & (batch - 1) == 0
    assert activation_bytes(model, 1024, batch, width) <= budget < activation_bytes(model, 1024, 2 * batch, width)


def test_auto_batch_size_is_found_on_one_gpu_and_auto_lr_refused_under_ddp():
    plan = plan_of(["train.lr=auto"], PHOTOS, SAFE, GPU)
    assert plan.params.train.find == ["batch_size", "lr"]
    assert plan.params.train.batch_size == 32 and plan.params.train.batch_size_max == 64  # 420 train images
    assert isinstance(plan.params.train.lr, float)
    on_cpu = plan_of([], PHOTOS, SAFE, CPU)
    assert on_cpu.params.train.find == []
    ddp = GPU.model_copy(update={"world_size": 2})
    assert plan_of([], PHOTOS, SAFE, ddp).params.train.find == []
    with pytest.raises(PlanError, match="needs one process"):
        plan_of(["train.lr=auto"], PHOTOS, SAFE, ddp)


def test_explicit_values_that_contradict_the_plan_are_one_line():
    with pytest.raises(PlanError, match="multiple of 4 for the cnn"):
        plan_of(["augment.image_size=30"], FACES, SAFE)


# --- the mirror test on generated images ------------------------------------------------------------


def _write(tmp_path, name: str, image: np.ndarray, label: str, split: str) -> dict[str, str]:
    path = tmp_path / f"{name}.png"
    Image.fromarray(image.astype(np.uint8), "L").save(path)
    return {"path": str(path), "label": label, "split": split}


def _generated(tmp_path, symmetric: bool, n: int = 30) -> list[dict[str, str]]:
    """Two classes of 24x24 noisy images: symmetric ones (a centred bar vs a centred ring) or mirror images of
    each other (a blob on the left vs on the right)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        for label in ("a", "b"):
            image = rng.normal(60, 25, (24, 24))
            if symmetric and label == "a":
                image[4:20, 10:14] += 150
            elif symmetric:
                image[4:20, 4:20] += 150
                image[8:16, 8:16] -= 150
            else:
                column = 3 if label == "a" else 15
                image[8:16, column : column + 6] += 150
            split = "train" if i < n * 2 // 3 else "val"
            out.append(_write(tmp_path, f"{label}{i}", np.clip(image, 0, 255), label, split))
    return out


def test_mirror_test_tells_mirror_safe_from_mirror_unsafe_classes(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "u").mkdir()
    safe = mirror_test(_generated(tmp_path / "s", symmetric=True))
    unsafe = mirror_test(_generated(tmp_path / "u", symmetric=False))
    assert safe.verdict == "safe" and safe.accuracy > 0.9, safe
    assert unsafe.verdict == "unsafe" and unsafe.mirrored_accuracy < 0.2, unsafe
    assert safe.images == unsafe.images == 20


def test_digits_are_not_mirror_safe(tmp_path):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    data = [
        _write(tmp_path, str(i), image.reshape(8, 8) * 255 / 16, str(label), "train" if i % 4 else "val")
        for i, (image, label) in enumerate(zip(x[:800], y[:800], strict=True))
    ]
    result = mirror_test(data)
    assert result.verdict == "unsafe" and result.accuracy > 0.8 and result.mirrored_accuracy < 0.6, result


def test_the_lr_finder_curve_suggests_a_tenth_of_the_rate_at_its_lowest_loss():
    from components.training.fit import lr_from_curve

    lrs = [10 ** (-6 + i * 0.25) for i in range(24)]  # 1e-6 .. ~5
    losses = [2.3 - 0.1 * i for i in range(14)] + [1.0 + 0.5 * i for i in range(10)]  # lowest at lrs[13]
    losses[0] = 0.5  # the smoothing's first point can read low: it is left out
    losses[14] = float("nan")
    assert lr_from_curve({"lr": lrs, "loss": losses}) == pytest.approx(lrs[13] / 10)
    assert lr_from_curve({"lr": lrs[:12], "loss": losses[:12]}) is None
