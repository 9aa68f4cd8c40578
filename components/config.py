"""Every parameter of a visionflow run, as pydantic models.

`PipelineParams` is what a params YAML holds, what `--set a.b=c` overrides and what the
Prefect flow takes as its parameter (so the Prefect UI renders it as a form). Extra keys are
errors, every field has a default and a description.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from components.errors import VisionflowError

Auto = Literal["auto"]
AUTO_NOTE = " auto (the default in a pipeline): the plan decides from the data (see `visionflow plan`)."


class ParamsError(VisionflowError):
    """A params file or override that cannot be used; the message is one line naming the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _on_off(value: Any) -> Any:
    """YAML reads on / off as true / false: take them back as the words."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class DataParams(_Section):
    """Where the images come from and how they are split."""

    path: str = Field(
        "bundled:digits",
        description="Image source: an ImageFolder directory (class sub-folders, optional "
        "train/val/test top folders), a CSV manifest (path,label[,more label columns]), a .zip or "
        ".tar.gz of either, 'bundled:digits' (scikit-learn's digits) or 'torchvision:MNIST' / "
        "'torchvision:FashionMNIST' / 'torchvision:CIFAR10' (downloaded when online).",
    )
    label_column: str = Field("label", description="Label column of a CSV manifest.")
    task: Literal["single", "multilabel"] | Auto = Field(
        "single",
        description="single: one label per image (softmax head). multilabel: a CSV manifest's label cell holds "
        "several labels separated by ';' (e.g. cat;outdoor): a sigmoid head, one yes/no per label, per-label "
        "thresholds tuned on the validation split. auto: multilabel when any label cell of a CSV manifest holds ';' "
        "(an explicit value wins).",
    )
    empty_labels: Literal["negative", "refuse"] = Field(
        "negative",
        description="multilabel: a row whose label cell is empty is an image where none of the labels is present "
        "(negative: trained as all-negative) or an error (refuse: one line, nothing trained).",
    )
    channels: Literal[1, 3] | Auto = Field(
        3, description="Channels every image is converted to (1 = L, 3 = RGB)." + AUTO_NOTE
    )
    val_fraction: float = Field(
        0.15,
        gt=0,
        lt=0.5,
        description="Share of each class held out for validation (when the source has no split folders).",
    )
    test_fraction: float = Field(
        0.15,
        gt=0,
        lt=0.5,
        description="Share of each class held out for testing (when the source has no split folders).",
    )
    seed: int = Field(42, description="Seed of the stratified split; the same data and seed give the same split.")
    max_pixels: int = Field(
        40_000_000, gt=0, description="Images with more pixels than this are quarantined (decompression bombs)."
    )
    min_images_per_class: int = Field(
        3, ge=3, description="A class with fewer valid images cannot be split into train/val/test and is refused."
    )
    archive_max_bytes: int = Field(
        16 * 1024**3,
        gt=0,
        description="An archive given as data.path may unpack to at most this many bytes (checked on its headers "
        "before extraction and on the bytes written during it); a bigger one is refused and nothing is kept. "
        "Larger data sets belong in a folder.",
    )
    archive_max_members: int = Field(
        1_000_000, gt=0, description="An archive given as data.path may hold at most this many files and folders."
    )
    archive_max_ratio: float = Field(
        200.0,
        ge=0,
        description="An archive may unpack to at most this many times its own size once more than 16 MiB are "
        "written (images barely compress; zip and gzip bombs expand about 1000 times). 0 turns the check off.",
    )
    label_conflicts: Literal["quarantine", "keep"] = Field(
        "quarantine",
        description="The same file content under two classes: quarantine every copy (reason 'same image labelled "
        "A and B') or keep them all with their labels. Either way they are counted in the validation report.",
    )
    cache: bool = Field(
        True,
        description="Training decodes each image once into a memory-mapped uint8 cache under run.cache_dir/images "
        "(resized to the eval transform's resize side, keyed by the images' content), so later epochs and runs skip "
        "decoding; eval results are unchanged. Images that all share a size smaller than that side are cached at "
        "their own size and resized after (an upsampled copy would change the training crops); images of different "
        "sizes, some smaller, are not cached (a log line says so). false: decode every image every epoch.",
    )
    in_memory: Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)] = Field(
        "auto",
        description="Hold the decoded train split in memory as one uint8 tensor (in RAM on CPUs, on the device on "
        "GPUs) and augment whole batches there with tensor operations (the same distributions as the Albumentations "
        "train transform): small data sets train at in-memory speed. auto: when it fits data.memory_budget_mb; on: "
        "the same, with an automatic budget of most of the free memory; off: never. A set that does not fit keeps "
        "the image cache (one log line says so). Validation is unchanged.",
    )
    memory_budget_mb: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="MiB the in-memory train split may take (data.in_memory). auto: a share of the memory available "
        "when training starts: 25% (in_memory auto) or 75% (on) of free RAM on CPUs, shared among the node's training "
        "processes, or of free device memory on GPUs.",
    )

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction must leave at least 20% for training")
        return self


class AugmentParams(_Section):
    """Albumentations pipelines: random train transform and deterministic eval transform."""

    image_size: Annotated[int, Field(ge=8, le=1024)] | Auto = Field(
        32, description="Side of the square image the model sees." + AUTO_NOTE
    )
    eval_resize_ratio: Annotated[float, Field(ge=1.0, le=2.0)] | Auto = Field(
        1.0,
        description="Eval: resize to image_size*ratio, then center-crop image_size (1.0 = plain resize)." + AUTO_NOTE,
    )
    crop_scale_min: float = Field(
        0.8,
        gt=0,
        le=1.0,
        description="Train: RandomResizedCrop's smallest area fraction (1.0 turns the random crop off).",
    )
    hflip_p: Annotated[float, Field(ge=0, le=1)] | Auto = Field(
        0.0,
        description="Train: probability of a horizontal flip (keep 0 for digits and text)." + AUTO_NOTE,
    )
    vflip_p: float = Field(0.0, ge=0, le=1, description="Train: probability of a vertical flip.")
    rotate_limit: float = Field(10.0, ge=0, le=180, description="Train: largest rotation in degrees.")
    rotate_p: float = Field(0.5, ge=0, le=1, description="Train: probability of a rotation.")
    color_jitter_p: float = Field(
        0.0, ge=0, le=1, description="Train: probability of brightness/contrast/saturation/hue jitter."
    )
    blur_p: float = Field(0.0, ge=0, le=1, description="Train: probability of a Gaussian blur.")
    coarse_dropout_p: float = Field(
        0.0, ge=0, le=1, description="Train: probability of cutting out 1-3 rectangles (coarse dropout)."
    )
    mean: list[float] | Auto = Field(
        [0.5, 0.5, 0.5], description="Normalization mean per channel (one value per data.channels)." + AUTO_NOTE
    )
    std: list[float] | Auto = Field(
        [0.5, 0.5, 0.5], description="Normalization std per channel (one value per data.channels)." + AUTO_NOTE
    )
    preview_images: int = Field(
        16, ge=0, le=64, description="Augmented samples drawn in the preview grid logged to MLflow (0 = none)."
    )


TorchvisionName = Literal[
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
]
TORCHVISION_MODELS: tuple[str, ...] = get_args(TorchvisionName)
# Names the build_model, optimizer and scheduler tables are keyed by (each table covers exactly these).
ModelName = Literal["cnn", "rnn", "vit", TorchvisionName]
OptimizerName = Literal["gd", "sgd", "momentum", "adam", "adamw"]
SchedulerName = Literal["cosine", "step", "onecycle", "none"]


class RnnParams(_Section):
    """The RNN family: the image read as a sequence of rows or patches."""

    cell: Literal["gru", "lstm"] = Field("gru", description="Recurrent cell.")
    hidden_size: int = Field(128, ge=4, description="Hidden units per direction.")
    num_layers: int = Field(2, ge=1, le=8, description="Stacked recurrent layers.")
    bidirectional: bool = Field(True, description="Read the sequence both ways.")
    pooling: Literal["last", "mean"] = Field("mean", description="Classify the last state or the mean over steps.")
    sequence: Literal["rows", "patches"] = Field("rows", description="One step per image row, or per square patch.")
    patch_size: int = Field(4, ge=1, description="Patch side when sequence is patches.")


class VitParams(_Section):
    """The self-attention family: a Vision Transformer for small inputs."""

    patch_size: int = Field(4, ge=1, description="Patch side in pixels; must divide augment.image_size.")
    depth: int = Field(4, ge=1, le=24, description="Transformer encoder layers.")
    heads: int = Field(4, ge=1, description="Attention heads; must divide width.")
    width: int = Field(128, ge=8, description="Token embedding width.")
    mlp_ratio: float = Field(2.0, gt=0, description="Hidden width of each MLP block relative to width.")


class ModelParams(_Section):
    """The network, built by components.models.build_model."""

    name: ModelName | Auto = Field(
        "cnn",
        description="Architecture: cnn (the small CNN: conv32-pool-conv64-pool-dense128), rnn (GRU/LSTM over rows "
        "or patches), vit (Vision Transformer), or a torchvision model: "
        + ", ".join(TORCHVISION_MODELS)
        + "."
        + AUTO_NOTE,
    )
    pretrained: bool | Auto = Field(
        False,
        description="Start from torchvision's ImageNet weights (read from $TORCH_HOME/hub/checkpoints, downloaded "
        "there once when online; offline without that file: one line naming it). auto: when the weights are in "
        "that cache and the images are photo-like (see `visionflow plan`).",
    )
    weights: str | None = Field(
        None,
        description="A local weights file for model.name: a state dict or a torchvision weight file (loaded with "
        "weights_only=True; the classifier head is replaced for the data's classes). Implies fine-tuning.",
    )
    dropout: float = Field(0.25, ge=0, lt=1, description="Dropout before the classifier.")
    width: Annotated[float, Field(gt=0, le=4)] | Auto = Field(
        1.0, description="cnn only: scales its 32/64 channels and 128 dense units." + AUTO_NOTE
    )
    rnn: RnnParams = Field(default_factory=RnnParams, description="Options of the rnn family.")
    vit: VitParams = Field(default_factory=VitParams, description="Options of the vit family.")

    @model_validator(mode="after")
    def _vit_heads_divide_width(self) -> ModelParams:
        if self.name == "vit" and self.vit.width % self.vit.heads:
            raise ValueError(f"vit.heads ({self.vit.heads}) must divide vit.width ({self.vit.width})")
        return self


class TrainParams(_Section):
    """Optimisation, regularization and the training loop."""

    max_epochs: Annotated[int, Field(ge=1)] | Auto = Field(30, description="Upper bound on epochs." + AUTO_NOTE)
    batch_size: Annotated[int, Field(ge=1)] | Auto = Field(
        64,
        description="Batch size per device (with gd: the chunk size gradients are accumulated over). auto: the plan "
        "bounds it by the data and the memory; on a GPU Lightning's Tuner then finds the largest batch that fits.",
    )
    optimizer: OptimizerName = Field(
        "adam",
        description="gd: full-batch gradient descent (one step per epoch, gradients accumulated over the whole "
        "training set); sgd: mini-batch SGD without momentum; momentum: SGD with momentum (see nesterov); "
        "adam: Adam (weight_decay is an L2 term); adamw: Adam with decoupled weight decay.",
    )
    lr: Annotated[float, Field(gt=0)] | Auto = Field(
        2e-3, description="Peak learning rate. auto: found by Lightning's learning-rate finder in the training process."
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum of the momentum optimizer.")
    nesterov: bool = Field(False, description="Nesterov momentum (momentum optimizer).")
    scheduler: SchedulerName = Field(
        "cosine",
        description="Learning-rate schedule after the warm-up: cosine decay, step decay, one-cycle, or constant.",
    )
    warmup_epochs: int = Field(
        1, ge=0, description="Linear warm-up epochs (cosine, step and none; one-cycle has its own warm-up)."
    )
    step_epochs: int = Field(10, ge=1, description="step schedule: epochs between learning-rate drops.")
    step_gamma: float = Field(0.1, gt=0, le=1, description="step schedule: factor of each drop.")
    weight_decay: float = Field(1e-4, ge=0, description="L2 regularization as weight decay (decoupled for adamw).")
    l1: float = Field(
        0.0, ge=0, description="L1 penalty coefficient on weights (not biases or norm parameters), added to the loss."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy.")
    mixup_alpha: float = Field(0.2, gt=0, description="Beta(alpha, alpha) of mixup.")
    mixup_p: float = Field(0.0, ge=0, le=1, description="Probability that a training batch is mixed up (0 = off).")
    cutmix_alpha: float = Field(1.0, gt=0, description="Beta(alpha, alpha) of cutmix.")
    cutmix_p: float = Field(0.0, ge=0, le=1, description="Probability that a training batch gets cutmix (0 = off).")
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "Exponential moving average of the weights, evaluated beside the raw weights as val/acc_ema (0 = off)."
        ),
    )
    class_balance: Literal["none", "loss", "sampler"] | Auto = Field(
        "none",
        description="Class imbalance: none, loss (inverse-frequency class weights) or sampler (weighted random "
        "sampler)." + AUTO_NOTE,
    )
    early_stopping_patience: Annotated[int, Field(ge=0)] | Auto = Field(
        8, description="Epochs without val accuracy improvement before stopping (0 = off)." + AUTO_NOTE
    )
    freeze_backbone_epochs: Annotated[int, Field(ge=0)] | Auto = Field(
        0,
        description="Fine-tuning: epochs that train the new classifier head alone before the backbone is unfrozen "
        "(Lightning's BaseFinetuning)." + AUTO_NOTE,
    )
    backbone_lr_mult: Annotated[float, Field(gt=0, le=1)] | Auto = Field(
        1.0, description="Fine-tuning: the backbone's learning rate is train.lr times this." + AUTO_NOTE
    )
    find: list[Literal["batch_size", "lr"]] = Field(
        default_factory=list,
        description="Set by the plan from auto values: what Lightning's Tuner finds in the training process "
        "(batch_size: scale_batch_size from train.batch_size up to batch_size_max; lr: lr_find).",
    )
    batch_size_max: int = Field(
        8192, ge=1, description="The largest batch size the Tuner may pick (set by the plan from the data)."
    )
    seed: int = Field(7, description="Seed for weights, shuffling and augmentation.")
    num_workers: int | Literal["auto"] = Field(
        "auto",
        description="DataLoader worker processes per training process (0 = load in the training process; auto = the "
        "CPU cores this process may use, shared among the devices of the node, less one for the training loop, at "
        "most 8). "
        "The augmentation stream depends on it: set an int for identical results across machines.",
    )
    pin_memory: bool | Literal["auto"] = Field(
        "auto", description="Pinned host memory for faster copies to the GPU (auto = on when training on CUDA)."
    )
    persistent_workers: bool = Field(
        True, description="Keep DataLoader workers alive between epochs (with num_workers > 0)."
    )
    prefetch_factor: int = Field(
        2, ge=1, description="Batches each DataLoader worker loads ahead (with num_workers > 0)."
    )
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="Scale train.lr with the effective batch size (batch_size x devices x nodes x accumulation) "
        "against lr_base_batch_size: linear (Goyal et al.) or sqrt; none keeps train.lr. The rule and the result "
        "are logged.",
    )
    lr_base_batch_size: int = Field(
        64, ge=1, description="The batch size train.lr was chosen for (lr_scaling's reference)."
    )
    suspicious_labels: bool = Field(
        True,
        description="Rank the training images whose label is probably wrong by their area under the margin (AUM, "
        "Pleiss et al. 2020: the given label's logit minus the largest other logit, averaged over the epochs; "
        "mixed-up batches are left out): suspicious_labels.csv and a grid in the train run.",
    )
    suspicious_top_k: int = Field(
        50,
        ge=1,
        description="How many of the lowest-margin training images suspicious_labels.csv lists (the grid shows the "
        "first 64 at most).",
    )
    resume: bool = Field(False, description="Continue from the run's last checkpoint (set by `visionflow resume`).")
    pos_weight: Literal["auto", "off"] = Field(
        "off",
        description="data.task multilabel: weight each label's positives in the BCE loss by negatives/positives "
        "of the train split (auto, computed in the training process from the label frequencies) or not (off).",
    )
    progress_bar: bool = Field(True, description="Show Lightning's progress bar.")

    @model_validator(mode="after")
    def _compatible(self) -> TrainParams:
        if self.optimizer == "gd" and self.class_balance == "sampler":
            raise ValueError(
                "optimizer gd uses every training image once per step; a weighted sampler does not apply (use "
                "class_balance: loss)"
            )
        if self.mixup_p + self.cutmix_p > 1:
            raise ValueError("mixup_p + cutmix_p must be at most 1 (one of them per batch)")
        return self


class TrainerParams(_Section):
    """Where and how Lightning runs the training."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = Field("auto", description="Lightning accelerator.")
    devices: int | Literal["auto"] = Field(1, description="Devices per node (an int or 'auto').")
    strategy: Literal["auto", "ddp", "ddp_spawn", "fsdp"] = Field(
        "auto", description="Lightning strategy; ddp runs one process per device."
    )
    num_nodes: int = Field(1, ge=1, description="Nodes (multi-node needs torchrun or SLURM to launch).")
    precision: Literal["32-true", "32", "bf16-mixed", "16-mixed"] = Field(
        "32-true", description="Numerical precision (16-mixed needs a GPU; bf16-mixed works on CPUs and recent GPUs)."
    )
    accumulate_grad_batches: int = Field(
        1,
        ge=1,
        description=(
            "Batches whose gradients are summed before each optimizer step (multiplies the effective batch size)."
        ),
    )
    async_checkpoints: bool = Field(
        True,
        description=(
            "Write checkpoints from a background thread (Lightning's AsyncCheckpointIO): the training thread copies "
            "the tensors and goes on while they are serialised and written (resnet18 with Adam: a 128 MiB "
            "checkpoint stalls training ~70 ms instead of ~630 ms). Not with fsdp, which writes its own."
        ),
    )
    sync_batchnorm: bool = Field(
        True,
        description=(
            "Under DDP with more than one GPU process, turn BatchNorm layers into SyncBatchNorm (statistics over the "
            "global batch; PyTorch has no CPU SyncBatchNorm, on CPUs rank zero's statistics are broadcast)."
        ),
    )

    @model_validator(mode="after")
    def _devices_positive(self) -> TrainerParams:
        if isinstance(self.devices, int) and self.devices < 1:
            raise ValueError("devices must be >= 1 or 'auto'")
        if self.accelerator == "cpu" and self.strategy == "fsdp":
            raise ValueError("strategy fsdp needs GPUs; on CPUs use strategy ddp")
        if self.accelerator == "cpu" and self.precision == "16-mixed":
            raise ValueError("precision 16-mixed needs a GPU; on CPUs use bf16-mixed or 32-true")
        return self


