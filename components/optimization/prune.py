"""Pruning: structured channel pruning with torch-pruning, unstructured magnitude pruning with
torch.nn.utils.prune, and saving / loading pruned networks without pickling whole modules."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

from components.models.multitask import CrossStitch

IMPORTANCES = ("l1", "l2", "random")
# torch-pruning's dependency search can loop for a very long time on graphs it does not
# understand (cross-stitch mixing, say); it is stopped after this many seconds where possible.
TRACE_TIME_LIMIT_S = 120


@contextmanager
def _time_limit(seconds: int):
    """Raise TimeoutError in the block after `seconds` (main thread on Unix only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"gave up after {seconds} s of dependency tracing")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _importance(name: str):
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "random":
        return tp.importance.RandomImportance()
    raise ValueError(f"pruning importance {name!r} is not one of {', '.join(IMPORTANCES)}")


def output_heads(model: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """The classifier heads of `model`: every nn.Linear whose output feeds no other module in a
    forward pass on `example_input` (so each task head of a multi-task network), plus the last
    nn.Linear in module order. Returns them in module order (empty when there is no nn.Linear)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    outputs: dict[int, nn.Module] = {}
    consumed: set[int] = set()
    keep_alive: list[torch.Tensor] = []  # stops tensor ids from being reused during the pass

    def hook(module, inputs, output):
        for value in inputs:
            if isinstance(value, torch.Tensor):
                consumed.add(id(value))
                keep_alive.append(value)
        if isinstance(module, nn.Linear) and isinstance(output, torch.Tensor):
            outputs[id(output)] = module
            keep_alive.append(output)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    heads = {id(m) for key, m in outputs.items() if key not in consumed}
    if linears:
        heads.add(id(linears[-1]))
    return [m for m in linears if id(m) in heads]


def count_macs_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass on `example_input` and the parameter count
    (torch_pruning.utils.count_ops_and_params). Returns (macs, params)."""
    was_training = model.training
    try:
        macs, params = tp.utils.count_ops_and_params(model.eval(), example_input)
    finally:
        model.train(was_training)
    return int(macs), int(params)


def prune_structured(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float,
    importance: str = "l2",
    global_pruning: bool = False,
    ignore_layers: list[nn.Module] | None = None,
) -> dict[str, int]:
    """Remove `ratio` of the channels of `model` in place with torch-pruning.

    Takes the network, an example input batch (N, C, S, S) used to trace it, the fraction of
    channels to remove in (0, 1), the channel importance ("l1" or "l2" weight magnitude of the
    coupled group, or "random"), whether channels are ranked across layers (global) or within
    each layer, and extra layers never to prune. Classifier heads (see `output_heads`) are never
    pruned, so the outputs keep their meaning. Returns {"params_before", "params_after",
    "macs_before", "macs_after"}. The pruned network needs fine-tuning to recover accuracy.

    Raises ValueError for a ratio outside (0, 1), an unknown importance, or a network
    torch-pruning cannot trace or prune: a cross-stitch network, one whose tracing fails or runs
    past TRACE_TIME_LIMIT_S (enforced in the main thread), or one left with nothing pruned
    (recurrent networks). The model may then be partly pruned: pass a copy.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
    scorer = _importance(importance)
    if any(isinstance(m, CrossStitch) for m in model.modules()):
        raise ValueError(
            "torch-pruning cannot prune a cross-stitch multi-task network (multitask.mode shared_features): "
            "its learned task mixing couples every channel of every task"
        )
    ignored = [*output_heads(model, example_input), *(ignore_layers or [])]
    macs_before, params_before = count_macs_params(model, example_input)
    was_training = model.training
    model.eval()
    try:
        with _time_limit(TRACE_TIME_LIMIT_S):
            pruner = tp.pruner.MetaPruner(
                model,
                example_input,
                importance=scorer,
                pruning_ratio=ratio,
                global_pruning=global_pruning,
                ignored_layers=ignored,
            )
            pruner.step()
        with torch.no_grad():
            model(example_input)
    except Exception as err:  # torch-pruning raises many kinds of errors on graphs it cannot handle
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"torch-pruning cannot prune {type(model).__name__}: {reason}") from err
    finally:
        model.train(was_training)
    macs_after, params_after = count_macs_params(model, example_input)
    if params_after >= params_before:
        raise ValueError(
            f"torch-pruning found no prunable channels in {type(model).__name__} "
            "(recurrent layers and classifier heads are not pruned)"
        )
    return {
        "params_before": params_before,
        "params_after": params_after,
        "macs_before": macs_before,
        "macs_after": macs_after,
    }


_PLAIN = (int, float, bool, str, type(None))


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, _PLAIN) for v in value)
    return isinstance(value, _PLAIN)


def save_pruned(model: nn.Module, path: Path) -> Path:
    """Save a (pruned) network so that `load_pruned` can rebuild its shapes: its state_dict
    tensors plus, per module, the plain layer attributes torch_pruning.state_dict records
    (channel and feature counts, groups, ...). torch_pruning.state_dict itself keeps each
    module's whole __dict__ (child modules, hooks), which only a pickle load could read; this
    file holds tensors and plain values only, so it loads with torch.load(weights_only=True).
    Takes the network and the output path (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    attributes = {
        name: {key: value for key, value in attrs.items() if _plain(value)}
        for name, attrs in tp.state_dict(model)["attributions"].items()
    }
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    torch.save({"format": "visionflow-pruned/1", "state_dict": state, "attributes": attributes}, path)
    return path


def load_pruned(model_template: nn.Module, path: Path) -> nn.Module:
    """Load a file written by `save_pruned` into `model_template`, a freshly built unpruned network
    of the same architecture (build_model(spec)): torch_pruning.load_state_dict sets the pruned
    layer attributes and parameter shapes, then the weights are copied in (strict). Loads with
    torch.load(weights_only=True). Returns the network (the template itself, reshaped).
    Raises ValueError when the file is not a save_pruned file."""
    saved = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != "visionflow-pruned/1":
        raise ValueError(f"{path} is not a pruned model saved by save_pruned")
    state = saved["state_dict"]
    full_state: dict[str, dict] = {}
    for name, module in model_template.named_modules():
        prefix = f"{name}." if name else ""
        parameters = {
            key: None
            if value is None or prefix + key not in state
            else nn.Parameter(state[prefix + key].clone(), requires_grad=value.requires_grad)
            for key, value in module._parameters.items()
        }
        buffers = {
            key: state[prefix + key].clone() if value is not None and prefix + key in state else value
            for key, value in module._buffers.items()
        }
        full_state[name] = {"_parameters": parameters, "_buffers": buffers}
    tp.load_state_dict(model_template, {"full_state_dict": full_state, "attributions": saved["attributes"]})
    for module in model_template.modules():
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()
    model_template.load_state_dict(state, strict=True)
    return model_template


def prune_unstructured(model: nn.Module, amount: float) -> float:
    """Global unstructured magnitude pruning: zero the `amount` fraction (in [0, 1)) of smallest
    |weight| over all Conv and Linear weights of `model` together (torch.nn.utils.prune.
    global_unstructured with L1Unstructured), made permanent with prune.remove.

    Returns the achieved sparsity: the fraction of those weights that are zero. The tensors keep
    their dense shapes, so file size, parameter count and latency on dense kernels (onnxruntime,
    PyTorch) do not improve: this variant does not get faster, it only shows how many weights
    the model can lose. Raises ValueError for an amount outside [0, 1).
    """
    if not 0 <= amount < 1:
        raise ValueError(f"unstructured pruning amount must be in [0, 1), got {amount}")
    targets = [
        (module, "weight")
        for module in model.modules()
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and module.weight is not None
    ]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no Conv or Linear weights to prune")
    if amount > 0:
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
        for module, name in targets:
            prune.remove(module, name)
    total = sum(module.weight.numel() for module, _ in targets)
    zeros = sum(int((module.weight == 0).sum()) for module, _ in targets)
    return zeros / total
