"""The plan: params resolved from the data's fingerprint, every decision with its reason.

`plan_params` is a pure function of the requested params, the DataFingerprint and the Machine: each field of
`config.AUTO_FIELDS` still set to `auto` (and `train.lr: auto`) gets a value and a reason; an explicit value is
kept and shown as such. The result's params hold no `auto`, so the training process never sees one.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel

from components.config import AUTO_FIELDS, TORCHVISION_MODELS, ParamsError, PipelineParams, parse_params
from components.errors import VisionflowError
from components.models.weights import WeightsMeta, weights_meta
from components.planning.fingerprint import DataFingerprint
from components.planning.machine import Machine

PRETRAINED_MODEL = "resnet18"  # the architecture a plan fine-tunes when pretrained weights fit
PHOTO_SIDE = 64  # images whose shorter side is at least this look like photos to ImageNet weights
SCRATCH_MAX_SIZE = 128  # the largest input a from-scratch plan gives the small CNN
# Training bytes per input pixel and image (activations and their gradients, fp32), by family: a rough upper
# estimate for the memory check, not a measurement.
BYTES_PER_PIXEL = {"cnn": 600, "rnn": 800, "vit": 800, "resnet": 1000, "mobilenet": 1200, "efficientnet": 2000}
MEMORY_SHARE = 0.8  # of the device's (or the host's available) memory a plan may fill


class PlanError(VisionflowError):
    """A plan that cannot run: it does not fit the machine, or explicit values contradict each other."""


class Decision(BaseModel):
    """One planned field: its value, why, and whether the plan or the user chose it."""

    field: str
    value: Any
    reason: str
    source: str  # "plan" or "explicit"


class Plan(BaseModel):
    """The resolved params, the decisions (in table order), and what they were decided from."""

    params: PipelineParams
    decisions: list[Decision]
    fingerprint: DataFingerprint
    machine: Machine

    def flat(self) -> dict[str, Any]:
        """{"plan.<field>": value} for MLflow params."""
        return {f"plan.{d.field}": d.value for d in self.decisions}


class _Planner:
    """Fills `values` (section -> field -> value) one rule at a time, recording each decision."""

    def __init__(self, params: PipelineParams, fp: DataFingerprint, machine: Machine):
        self.fp, self.machine = fp, machine
        self.values = params.model_dump(mode="json")
        self.decisions: list[Decision] = []

    def get(self, field: str) -> Any:
        section, name = field.split(".")
        return self.values[section][name]

    def decide(self, field: str, value: Any, reason: str) -> Any:
        """Set `field` to `value` unless the user set it; returns the value in force."""
        section, name = field.split(".")
        current = self.values[section][name]
        if current != "auto":
            self.decisions.append(Decision(field=field, value=current, reason="set explicitly", source="explicit"))
            return current
        self.values[section][name] = value
        self.decisions.append(Decision(field=field, value=value, reason=reason, source="plan"))
        return value


def _pretrained(p: _Planner) -> tuple[bool, WeightsMeta | None]:
    """model.pretrained and model.name; returns (fine-tuning, the weights' metadata when known)."""
    fp, weights_file = p.fp, p.get("model.weights")
    requested = p.get("model.name")
    candidate = requested if requested in TORCHVISION_MODELS else PRETRAINED_MODEL
    photo = fp.median_side >= PHOTO_SIDE
    if weights_file:
        use = p.decide("model.pretrained", False, f"model.weights given: fine-tuning from {weights_file}")
    elif requested not in ("auto", *TORCHVISION_MODELS):
        use = p.decide("model.pretrained", False, f"{requested} has no pretrained weights")
    elif p.get("multitask.mode") == "shared_features":
        use = p.decide("model.pretrained", False, "cross-stitch multi-task learning is built for the small CNN")
    elif not photo:
        use = p.decide("model.pretrained", False, f"images of {fp.median_side} px are too small for ImageNet weights")
    elif candidate not in p.machine.cached_weights:
        file = weights_meta(candidate).file_name
        use = p.decide(
            "model.pretrained",
            False,
            f"ImageNet weights would fit, but {file} is not in $TORCH_HOME/hub/checkpoints (place it there)",
        )
    else:
        use = p.decide("model.pretrained", True, f"{fp.median_side} px photos; {candidate} weights are cached")
    tuned = bool(use) or bool(weights_file)
    if tuned:
        name = p.decide("model.name", candidate, f"fine-tune {candidate}")
    else:
        name = p.decide("model.name", "cnn", f"small CNN from scratch for {fp.num_train} training images")
    meta = weights_meta(name) if tuned and name in TORCHVISION_MODELS else None
    return tuned, meta


def _input(p: _Planner, tuned: bool, meta: WeightsMeta | None) -> None:
    """Channels, image size, eval resize and normalization."""
    fp = p.fp
    if tuned:
        channels = p.decide("data.channels", 3, "ImageNet weights expect RGB")
    elif fp.grey:
        channels = p.decide("data.channels", 1, f"all {fp.num_images} images are single-channel")
    else:
        channels = p.decide("data.channels", 3, f"{1 - fp.grey_fraction:.0%} of the images have colour")
    if meta:
        size = p.decide("augment.image_size", meta.crop_size, f"the {meta.name} weights' crop size")
        p.decide("augment.eval_resize_ratio", round(meta.resize_size / meta.crop_size, 4), "the weights' eval resize")
        p.decide("augment.mean", _per_channel(meta.mean, channels), "the weights' normalization")
        p.decide("augment.std", _per_channel(meta.std, channels), "the weights' normalization")
        return
    side = fp.median_side
    planned = min(SCRATCH_MAX_SIZE, max(32, math.ceil(side / 8) * 8))
    why = f"median shorter side {side} px" + (", at least 32" if side < 32 else "")
    size = p.decide("augment.image_size", planned, why + (f", at most {SCRATCH_MAX_SIZE}" if side > 128 else ""))
    if isinstance(size, int) and side >= 1.25 * size:
        p.decide("augment.eval_resize_ratio", 1.14, f"{side} px images: resize to 1.14x then center-crop {size}")
    else:
        p.decide("augment.eval_resize_ratio", 1.0, "images are not much larger than the input: plain resize")
    p.decide("augment.mean", [0.5] * channels, "0.5 per channel (from scratch)")
    p.decide("augment.std", [0.5] * channels, "0.5 per channel (from scratch)")


def _per_channel(values: list[float], channels: Any) -> list[float]:
    return [round(sum(values) / len(values), 4)] if channels == 1 else values


def _flips(p: _Planner) -> None:
    mirror = p.fp.mirror
    if mirror is None:
        p.decide("augment.hflip_p", 0.0, "no mirror test ran: flips off")
        return
    figures = f"nearest-class-mean acc {mirror.accuracy:.2f}, mirrored {mirror.mirrored_accuracy:.2f}"
    if mirror.verdict == "safe":
        p.decide("augment.hflip_p", 0.5, f"mirror-safe ({figures})")
    elif mirror.verdict == "unsafe":
        p.decide("augment.hflip_p", 0.0, f"mirroring changes the class ({figures})")
    elif p.fp.median_side >= PHOTO_SIDE:
        p.decide("augment.hflip_p", 0.5, f"mirror test inconclusive ({figures}); photos are mostly mirror-safe")
    else:
        p.decide("augment.hflip_p", 0.0, f"mirror test inconclusive ({figures}); flips off")


def _model_and_schedule(p: _Planner, tuned: bool) -> None:
    n = p.fp.num_train
    if p.get("model.name") == "cnn":
        width = 2.0 if n >= 10_000 else 1.0
        p.decide("model.width", width, f"{n} training images" + (": a wider CNN" if width > 1 else ""))
    else:
        p.decide("model.width", 1.0, "not used by this model")
    if tuned:
        epochs, patience, why = 15, 5, "fine-tuning converges fast"
    elif n < 500:
        epochs, patience, why = 60, 15, f"few images ({n}): more epochs, more patience"
    elif n < 5_000:
        epochs, patience, why = 30, 8, f"{n} training images"
    elif n < 50_000:
        epochs, patience, why = 20, 5, f"{n} training images"
    else:
        epochs, patience, why = 10, 3, f"many images ({n})"
    p.decide("train.max_epochs", epochs, why)
    p.decide("train.early_stopping_patience", patience, why)
    ratio = p.fp.imbalance_ratio
    if p.get("data.task") == "multilabel":
        p.decide("train.class_balance", "none", "multi-label: labels are weighed by train.pos_weight, not classes")
    elif ratio >= 3:
        p.decide("train.class_balance", "loss", f"largest/smallest train class {ratio:.1f} >= 3: weighted loss")
    else:
        p.decide("train.class_balance", "none", f"classes balanced enough (ratio {ratio:.1f} < 3)")
    p.decide("train.freeze_backbone_epochs", 1 if tuned else 0, "train the new head first" if tuned else "no backbone")
    p.decide("train.backbone_lr_mult", 0.1 if tuned else 1.0, "keep pretrained features" if tuned else "no backbone")


def activation_bytes(model: str, image_size: int, batch_size: int, width: float = 1.0) -> int:
    """The rough training memory of a batch (see BYTES_PER_PIXEL)."""
    family = model.split("_")[0].rstrip("0123456789")
    return int(BYTES_PER_PIXEL.get(family, 2000) * max(1.0, float(width)) * image_size * image_size * batch_size)


def _pow2_floor(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, value)))))