class MultitaskParams(_Section):
    """Several label columns of a CSV manifest learnt together (the primary task is data.label_column)."""

    mode: Literal["off", "shared_weights", "shared_features"] = Field(
        "off",
        description="off: one task. shared_weights: one backbone, one head per task (hard sharing). "
        "shared_features: one backbone per task, exchanging features through learned cross-stitch units "
        "(soft sharing; cnn only).",
    )
    tasks: list[str] = Field(default_factory=list, description="Extra label columns learnt beside the primary label.")
    loss_weights: dict[str, float] = Field(
        default_factory=dict, description="Loss weight per task name (the primary task is 'label'); 1.0 when absent."
    )


class EvaluateParams(_Section):
    """The test-set report."""

    top_k: int = Field(3, ge=1, description="k of the top-k accuracy (clipped to the number of classes).")
    calibration_bins: int = Field(15, ge=2, description="Bins of the expected calibration error.")
    misclassified_grid: int = Field(
        25, ge=0, le=100, description="Misclassified test images drawn in the grid (0 = none)."
    )
    explain: bool = Field(
        True,
        description=(
            "Draw explanations.png: where the model looked for its prediction (Grad-CAM for CNNs, Integrated "
            "Gradients for the ViT and the RNN) on the most confident mistakes and a sample of correct test images."
        ),
    )
    explain_images: int = Field(16, ge=1, le=64, description="Images in the explanation grid (mistakes first).")
    explain_method: Literal["auto", "gradcam", "integrated_gradients"] = Field(
        "auto",
        description="auto: integrated_gradients for vit and rnn, gradcam (on the last feature map larger than 1x1) "
        "for the convolutional families.",
    )
    calibrate: bool = Field(
        True,
        description=(
            "Fit temperature scaling on the validation split: the report, the bundle and the server give "
            "calibrated probabilities (accuracy unchanged)."
        ),
    )


