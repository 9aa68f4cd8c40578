"""load_image / probe_image on a corpus of broken and unusual files."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
from PIL import Image

from components.data.images import load_image, probe_image
from components.errors import DataError, ImageDecodeError
from tests.helpers.bad_images import DEFAULT_MAX_PIXELS, make_bad_corpus


@pytest.fixture
def corpus(tmp_path):
    return make_bad_corpus(tmp_path / "corpus")


def _digest_all(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_bad_files_raise_with_exact_reasons(corpus):
    for name, reason in corpus.bad.items():
        with pytest.raises(ImageDecodeError) as info:
            load_image(corpus.path(name), 3, DEFAULT_MAX_PIXELS)
        assert info.value.reason == reason, name
        assert info.value.path == str(corpus.path(name))
        assert isinstance(info.value, DataError)


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        load_image(tmp_path / "nope.png", 3, DEFAULT_MAX_PIXELS)
    assert info.value.reason == "file not found"


def test_a_folder_is_called_a_folder(tmp_path):
    (tmp_path / "cats.png").mkdir()
    with pytest.raises(ImageDecodeError) as info:
        load_image(tmp_path / "cats.png", 3, DEFAULT_MAX_PIXELS)
    assert info.value.reason == "a folder, not an image file"


def test_pixel_limit_is_checked_before_decoding_without_pil_warnings(corpus):
    with warnings.catch_warnings(record=True) as caught:
        for name in ("huge_header.png", "bomb_header.png"):
            with pytest.raises(ImageDecodeError, match="too many pixels"):
                load_image(corpus.path(name), 1, DEFAULT_MAX_PIXELS)
            assert probe_image(corpus.path(name)) is not None
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. python -W error: PIL's warning becomes an exception
        for name in ("huge_header.png", "bomb_header.png"):
            with pytest.raises(ImageDecodeError, match="too many pixels"):
                load_image(corpus.path(name), 1, DEFAULT_MAX_PIXELS)
        assert probe_image(corpus.path("huge_header.png")) == (10000, 10000, "L")
    # a small real image over a small limit
    with pytest.raises(ImageDecodeError) as info:
        load_image(corpus.path("cmyk.jpg"), 3, 100)
    assert info.value.reason == "too many pixels (20×10 = 200 > max_pixels 100)"


def test_pil_own_bomb_limit_does_not_override_a_larger_max_pixels(corpus):
    # 20000x20000 is over PIL's own error limit; with a larger max_pixels PIL must not be the one refusing
    with pytest.raises(ImageDecodeError) as info:
        load_image(corpus.path("bomb_header.png"), 1, 10**9)
    assert "too many pixels" not in info.value.reason
    assert Image.MAX_IMAGE_PIXELS is not None  # the global limit is restored


@pytest.mark.parametrize("channels", [1, 3])
def test_good_but_unusual_files_load_with_right_shape(corpus, channels):
    for name, (height, width) in corpus.good.items():
        array = load_image(corpus.path(name), channels, DEFAULT_MAX_PIXELS)
        assert array.shape == (height, width, channels), name
        assert array.dtype == np.uint8


def test_cmyk_becomes_rgb_red(corpus):
    array = load_image(corpus.path("cmyk.jpg"), 3, DEFAULT_MAX_PIXELS).astype(int)
    assert (np.abs(array - [255, 0, 0]) < 16).all()


def test_16_bit_png_scaled_over_its_range(corpus):
    array = load_image(corpus.path("gradient16.png"), 1, DEFAULT_MAX_PIXELS)[..., 0]
    row = array[0].astype(int)
    assert row.min() == 0 and row.max() == 255  # not all white
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 32  # a gradient survives


def test_rgba_composited_on_white(corpus):
    array = load_image(corpus.path("rgba.png"), 3, DEFAULT_MAX_PIXELS)
    assert (array[:, :8] == 255).all()  # transparent -> white
    assert (array[:, 8:] == [255, 0, 0]).all()


def test_palette_expanded(corpus):
    array = load_image(corpus.path("palette.png"), 3, DEFAULT_MAX_PIXELS)
    assert (array[:, :6] == [0, 0, 255]).all() and (array[:, 6:] == [0, 255, 0]).all()


def test_palette_with_transparency_composited(tmp_path):
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * (256 * 3 - 6))
    image.paste(1, (2, 0, 4, 2))
    image.save(tmp_path / "ptrans.png", transparency=0)
    array = load_image(tmp_path / "ptrans.png", 3, DEFAULT_MAX_PIXELS)
    assert (array[:, :2] == 255).all() and (array[:, 2:] == [200, 10, 10]).all()


def test_exif_orientation_applied(corpus):
    path = corpus.path("exif_rotated.jpg")
    with Image.open(path) as raw:
        stored = np.array(raw.convert("RGB"))
    assert stored.shape == (20, 40, 3)
    loaded = load_image(path, 3, DEFAULT_MAX_PIXELS)
    assert loaded.shape == (40, 20, 3)  # height and width swapped
    assert np.array_equal(loaded, np.rot90(stored, k=-1))  # orientation 6 = rotate 90° clockwise


def test_other_modes(tmp_path):
    cases = {
        "la.png": Image.fromarray(np.dstack([np.full((3, 5), 10, np.uint8), np.zeros((3, 5), np.uint8)]), "LA"),
        "i32.tif": Image.fromarray(np.arange(15, dtype=np.int32).reshape(3, 5) * 1000, "I"),
        "float.tif": Image.fromarray(np.linspace(-1, 1, 15, dtype=np.float32).reshape(3, 5), "F"),
        "const16.png": Image.fromarray(np.full((3, 5), 65535, np.uint16)),
        "ycbcr.jpg": Image.new("RGB", (5, 3), (0, 200, 0)).convert("YCbCr"),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
    assert (load_image(tmp_path / "la.png", 1, 1000) == 255).all()  # fully transparent -> white
    for name in ("i32.tif", "float.tif"):
        values = load_image(tmp_path / name, 1, 1000)
        assert values.min() == 0 and values.max() == 255, name
    assert (load_image(tmp_path / "const16.png", 1, 1000) == 255).all()
    assert load_image(tmp_path / "ycbcr.jpg", 3, 1000)[1, 2, 1] > 150


def test_source_files_are_never_modified(corpus):
    before = _digest_all(corpus.folder)
    for name in [*corpus.bad, *corpus.good]:
        try:
            load_image(corpus.path(name), 3, DEFAULT_MAX_PIXELS)
        except ImageDecodeError:
            pass
    assert _digest_all(corpus.folder) == before


def test_probe_reads_header_only(corpus):
    assert probe_image(corpus.path("bomb_header.png")) == (20000, 20000, "L")
    assert probe_image(corpus.path("gradient16.png")) == (64, 16, "I;16")
    assert probe_image(corpus.path("truncated.jpg")) == (64, 64, "RGB")
    assert probe_image(corpus.path("empty.png")) is None
    assert probe_image(corpus.path("text.png")) is None
    assert probe_image(corpus.folder / "missing.png") is None
