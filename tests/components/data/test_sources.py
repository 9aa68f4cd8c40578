"""resolve_source: folders, split folders, CSV manifests, archives, bundled digits, torchvision offline."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.data.sources import resolve_source
from components.errors import DataError
from tests.helpers.network import offline


def _png(path: Path, value: int = 0, size: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8), "L").save(path)
    return path


def _folder(root: Path, classes=("a", "b"), per_class: int = 3) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(root / name / f"{i}.png", value=c * 50 + i)
    return root


def test_image_folder(tmp_path):
    root = _folder(tmp_path / "data")
    _png(root / "a" / "nested" / "deep.PNG")  # nested, upper-case extension
    _png(root / "a" / ".hidden.png")
    _png(root / ".cache" / "x.png")
    (root / "a" / "notes.txt").write_text("not an image")
    _png(root / "loose.png")  # not in a class folder
    items = resolve_source(str(root), tmp_path / "cache").items
    assert [Path(i.path).relative_to(root).as_posix() for i in items] == [
        "a/0.png",
        "a/1.png",
        "a/2.png",
        "a/nested/deep.PNG",
        "b/0.png",
        "b/1.png",
        "b/2.png",
    ]
    assert [i.label for i in items] == ["a"] * 4 + ["b"] * 3
    assert all(Path(i.path).is_absolute() and i.split is None and i.extra_labels == {} for i in items)


def test_split_folders_are_honoured(tmp_path):
    for _split, folder in (("train", "train"), ("val", "Valid"), ("test", "test")):
        _folder(tmp_path / "data" / folder, per_class=2)
    items = resolve_source(str(tmp_path / "data"), tmp_path / "cache").items
    assert sorted({i.split for i in items}) == ["test", "train", "val"]
    assert sorted({i.label for i in items}) == ["a", "b"]
    assert sum(i.split == "val" for i in items) == 4


def test_split_folders_mixed_with_class_folders_refused(tmp_path):
    _folder(tmp_path / "data" / "train")
    _folder(tmp_path / "data", classes=("cat",))
    with pytest.raises(DataError, match="mixes split folders"):
        resolve_source(str(tmp_path / "data"), tmp_path / "cache")


def test_empty_missing_and_unsupported_sources(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        resolve_source(str(tmp_path / "empty"), tmp_path / "cache")
    with pytest.raises(DataError, match="data source not found"):
        resolve_source(str(tmp_path / "missing"), tmp_path / "cache")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported data source"):
        resolve_source(str(tmp_path / "file.json"), tmp_path / "cache")
    with pytest.raises(DataError, match="bundled:digits"):
        resolve_source("bundled:iris", tmp_path / "cache")


def test_csv_manifest_with_extra_labels_and_split(tmp_path):
    root = tmp_path / "data"
    _png(root / "img" / "1.png")
    _png(root / "img" / "2.png", 9)
    absolute = _png(tmp_path / "elsewhere" / "3.png", 7)
    (root / "labels.csv").write_text(
        "path,species,colour,split\n"
        "img/1.png,cat,black,train\n"
        f"img/2.png,dog,white,validation\n"
        f"{absolute},cat,white,\n".replace(",\n", ",test\n")
    )
    items = resolve_source(str(root / "labels.csv"), tmp_path / "cache", label_column="species").items
    by_name = {Path(i.path).name: i for i in items}
    assert by_name["1.png"].label == "cat" and by_name["1.png"].split == "train"
    assert by_name["2.png"].split == "val" and by_name["2.png"].extra_labels == {"colour": "white"}
    assert by_name["3.png"].path == str(absolute) and by_name["3.png"].split == "test"
    assert all(Path(i.path).is_absolute() for i in items)


def test_csv_missing_columns_and_files(tmp_path):
    _png(tmp_path / "1.png")
    (tmp_path / "a.csv").write_text("path,label\n1.png,x\nmissing/2.png,y\n")
    with pytest.raises(DataError) as info:
        resolve_source(str(tmp_path / "a.csv"), tmp_path / "cache")
    message = str(info.value)
    assert "row 2" in message and "missing/2.png" in message and "\n" not in message
    (tmp_path / "b.csv").write_text("path,class\n1.png,x\n")
    with pytest.raises(DataError, match="no 'label' column"):
        resolve_source(str(tmp_path / "b.csv"), tmp_path / "cache")
    (tmp_path / "c.csv").write_text("file,label\n1.png,x\n")
    with pytest.raises(DataError, match="no 'path' column"):
        resolve_source(str(tmp_path / "c.csv"), tmp_path / "cache")
    (tmp_path / "d.csv").write_text("path,label,split\n1.png,x,holdout\n")
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        resolve_source(str(tmp_path / "d.csv"), tmp_path / "cache")


def test_zip_of_image_folder_extracted_once(tmp_path):
    source = _folder(tmp_path / "shapes")
    archive = tmp_path / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted(source.rglob("*.png")):
            zf.write(file, Path("shapes") / file.relative_to(source))  # one wrapping folder
    items = resolve_source(str(archive), tmp_path / "cache").items
    assert len(items) == 6 and sorted({i.label for i in items}) == ["a", "b"]
    extracted = list((tmp_path / "cache" / "extracted").iterdir())
    assert len(extracted) == 1 and len(extracted[0].name) == 16
    mtime = Path(items[0].path).stat().st_mtime_ns
    time.sleep(0.01)
    again = resolve_source(str(archive), tmp_path / "cache").items
    assert [i.path for i in again] == [i.path for i in items]
    assert Path(items[0].path).stat().st_mtime_ns == mtime


def test_tar_gz_of_csv_manifest(tmp_path):
    root = tmp_path / "set"
    _png(root / "x" / "1.png")
    _png(root / "x" / "2.png", 5)
    (root / "manifest.csv").write_text("path,label\nx/1.png,one\nx/2.png,two\n")
    archive = tmp_path / "set.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="set")
    items = resolve_source(str(archive), tmp_path / "cache").items
    assert [i.label for i in items] == ["one", "two"]
    assert all(str(tmp_path / "cache" / "extracted") in i.path for i in items)


@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png", "a/../../evil.png"])
def test_zip_slip_refused(tmp_path, member):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/a.png", b"x")
        zf.writestr(member, b"x")
    with pytest.raises(DataError, match="unsafe archive member"):
        resolve_source(str(archive), tmp_path / "cache")
    assert not (tmp_path / "evil.png").exists()
    assert not list((tmp_path / "cache" / "extracted").glob("*"))  # no half-extracted folder kept


def test_zip_symlink_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("a/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="unsafe archive member 'a/link.png'"):
        resolve_source(str(archive), tmp_path / "cache")


def test_tar_with_dotdot_refused(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        data = b"not really a png"
        info = tarfile.TarInfo("data/../../evil.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="unsafe archive member"):
        resolve_source(str(archive), tmp_path / "cache")
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "cache" / "evil.png").exists()


def test_bundled_digits_materialized_once(tmp_path):
    cache = tmp_path / "cache"
    items = resolve_source("bundled:digits", cache).items
    assert len(items) == 1797
    assert sorted({i.label for i in items}) == [str(d) for d in range(10)]
    first = Path(items[0].path)
    assert first.relative_to(cache / "bundled" / "digits").as_posix() == "0/0000.png"
    with Image.open(first) as image:
        assert image.size == (8, 8) and image.mode == "L"
        pixels = np.asarray(image)
    from sklearn.datasets import load_digits

    expected = np.rint(load_digits().images[0] * 255 / 16)  # 0..16 scaled to 0..255
    assert np.array_equal(pixels, expected)
    mtimes = {i.path: os.stat(i.path).st_mtime_ns for i in items}
    time.sleep(0.01)
    again = resolve_source("bundled:digits", cache).items
    assert {i.path: os.stat(i.path).st_mtime_ns for i in again} == mtimes
    assert not [p for p in (cache / "bundled").iterdir() if p.name != "digits"]  # no temp folder left


def test_torchvision_offline_gives_one_line_error(tmp_path, monkeypatch):
    offline(monkeypatch)
    started = time.monotonic()
    with pytest.raises(DataError) as info:
        resolve_source("torchvision:MNIST", tmp_path / "cache")
    message = str(info.value)
    assert message.startswith("could not download torchvision data set MNIST: ")
    assert message.endswith("(offline? put the images in a folder and pass its path)")
    assert "\n" not in message
    assert time.monotonic() - started < 60


def test_torchvision_unknown_name(tmp_path):
    with pytest.raises(
        DataError, match="supported are torchvision:CIFAR10, torchvision:FashionMNIST, torchvision:MNIST"
    ):
        resolve_source("torchvision:ImageNet", tmp_path / "cache")


def test_relative_cache_dir_gives_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = _folder(tmp_path / "data")
    archive = tmp_path / "data.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(source, arcname="data")
    items = resolve_source("data.tar", Path(".cache")).items
    assert len(items) == 6 and all(Path(i.path).is_absolute() and Path(i.path).is_file() for i in items)


def test_bundled_digits_multitask_derives_parity_and_ge5(tmp_path):
    items = resolve_source("bundled:digits-multitask", tmp_path / "cache").items
    assert len(items) == 1797
    by_label = {item.label: item.extra_labels for item in items}
    assert by_label["4"] == {"parity": "even", "ge5": "no"}
    assert by_label["7"] == {"parity": "odd", "ge5": "yes"}