class DistillParams(_Section):
    """Knowledge distillation of the trained model (the teacher) into a smaller student."""

    enabled: bool = Field(False, description="Train a student with the Hinton loss from the pipeline's trained model.")
    student: ModelName = Field("cnn", description="Student architecture.")
    student_dropout: float = Field(0.1, ge=0, lt=1, description="Dropout of the student.")
    student_width: float = Field(
        0.25, gt=0, le=4, description="Width multiplier of a cnn student (0.25: a quarter of the channels)."
    )
    temperature: float = Field(4.0, gt=0, description="Softmax temperature T of the distillation term.")
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the distillation term: alpha*T^2*KL + (1-alpha)*CE.")
    epochs: int = Field(15, ge=1, description="Student training epochs.")
    baseline: bool = Field(
        True, description="Also train the same student without the teacher, so the gain is measured."
    )


class PruneParams(_Section):
    """Pruning of the trained model."""

    enabled: bool = Field(False, description="Structured channel pruning with torch-pruning, then fine-tuning.")
    ratio: float = Field(0.5, gt=0, lt=1, description="Fraction of channels removed.")
    importance: Literal["l1", "l2", "random"] = Field("l2", description="Channel importance criterion.")
    global_pruning: bool = Field(False, description="Rank channels across layers (global) instead of per layer.")
    finetune_epochs: int = Field(5, ge=0, description="Fine-tuning epochs after pruning.")
    unstructured_amount: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "Also make a global magnitude (unstructured) pruned variant with this sparsity (0 = off); dense kernels do"
            " not get faster."
        ),
    )


