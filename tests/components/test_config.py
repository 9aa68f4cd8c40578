"""Parameters: YAML + overrides → PipelineParams, one-line errors naming the field."""

from pathlib import Path

import pytest

from components.config import ParamsError, PipelineParams, load_params, params_to_flat_dict

PARAMS_DIR = Path(__file__).resolve().parents[2] / "params"


# params/space*.yaml are search spaces for `visionflow tune` (checked in the tuning tests), not params files.
PARAMS_FILES = sorted(p for p in PARAMS_DIR.glob("*.yaml") if not p.name.startswith("space"))


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.name)
def test_shipped_params_files_are_valid(path):
    assert isinstance(load_params(path), PipelineParams)


def test_overrides_are_parsed_like_yaml():
    p = load_params(
        None,
        [
            "train.max_epochs=3",
            "train.lr=1e-3",
            "model.pretrained=true",
            "data.channels=1",
            "augment.mean=[0.1]",
            "augment.std=[0.2]",
        ],
    )
    assert p.train.max_epochs == 3 and p.train.lr == 1e-3 and p.model.pretrained is True
    assert p.augment.mean == [0.1]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_epochs=0", "invalid parameter train.max_epochs: Input should be greater than or equal to 1"),
        ("train.epochs=3", "invalid parameter train.epochs: unknown parameter"),
        ("model.name=vgg", "invalid parameter model.name:"),
        (
            "data.val_fraction=0.45 data.test_fraction=0.4",
            "invalid parameter data: val_fraction + test_fraction must leave",
        ),
        (
            "data.channels=1 augment.mean=[0.5,0.5,0.5]",
            "invalid parameters: augment.mean has 3 values but data.channels is 1",
        ),
        ("model.name=vit augment.image_size=30", "invalid parameters: model.vit.patch_size 4 does not divide"),
        ("model.name=vit model.vit.heads=3", "invalid parameter model: vit.heads (3) must divide vit.width (128)"),
        ("train", "expected KEY=VALUE"),
    ],
)
def test_invalid_values_name_the_field(override, message):
    with pytest.raises(ParamsError) as info:
        load_params(None, override.split(" "))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        load_params(bad)


def test_flat_dict_uses_dotted_names():
    flat = params_to_flat_dict(PipelineParams())
    assert flat["train.max_epochs"] == "auto" and flat["data.path"] == "bundled:digits"  # the plan decides it
    assert all("." in key for key in flat)


def test_every_field_has_a_description():
    """The Prefect UI renders these as the form's help text."""
    schema = PipelineParams.model_json_schema()
    for name, definition in schema["$defs"].items():
        for field, spec in definition["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no description"


@pytest.mark.parametrize("path", sorted(PARAMS_DIR.glob("space*.yaml")), ids=lambda p: p.name)
def test_shipped_search_spaces_are_valid(path):
    from components.tuning.space import load_space

    space = load_space(path)
    assert space.params, f"{path.name} searches nothing"
