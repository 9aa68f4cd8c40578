"""The `visionflow` command line as a user runs it (real subprocesses)."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.helpers.cli import run_visionflow, visionflow_importtime
from tests.helpers.shapes import make_shapes

_visionflow = run_visionflow


def test_invalid_parameter_exits_2_naming_the_field():
    out = _visionflow("run", "--set", "train.max_epochs=0")
    assert out.returncode == 2
    assert "train.max_epochs" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_unknown_parameter_exits_2(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("train:\n  epochs: 3\n")
    out = _visionflow("run", "--params", str(params))
    assert out.returncode == 2
    assert "train.epochs: unknown parameter" in out.stderr
    assert "Traceback" not in out.stderr


def test_invalid_yaml_exits_2(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("train: [unclosed\n")
    out = _visionflow("run", "--params", str(params))
    assert out.returncode == 2 and "invalid YAML" in out.stderr


def test_a_data_source_that_does_not_exist_is_one_line_before_anything_starts(tmp_path):
    """A mistyped data path or bundled name, a flat folder of images (no class folders) or a file that is neither
    a CSV nor an archive: exit 2 with one line, and no Prefect server, training process or MLflow run is started
    for it (it took 15-20 s to say so when ingest was the first to look)."""
    flat = tmp_path / "photos"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "001.png")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a data set\n")
    for path, expected in (
        (tmp_path / "no-such-folder", f"data source not found: {tmp_path / 'no-such-folder'}"),
        ("bundled:digts", "unknown bundled data set 'digts'"),
        (flat, f"no images found in {flat.resolve()}: expected class sub-folders"),
        (notes, f"unsupported data source {notes}: expected a folder"),
    ):
        out = _visionflow(
            "run", "--set", f"data.path={path}", "--set", f"run.output_dir={tmp_path / 'runs'}", cwd=tmp_path
        )
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], out.stderr
        assert "temporary server" not in out.stdout + out.stderr, out.stdout
        assert not (tmp_path / "runs").exists()


def test_validate_data_prints_the_report(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=8)
    out = _visionflow("validate-data", str(data), "--set", f"run.cache_dir={tmp_path / 'cache'}")
    assert out.returncode == 0, out.stderr
    assert "empty.png" in out.stdout and "empty file" in out.stdout
    assert "notes.png" in out.stdout and "not an image" in out.stdout


def test_validate_data_on_a_missing_folder_is_one_line(tmp_path):
    out = _visionflow("validate-data", str(tmp_path / "nope"), "--set", f"run.cache_dir={tmp_path / 'cache'}")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "nope" in out.stderr


def test_evaluate_and_optimize_refuse_a_file_that_is_not_a_checkpoint(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=4)
    text = tmp_path / "notes.ckpt"
    text.write_text("this is a text file, not a checkpoint\n")
    cache = f"run.cache_dir={tmp_path / 'cache'}"
    expected = f"{text} is not a visionflow checkpoint (not a PyTorch file"
    optimize = _visionflow("optimize", "--checkpoint", str(text), "--data", str(data), "--set", cache)
    assert optimize.returncode == 2, optimize.stdout[-2000:] + optimize.stderr[-2000:]
    assert len(optimize.stderr.strip().splitlines()) == 1 and expected in optimize.stderr
    evaluate = _visionflow("evaluate", "--checkpoint", str(text), "--data", str(data), "--set", cache)
    assert evaluate.returncode == 2, evaluate.stdout[-2000:] + evaluate.stderr[-2000:]
    assert [line for line in evaluate.stderr.splitlines() if line.startswith("error:") and expected in line]
    assert "IndexError" not in evaluate.stderr and "KeyError" not in evaluate.stderr


MISTAKES = {  # a mistake, the start of its one line, modules that must not have been imported before it
    "sweep-without-server": (
        ["sweep", "--grid", "train.lr=0.001,0.002", "--mode", "deployment"],
        "error: no visionflow-pipeline/pipeline deployment",
        ("flows.deploy", "flows.retrain"),  # flows.deploy imports every flow: 15 s of a 20 s answer before
    ),
    "tune-parallel-without-server": (
        ["tune", "--space", "space.yaml", "--parallel", "2"],
        "error: --parallel needs the visionflow-pipeline/pipeline deployment",
        ("flows.deploy", "flows.retrain"),
    ),
    "deploy-without-server": (["deploy"], "error: deploy needs a Prefect server", ("flows.deploy", "torch")),
    "explain-without-model": (["explain", "x.png"], "error: give exactly one of --run", ("torch", "mlflow")),
    "optimize-unknown-run": (["optimize", "--from-run", "nope"], "error: no MLflow run nope", ("torch",)),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_a_mistake_is_one_line_before_the_heavy_imports(tmp_path, case):
    args, error, not_imported = MISTAKES[case]
    (tmp_path / "space.yaml").write_text("params:\n  train.lr: {low: 0.001, high: 0.1}\n")
    answer = visionflow_importtime(*args, cwd=tmp_path, drop_env=("PREFECT_API_URL",))
    assert answer.returncode == 2 and len(answer.said) == 1 and answer.said[0].startswith(error), answer.said
    assert not answer.imported & set(not_imported)