class QuantizeParams(_Section):
    """int8 post-training quantization of the exported ONNX model (onnxruntime)."""

    static: bool = Field(True, description="Static QDQ int8 with calibration (the fast path on CPUs).")
    dynamic: bool = Field(False, description="Dynamic int8 (suits Linear-heavy models; often slower for CNNs).")
    per_channel: bool = Field(True, description="Per-channel weight scales for static quantization.")
    calibration_images: int = Field(128, ge=1, description="Training images (eval transform) used for calibration.")
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8",
        description=(
            "Static int8 activation type: uint8 is the fast one on x86 (onnxruntime runs int8-activation QDQ "
            "convolutions in fp32 there); int8 suits ARM."
        ),
    )
    reduce_range: bool | None = Field(
        None, description="7-bit weights for static int8; null = on for x86 CPUs without VNNI / AMX, off elsewhere."
    )
    fallback_layers: int = Field(
        4,
        ge=0,
        description=(
            "When static int8 misses the tolerance, keep up to this many of its most damaged activations (and the"
            " layers around them) in fp32 until it passes; 0 = off."
        ),
    )


class OptimizeParams(_Section):
    """The compression stage: every variant measured the same way and gated against the fp32 reference."""

    enabled: bool = Field(False, description="Run the compression stage in the pipeline.")
    distill: DistillParams = Field(default_factory=DistillParams, description="Knowledge distillation.")
    prune: PruneParams = Field(default_factory=PruneParams, description="Pruning.")
    quantize: QuantizeParams = Field(default_factory=QuantizeParams, description="int8 quantization.")
    tolerance: float = Field(0.01, ge=0, le=1, description="Largest accepted accuracy drop against the fp32 reference.")
    objective: Literal["smallest", "fastest"] = Field(
        "smallest", description="How the best accepted variant is chosen."
    )
    threads: int = Field(1, ge=1, description="onnxruntime threads for latency measurements.")
    latency_repeats: int = Field(20, ge=3, description="Timed runs per latency figure (median reported).")


