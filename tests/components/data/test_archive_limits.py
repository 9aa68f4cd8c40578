"""Archives given as data.path: bombs (zip, tar, gzip) refused under the data.archive_* limits, tar members
judged like zip members (absolute paths, links), nothing left behind on a refusal."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components import safety
from components.config import DataParams
from components.data.ingest import ingest
from components.data.sources import archive_limits, resolve_source
from components.errors import DataError

ZEROS = 20 * 1024**2  # 20 MiB of zeros: deflates to about 20 KiB (a ratio near 1000, like a real bomb)


def _png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, np.uint8), "L").save(buffer, "PNG")
    return buffer.getvalue()


def _good_members() -> dict[str, bytes]:
    return {f"set/{c}/{i}.png": _png_bytes(c_i * 10 + i) for c_i, c in enumerate("ab") for i in range(3)}


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _left_behind(cache: Path) -> list[Path]:
    """Everything under the extraction folder (a refused archive must leave nothing, not even a temp folder)."""
    extracted = cache / "extracted"
    return sorted(extracted.rglob("*")) if extracted.exists() else []


def _limits(**overrides) -> safety.ArchiveLimits:
    return archive_limits(DataParams(**overrides))


BOMB = {**_good_members(), "set/a/zeros.png": b"\0" * ZEROS}


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_bomb_over_max_bytes_refused_nothing_left(tmp_path, kind):
    archive = (_zip if kind == "zip" else _tar)(tmp_path / f"bomb.{kind}", BOMB)
    assert archive.stat().st_size < 200_000
    cache = tmp_path / "cache"
    with pytest.raises(
        DataError, match=r"archive bomb refused: bomb\..* more than 4\.0 MiB \(data.archive_max_bytes\)"
    ):
        resolve_source(str(archive), cache, limits=_limits(archive_max_bytes=4 * 1024**2))
    assert _left_behind(cache) == []


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_bomb_over_max_ratio_refused_by_default(tmp_path, kind):
    """With the default limits (16 GiB, ratio 200) a 20 KiB archive expanding to 20 MiB is a bomb."""
    archive = (_zip if kind == "zip" else _tar)(tmp_path / f"bomb.{kind}", BOMB)
    cache = tmp_path / "cache"
    data = DataParams(path=str(archive))
    with pytest.raises(
        DataError, match=r"archive bomb refused: .* \(more than 200 times its size\) \(data.archive_max_ratio\)"
    ):
        ingest(data, tmp_path / "snapshot", cache)
    assert _left_behind(cache) == []
    # The same archive is accepted once the user raises the limit on purpose.
    items = resolve_source(str(archive), cache, limits=_limits(archive_max_ratio=0)).items
    assert len(items) == 7


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_too_many_members_refused(tmp_path, kind):
    members = {f"set/{'ab'[i % 2]}/{i}.png": _png_bytes(i) for i in range(30)}
    archive = _zip(tmp_path / "many.zip", members) if kind == "zip" else _tar(tmp_path / "many.tar", members, "w")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"holds more than 20 members \(data.archive_max_members\)"):
        resolve_source(str(archive), cache, limits=_limits(archive_max_members=20))
    assert _left_behind(cache) == []
    assert len(resolve_source(str(archive), cache, limits=_limits(archive_max_members=30)).items) == 30


def _declare_size(data: bytearray, name: bytes, size: int) -> None:
    """Patch the uncompressed size of member `name` in its local header and its central directory entry."""
    # (signature, offset of the size, offset of the name length, offset of the name)
    for signature, at_size, at_length, at_name in ((b"PK\x03\x04", 22, 26, 30), (b"PK\x01\x02", 24, 28, 46)):
        start = data.find(signature)
        while start >= 0:
            length = struct.unpack("<H", data[start + at_length : start + at_length + 2])[0]
            if data[start + at_name : start + at_name + length] == name:
                data[start + at_size : start + at_size + 4] = struct.pack("<I", size)
            start = data.find(signature, start + 4)


def test_zip_member_whose_header_lies_about_its_size(tmp_path):
    """The headers say 1000 bytes; the data inflate to 20 MiB: refused, nothing kept (never more than declared)."""
    data = bytearray(_zip(tmp_path / "honest.zip", BOMB).read_bytes())
    _declare_size(data, b"set/a/zeros.png", 1000)
    archive = tmp_path / "liar.zip"
    archive.write_bytes(bytes(data))
    with zipfile.ZipFile(archive) as zf:
        assert zf.getinfo("set/a/zeros.png").file_size == 1000  # what the header claims
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"liar\.zip.*nothing was kept"):
        resolve_source(str(archive), cache)
    assert _left_behind(cache) == []


@pytest.mark.parametrize("member", ["/abs/evil.png", "C:/evil.png"])
def test_tar_absolute_member_refused_like_zip(tmp_path, member):
    for kind in ("tar", "zip"):
        members = {**_good_members(), member: b"x"}
        archive = _tar(tmp_path / "evil.tar", members, "w") if kind == "tar" else _zip(tmp_path / "evil.zip", members)
        cache = tmp_path / f"cache-{kind}"
        with pytest.raises(DataError, match=rf"unsafe archive member '{member}' in .*evil\.{kind} \(absolute path\)"):
            resolve_source(str(archive), cache)
        assert _left_behind(cache) == []
    assert not Path("/abs/evil.png").exists()


@pytest.mark.parametrize("link_type", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tar_links_refused_like_zip(tmp_path, link_type):
    """A link inside the archive folder was extracted by the "data" filter; links are refused in both formats."""
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in _good_members().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("set/a/alias.png")
        link.type = link_type
        link.linkname = "set/b/0.png" if link_type == tarfile.LNKTYPE else "../b/0.png"
        tf.addfile(link)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"unsafe archive member 'set/a/alias.png' .*\(link\)"):
        resolve_source(str(archive), cache)
    assert _left_behind(cache) == []


def test_member_rule_is_one_rule_for_both_formats():
    assert safety.member_problem("a/b.png", "file") is None
    assert safety.member_problem("/a.png", "file") == safety.member_problem("\\a.png", "file") == safety.ABSOLUTE
    assert (
        safety.member_problem("a/../../b.png", "file") == safety.member_problem("a\\..\\b", "file") == safety.TRAVERSAL
    )
    assert safety.member_problem("a/b.png", "link") == safety.LINK
    assert safety.member_problem("a/null", "special") == safety.SPECIAL
