"""Structured pruning (torch-pruning), save/load of pruned shapes, unstructured magnitude pruning."""

import pytest
import torch
from torch import nn

from components.config import RnnParams
from components.models import ModelSpec, build_model
from components.optimization.prune import (
    load_pruned,
    output_heads,
    prune_structured,
    prune_unstructured,
    save_pruned,
)
from components.packaging.export import export_onnx, onnx_parity
from tests.helpers.tiny import SPEC, tiny_data, trained_cnn, trained_cnn_onnx

CNN = ModelSpec(name="cnn", num_classes=3, image_size=16)


def _x(spec, n=2):
    return torch.randn(
        n, spec.in_channels, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0)
    )


@pytest.mark.parametrize("importance,global_pruning", [("l2", False), ("l1", True), ("random", False)])
def test_structured_pruning_reduces_params_and_macs_and_keeps_the_classifier(importance, global_pruning):
    model = build_model(CNN)
    counts = prune_structured(model, _x(CNN), 0.5, importance, global_pruning)
    assert counts["params_after"] < 0.5 * counts["params_before"]
    assert counts["macs_after"] < 0.5 * counts["macs_before"]
    assert counts["params_after"] == sum(p.numel() for p in model.parameters())
    assert model[-1].out_features == 3 and model(_x(CNN, 4)).shape == (4, 3)


def test_pruned_cnn_exports_to_onnx_with_parity(tmp_path):
    model = trained_cnn()
    x = tiny_data(5)[0]
    counts = prune_structured(model, x, 0.5)
    onnx_path = export_onnx(model, SPEC, tmp_path / "pruned.onnx")
    parity = onnx_parity(model, onnx_path, x)
    assert parity["max_abs_logit_diff"] < 1e-4 and parity["top1_agreement"] == 1.0
    assert onnx_path.stat().st_size < 0.5 * trained_cnn_onnx().stat().st_size
    assert counts["params_after"] * 4 * 0.9 < onnx_path.stat().st_size


def test_pruned_resnet_round_trips_with_identical_outputs(tmp_path):
    spec = ModelSpec(name="resnet18", num_classes=3, image_size=32)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    counts = prune_structured(model, _x(spec), 0.5)
    assert counts["macs_after"] * 2 < counts["macs_before"]
    path = save_pruned(model, tmp_path / "state" / "pruned.pth")
    torch.load(path, weights_only=True)  # tensors and plain values only
    loaded = load_pruned(build_model(spec), path).eval()
    assert sum(p.numel() for p in loaded.parameters()) == counts["params_after"]
    x = _x(spec, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_pruned_refuses_other_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a pruned model"):
        load_pruned(build_model(CNN), tmp_path / "other.pth")


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1])
def test_ratio_outside_open_unit_interval_is_refused(ratio):
    with pytest.raises(ValueError, match="pruning ratio"):
        prune_structured(build_model(CNN), _x(CNN), ratio)


def test_unknown_importance_is_refused():
    with pytest.raises(ValueError, match="importance"):
        prune_structured(build_model(CNN), _x(CNN), 0.5, importance="hessian")


def test_multitask_heads_are_all_kept():
    spec = CNN.model_copy(update={"multitask_mode": "shared_weights", "extra_tasks": {"shape": 2}})
    model = build_model(spec)
    assert [h.out_features for h in output_heads(model, _x(spec))] == [3, 2]
    prune_structured(model, _x(spec), 0.5)
    assert [h.out_features for h in model.heads] == [3, 2] and model(_x(spec)).shape == (2, 5)


def test_models_torch_pruning_cannot_handle_are_clear_errors():
    rnn = ModelSpec(name="rnn", num_classes=3, image_size=16, rnn=RnnParams(hidden_size=8, num_layers=1))
    with pytest.raises(ValueError, match="torch-pruning found no prunable channels"):
        prune_structured(build_model(rnn), _x(rnn), 0.5)
    stitched = CNN.model_copy(update={"multitask_mode": "shared_features", "extra_tasks": {"shape": 2}})
    with pytest.raises(ValueError, match="cross-stitch"):
        prune_structured(build_model(stitched), _x(stitched), 0.5)


def test_untraceable_forward_is_a_value_error():
    class LeavesTheGraph(nn.Module):
        """Runs under no_grad, but its forward goes through numpy, which torch-pruning's traced pass cannot follow."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            pooled = torch.from_numpy(self.conv(x).mean((2, 3)).numpy())
            return self.fc(pooled)

    with pytest.raises(ValueError, match="torch-pruning cannot prune LeavesTheGraph"):
        prune_structured(LeavesTheGraph(), torch.randn(2, 3, 8, 8), 0.5)


@pytest.mark.parametrize("amount", [0.3, 0.7])
def test_unstructured_sparsity_matches_the_amount(amount):
    model = build_model(CNN)
    sparsity = prune_unstructured(model, amount)
    assert sparsity == pytest.approx(amount, abs=0.01)
    assert not any(hasattr(m, "weight_orig") for m in model.modules())  # made permanent
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(sparsity)


def test_unstructured_amount_out_of_range():
    with pytest.raises(ValueError, match="amount"):
        prune_unstructured(build_model(CNN), 1.0)