class PackageParams(_Section):
    """Export, bundle and registry gate."""

    enabled: bool = Field(True, description="Export to ONNX, write the bundle and register the model.")
    model_name: str = Field("visionflow-classifier", description="MLflow registered model name.")
    promote_margin: float = Field(
        0.0,
        ge=0,
        le=1,
        description="A challenger becomes champion only when its test accuracy beats the champion's by more than this.",
    )
    parity_max_abs_diff: float = Field(
        1e-3, gt=0, description="Largest |logit difference| between PyTorch and ONNX on test images."
    )
    parity_min_agreement: float = Field(
        0.99, ge=0, le=1, description="Smallest top-1 agreement between PyTorch and ONNX."
    )
    onnx_exporter: Literal["auto", "torchscript", "dynamo"] = Field(
        "auto",
        description=(
            "PyTorch's ONNX exporter: torchscript (torch.onnx.export dynamo=False: traces the model, 0.1 s for the "
            "digits CNN), dynamo (torch.export: 2-3 s there, 11 s for mobilenet_v3_small), or auto: torchscript, "
            "then dynamo when it fails or its file does not run."
        ),
    )
    torchscript: bool = Field(False, description="Also export TorchScript (model.torchscript.pt, outside the bundle).")
    executorch: bool = Field(
        False,
        description=(
            "Also export an ExecuTorch program (model.pte, XNNPACK, one image per call) into the bundle, "
            "parity-checked like ONNX; needs pip install 'visionflow[executorch]'."
        ),
    )