def _batch(p: _Planner) -> None:
    """train.batch_size (and, on one GPU, the Tuner's bound); refuses a batch the machine cannot hold."""
    machine, n = p.machine, p.fp.num_train
    size, width, model = p.get("augment.image_size"), p.get("model.width"), p.get("model.name")
    budget = machine.memory_bytes * MEMORY_SHARE
    per_image = activation_bytes(model, size, 1, width)
    fits = int(budget // per_image)
    where = f"{_gib(budget)} GiB usable on {machine.accelerator}"
    explicit = p.get("train.batch_size")
    if explicit != "auto" and explicit > fits:
        raise PlanError(
            f"the plan does not fit this machine: augment.image_size {size} x train.batch_size {explicit} needs about "
            f"{_gib(per_image * explicit)} GiB for {model} activations, {where}; lower train.batch_size or "
            "augment.image_size"
        )
    if fits < 1:
        raise PlanError(
            f"the plan does not fit this machine: one {size}x{size} image needs about {_gib(per_image)} GiB for "
            f"{model} activations, {where}; lower augment.image_size"
        )
    data_cap = max(8, _pow2_floor(n / 8))
    planned = min(64, data_cap, _pow2_floor(fits))
    why = f"min(64, train images / 8 = {data_cap}, memory: {fits})"
    if explicit == "auto" and machine.accelerator == "cuda" and machine.world_size == 1:
        bound = max(planned, min(1024, _pow2_floor(n / 4), _pow2_floor(fits)))
        p.values["train"]["batch_size_max"] = bound
        p.values["train"]["find"] = sorted({*p.values["train"]["find"], "batch_size"})
        why = f"Lightning's Tuner scales it from {planned} up to {bound} ({where})"
    elif explicit == "auto":
        why += "; " + ("CPU memory does not bound it" if machine.accelerator == "cpu" else "no Tuner under DDP")
    p.decide("train.batch_size", planned, why)


def _gib(value: float) -> str:
    return f"{value / 2**30:.1f}"


def _lr(p: _Planner, tuned: bool) -> None:
    if p.get("train.lr") != "auto":
        return
    if p.machine.world_size > 1:
        raise PlanError(
            "train.lr: auto runs Lightning's learning-rate finder, which needs one process; set train.lr to a "
            f"number or trainer.devices: 1 (this plan trains on {p.machine.world_size} processes)"
        )
    start = 1e-3 if tuned else 2e-3
    p.values["train"]["find"] = sorted({*p.values["train"]["find"], "lr"})
    p.decide("train.lr", start, f"Lightning's lr_find in the training process (falls back to {start:g})")


def plan_params(params: PipelineParams, fingerprint: DataFingerprint, machine: Machine) -> Plan:
    """Resolve every `auto` of `params` from the data's fingerprint and the machine.

    Returns the Plan (resolved params with no `auto` left, and one Decision per planned field, explicit values
    kept and marked so). Raises PlanError (one line) for a plan the machine cannot hold or explicit values that
    contradict the plan.
    """
    p = _Planner(params, fingerprint, machine)
    task = "multilabel" if fingerprint.multilabel else "single"
    p.decide(
        "data.task",
        task,
        "a label cell holds ';' (several labels)" if fingerprint.multilabel else "one label per image",
    )
    tuned, meta = _pretrained(p)
    _input(p, tuned, meta)
    _flips(p)
    _model_and_schedule(p, tuned)
    _batch(p)
    _lr(p, tuned)
    try:
        resolved = parse_params(p.values)
    except ParamsError as err:
        raise PlanError(f"the plan and the explicit params disagree: {err}") from None
    order = [f"{section}.{name}" for section, names in AUTO_FIELDS.items() for name in names] + ["train.lr"]
    decisions = sorted(p.decisions, key=lambda d: order.index(d.field) if d.field in order else len(order))
    return Plan(params=resolved, decisions=decisions, fingerprint=fingerprint, machine=machine)


def format_plan(plan: Plan) -> str:
    """The decisions as a text table: field, value, source, reason."""
    rows = [(d.field, _show(d.value), d.source, d.reason) for d in plan.decisions]
    widths = [max(len(r[i]) for r in [("field", "value", "source", "reason"), *rows]) for i in range(3)]
    lines = []
    for row in [("field", "value", "source", "reason"), *rows]:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)
