"""ONNX / TorchScript export: one self-contained file, dynamic batch, parity with PyTorch for every family."""

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from components.config import RnnParams, VitParams
from components.models import ModelSpec, build_model
from components.packaging import export as export_module
from components.packaging.export import check_onnx_file, export_onnx, export_torchscript, onnx_parity

# One model per family, through each exporter; torchvision's mobilenet_v3_small also exports with both
# (checked by hand) but takes ~11 s through dynamo, so resnet18 stands for the torchvision family here.
FAMILIES = {
    "cnn": ModelSpec(name="cnn", num_classes=3, image_size=16),
    "gru": ModelSpec(
        name="rnn",
        num_classes=3,
        image_size=16,
        rnn=RnnParams(hidden_size=8, num_layers=1, sequence="patches", patch_size=8),
    ),
    "lstm": ModelSpec(
        name="rnn",
        num_classes=3,
        image_size=16,
        rnn=RnnParams(
            cell="lstm",
            hidden_size=8,
            num_layers=1,
            bidirectional=False,
            pooling="last",
            sequence="patches",
            patch_size=8,
        ),
    ),
    "vit": ModelSpec(name="vit", num_classes=3, image_size=16, vit=VitParams(depth=1, heads=2, width=16)),
    "resnet18": ModelSpec(name="resnet18", num_classes=3, image_size=32),
}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_exports_with_parity_at_batch_1_and_5(family, exporter, tmp_path):
    spec = FAMILIES[family]
    torch.manual_seed(0)
    model = build_model(spec).train()
    path = export_onnx(model, spec, tmp_path / "model.onnx", exporter=exporter)
    assert model.training  # mode restored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no .onnx.data beside it
    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == ["image"] and [o.name for o in graph.graph.output] == ["logits"]
    for batch in (1, 5):
        images = torch.randn(batch, 3, spec.image_size, spec.image_size)
        parity = onnx_parity(model, path, images)
        assert parity["max_abs_logit_diff"] < 1e-4, parity
        assert parity["top1_agreement"] == 1.0


def _broken(*args, **kwargs):
    raise RuntimeError("this exporter cannot export this")


def test_auto_tries_torchscript_first_and_dynamo_when_it_fails(tmp_path, monkeypatch):
    spec = FAMILIES["cnn"]
    model = build_model(spec).eval()
    tried = []
    monkeypatch.setattr(export_module, "_export_dynamo", lambda *args: tried.append("dynamo") or _broken())
    export_onnx(model, spec, tmp_path / "first.onnx")
    assert tried == []  # torchscript answered: dynamo never ran
    monkeypatch.setattr(export_module, "_export_torchscript", _broken)
    with pytest.raises(RuntimeError, match="torchscript: this exporter.*dynamo: this exporter"):
        export_onnx(model, spec, tmp_path / "none.onnx")
    monkeypatch.undo()
    monkeypatch.setattr(export_module, "_export_torchscript", _broken)
    path = export_onnx(model, spec, tmp_path / "m.onnx")
    parity = onnx_parity(model, path, torch.randn(5, 3, 16, 16))
    assert parity["max_abs_logit_diff"] < 1e-4 and parity["top1_agreement"] == 1.0
    with pytest.raises(RuntimeError, match="could not export cnn to ONNX \\(torchscript: "):
        export_onnx(model, spec, tmp_path / "forced.onnx", exporter="torchscript")  # a choice has no fallback


def test_a_forced_exporter_that_fails_is_a_packaging_error_naming_the_param(tmp_path, monkeypatch):
    from components.config import AugmentParams, PackageParams
    from components.errors import PackagingError
    from components.packaging.package import _export
    from components.training.module import Classifier

    spec = FAMILIES["cnn"]
    classifier = Classifier(build_model(spec).eval(), spec, ["a", "b", "c"], AugmentParams(), {})
    monkeypatch.setattr(export_module, "_export_torchscript", _broken)
    with pytest.raises(PackagingError, match="torchscript: this exporter.*package.onnx_exporter=auto tries both"):
        _export(classifier, torch.randn(4, 3, 16, 16), PackageParams(onnx_exporter="torchscript"), tmp_path)


def test_no_exporter_working_is_a_clear_error(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("nope")

    monkeypatch.setattr(export_module, "_export_dynamo", broken)
    monkeypatch.setattr(export_module, "_export_torchscript", broken)
    with pytest.raises(RuntimeError, match="could not export cnn"):
        export_onnx(build_model(FAMILIES["cnn"]), FAMILIES["cnn"], tmp_path / "m.onnx")


def _external_data_model(path, location):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", location
    graph = helper.make_graph(
        [helper.make_node("Add", ["image", "w"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])],
        [weight],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_leaving_the_directory_is_refused(tmp_path, location):
    path = _external_data_model(tmp_path / "evil.onnx", location)
    with pytest.raises(ValueError, match="outside the model directory"):
        check_onnx_file(path)


def test_external_data_inside_the_directory_is_allowed(tmp_path):
    path = _external_data_model(tmp_path / "ok.onnx", "weights.bin")
    assert check_onnx_file(path) == path


def test_torchscript_export_matches(tmp_path):
    spec = FAMILIES["cnn"]
    model = build_model(spec).eval()
    path = export_torchscript(model, spec, tmp_path / "ts" / "model.pt")
    loaded = torch.jit.load(str(path))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_executorch_export_runs_with_parity(tmp_path):
    from components.packaging.export import executorch_parity, export_executorch

    spec = FAMILIES["cnn"]
    torch.manual_seed(0)
    model = build_model(spec).train()
    path = export_executorch(model, spec, tmp_path / "et" / "model.pte")
    assert model.training  # mode restored
    assert path.read_bytes()[4:8] == b"ET12"  # the ExecuTorch flatbuffer identifier
    parity = executorch_parity(model, path, torch.randn(5, 3, spec.image_size, spec.image_size))
    assert parity["max_abs_logit_diff"] < 1e-4 and parity["top1_agreement"] == 1.0 and parity["num_images"] == 5


def test_executorch_export_without_the_package_says_how_to_fix_it(tmp_path, monkeypatch):
    import sys

    from components.errors import VisionflowError
    from components.packaging.export import export_executorch

    monkeypatch.setitem(sys.modules, "executorch.exir", None)  # import of executorch.exir raises ImportError
    spec = FAMILIES["cnn"]
    with pytest.raises(VisionflowError) as info:
        export_executorch(build_model(spec), spec, tmp_path / "model.pte")
    message = str(info.value)
    assert message.startswith("ExecuTorch export not available: cannot import executorch")
    assert f"install executorch==1.5.1 matching torch {torch.__version__}" in message and "and rerun" in message
    assert not (tmp_path / "model.pte").exists()