class RunParams(_Section):
    """Where the run's files and tracking go."""

    experiment: str = Field("visionflow", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name (default: generated).")
    output_dir: str = Field("runs", description="Run directories are created under this folder.")
    cache_dir: str = Field(".visionflow", description="Materialised bundled data sets, extracted archives, downloads.")


def _check_cron(value: str) -> str:
    from croniter import croniter

    if not croniter.is_valid(value):
        raise ValueError(f"{value!r} is not a valid cron string (e.g. '0 3 * * 1' = Mondays 03:00)")
    return value


def _check_timezone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)") from None
    return value


CronString = Annotated[str, AfterValidator(_check_cron)]
TimeZone = Annotated[str, AfterValidator(_check_timezone)]


class RetrainParams(_Section):
    """Scheduled retraining: the `retrain` deployment served by `visionflow deploy`."""

    cron: CronString = Field(
        "0 3 * * 1", description="When the retrain deployment runs (cron: minute hour day-of-month month day-of-week)."
    )
    timezone: TimeZone = Field("UTC", description="IANA time zone of the cron schedule, e.g. Europe/Berlin.")
    max_lateness_minutes: int = Field(
        60,
        ge=1,
        description=(
            "A scheduled retrain starting later than this after its slot (e.g. after downtime) is skipped, so missed "
            "slots never run as a catch-up flood."
        ),
    )


class MonitorParams(_Section):
    """Drift monitoring of a served model: `visionflow monitor` and the scheduled monitor deployment."""

    log_dir: str = Field(
        "prediction-log",
        description=(
            "Prediction log folder the scheduled monitor reads (written by `visionflow serve --prediction-log DIR`)."
        ),
    )
    bundle: str | None = Field(
        None,
        description=(
            "Bundle whose reference profile is the baseline: a folder, a .tar.gz or models:/NAME@ALIAS (None = "
            "models:/<package.model_name>@champion)."
        ),
    )
    feedback: str | None = Field(
        None, description="CSV of id,label: true labels of logged predictions (ids from /predict), for live accuracy."
    )
    window_records: int = Field(
        1000, ge=1, description="The latest this many predictions of the model are compared with the reference."
    )
    window_hours: float | None = Field(
        None, gt=0, description="Only predictions of the last this many hours are compared (None = no time limit)."
    )
    min_records: int = Field(
        100, ge=1, description="With fewer predictions in the window no drift test is run (the report says so)."
    )
    psi_threshold: float = Field(
        0.2,
        gt=0,
        description=(
            "Predicted-class distribution drifts when its population stability index exceeds this (0.1 moderate, 0.25 "
            "large)."
        ),
    )
    ks_pvalue: float = Field(
        0.01,
        gt=0,
        lt=1,
        description=(
            "An image or prediction statistic drifts when its KS-test p-value is below this, Bonferroni-divided by the"
            " statistics tested ..."
        ),
    )
    ks_min_statistic: float = Field(
        0.1,
        ge=0,
        le=1,
        description="... and its KS distance is at least this (large windows make tiny differences significant).",
    )
    confidence_drop: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Drift when the mean top-1 probability falls by more than this against the reference.",
    )
    accuracy_drop: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Drift when live accuracy (from feedback) falls by more than this below the reference accuracy.",
    )
    min_feedback: int = Field(
        30, ge=1, description="Labelled predictions needed before live accuracy can signal drift."
    )
    cron: CronString = Field(
        "0 * * * *", description="When the monitor deployment runs (cron: minute hour day-of-month month day-of-week)."
    )
    timezone: TimeZone = Field("UTC", description="IANA time zone of the monitor's cron schedule.")


# Fields that are `auto` by default in a pipeline's params (decided by components.planning from the data); a
# section built on its own keeps the concrete default written in its field.
AUTO_FIELDS: dict[str, tuple[str, ...]] = {
    "data": ("channels", "task"),
    "augment": ("image_size", "eval_resize_ratio", "hflip_p", "mean", "std"),
    "model": ("name", "width", "pretrained"),
    "train": (
        "max_epochs",
        "batch_size",
        "early_stopping_patience",
        "class_balance",
        "freeze_backbone_epochs",
        "backbone_lr_mult",
    ),
}


class PipelineParams(_Section):
    """All parameters of one pipeline run."""

    data: DataParams = Field(default_factory=DataParams, description="Data source and split.")
    augment: AugmentParams = Field(default_factory=AugmentParams, description="Augmentation and preprocessing.")
    model: ModelParams = Field(default_factory=ModelParams, description="Network.")
    multitask: MultitaskParams = Field(default_factory=MultitaskParams, description="Multi-task learning.")
    train: TrainParams = Field(default_factory=TrainParams, description="Training loop.")
    trainer: TrainerParams = Field(default_factory=TrainerParams, description="Devices and strategy.")
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams, description="Test report.")
    optimize: OptimizeParams = Field(
        default_factory=OptimizeParams, description="Compression: distill, prune, quantize."
    )
    package: PackageParams = Field(default_factory=PackageParams, description="Export, bundle, registry.")
    run: RunParams = Field(default_factory=RunParams, description="Tracking and output folders.")
    retrain: RetrainParams = Field(
        default_factory=RetrainParams, description="Scheduled retraining (visionflow deploy)."
    )
    monitor: MonitorParams = Field(
        default_factory=MonitorParams, description="Drift monitoring of the served model (visionflow monitor)."
    )

    @model_validator(mode="before")
    @classmethod
    def _auto_by_default(cls, raw: Any) -> Any:
        """In a pipeline, the fields of AUTO_FIELDS that the input does not set are `auto` (the plan decides them);
        a section given as a model object keeps its own values."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        for section, names in AUTO_FIELDS.items():
            given = raw.get(section, {})
            if not isinstance(given, dict):
                continue
            raw[section] = {**{name: "auto" for name in names}, **given}
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> PipelineParams:
        size = self.augment.image_size if isinstance(self.augment.image_size, int) else 0
        if self.model.name == "vit" and size % self.model.vit.patch_size:
            raise ValueError(
                f"model.vit.patch_size {self.model.vit.patch_size} does not divide augment.image_size {size}"
            )
        if self.model.name == "rnn" and self.model.rnn.sequence == "patches" and size % self.model.rnn.patch_size:
            raise ValueError(
                f"model.rnn.patch_size {self.model.rnn.patch_size} does not divide augment.image_size {size}"
            )
        multitask = self.multitask
        if multitask.mode != "off" and not multitask.tasks:
            raise ValueError(f"multitask.mode {multitask.mode} needs at least one extra task in multitask.tasks")
        if multitask.mode == "off" and multitask.tasks:
            raise ValueError("multitask.tasks is set but multitask.mode is off")
        if multitask.mode == "shared_features" and self.model.name not in ("cnn", "auto"):
            raise ValueError("multitask.mode shared_features (cross-stitch) is built for model.name cnn")
        if self.data.task == "multilabel":
            _check_multilabel(self)
        if multitask.mode != "off" and (self.train.mixup_p or self.train.cutmix_p):
            raise ValueError("mixup/cutmix mix one label set; they are not available with multitask")
        unknown = set(multitask.loss_weights) - {"label", *multitask.tasks}
        if unknown:
            raise ValueError(f"multitask.loss_weights names unknown tasks: {', '.join(sorted(unknown))}")
        if self.train.optimizer == "gd" and self.trainer.accumulate_grad_batches > 1:
            raise ValueError(
                "optimizer gd already accumulates over the whole training set; leave "
                "trainer.accumulate_grad_batches at 1"
            )
        if self.model.name == "cnn" and size % 4:
            raise ValueError(f"augment.image_size must be a multiple of 4 for the cnn (got {size})")
        for name in ("mean", "std"):
            values = getattr(self.augment, name)
            if values != "auto" and self.data.channels != "auto" and len(values) != self.data.channels:
                raise ValueError(f"augment.{name} has {len(values)} values but data.channels is {self.data.channels}")
        return self


def _check_multilabel(params: PipelineParams) -> None:
    """Refuse (one line) what a multi-label run cannot do: mixup/cutmix and multi-task mix or add one-label
    targets; class_balance and label_smoothing are softmax tools (train.pos_weight weighs the labels); the EMA's
    accuracy is a one-label figure."""
    train = params.train
    refused = {
        "train.mixup_p / train.cutmix_p (they mix one-label targets)": train.mixup_p or train.cutmix_p,
        "multitask (its tasks are extra one-label columns)": params.multitask.mode != "off",
        "train.class_balance loss/sampler (use train.pos_weight: auto)": train.class_balance in ("loss", "sampler"),
        "train.label_smoothing": train.label_smoothing > 0,
        "train.ema_decay": train.ema_decay > 0,
        "optimize.distill (its loss is a softmax over classes)": params.optimize.distill.enabled,
        "optimize.prune (its fine-tuning trains one label per image)": params.optimize.prune.enabled,
    }
    for what, on in refused.items():
        if on:
            raise ValueError(f"data.task multilabel does not support {what}")


def unresolved_fields(params: PipelineParams) -> list[str]:
    """The dotted names of params still set to `auto` among AUTO_FIELDS (empty once a plan resolved them)."""
    return [
        f"{section}.{name}"
        for section, names in AUTO_FIELDS.items()
        for name in names
        if getattr(getattr(params, section), name) == "auto"
    ]


def fill_auto(params: PipelineParams) -> PipelineParams:
    """A copy of params with every `auto` of AUTO_FIELDS (and train.lr) set to the field's own default, i.e. the
    digits recipe: for code that builds components from params without a data set to plan from (benches, unit
    tests). A pipeline run plans instead (components.planning)."""
    sections = {}
    for section, names in {**AUTO_FIELDS, "train": (*AUTO_FIELDS["train"], "lr")}.items():
        current = getattr(params, section)
        fields = type(current).model_fields
        update = {n: fields[n].get_default(call_default_factory=True) for n in names if getattr(current, n) == "auto"}
        sections[section] = current.model_copy(update=update)
    return params.model_copy(update=sections)


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    # Union members (int | "auto") add their type tag to the location: keep the field names only.
    field = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown parameter"
    return f"invalid parameter {field}: {message}" if field else f"invalid parameters: {message}"


def _is_union_tag(part: Any) -> bool:
    names = {"int", "float", "bool", "str"}
    return isinstance(part, str) and ("[" in part or part.startswith("constrained-") or part in names)


def _parse_value(text: str) -> Any:
    """Parse an override value the way YAML would ("3" -> 3, "true" -> True, "[1,2]" -> list); text YAML
    cannot parse (e.g. a cron string "*/15 * * * *", which YAML reads as an alias) stays a string."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a nested dict (a new dict is returned)."""
    import copy

    result = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ParamsError(f"invalid override {item!r}: expected KEY=VALUE, e.g. train.max_epochs=5")
        key, value = item.split("=", 1)
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ParamsError(f"invalid parameter {key}: {part} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return result


def parse_params(raw: dict[str, Any]) -> PipelineParams:
    """Validate a nested dict into PipelineParams; raises ParamsError with one line naming the field."""
    try:
        return PipelineParams.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(err)) from None


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineParams:
    """Read a params YAML (or the defaults when path is None), apply overrides, validate.

    Returns PipelineParams; raises ParamsError (one line naming the field) on any problem.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ParamsError(f"params file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ParamsError(f"invalid YAML in {path}{where}: {getattr(err, 'problem', err)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ParamsError(f"invalid params file {path}: the top level must be a mapping")
        raw = loaded or {}
    return parse_params(apply_overrides(raw, overrides or []))


def params_to_flat_dict(params: BaseModel) -> dict[str, Any]:
    """Flatten params to dotted names ({"train.lr": 0.002, ...}) for MLflow."""
    return _flatten(params.model_dump(mode="json"), "")


def _flatten(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
