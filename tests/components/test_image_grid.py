"""The picture grids (misclassified test images, explanations, suspicious labels): one canvas at the PNG's pixel
size, the pictures pasted without resampling, captions coloured, an unreadable picture said so."""

import numpy as np
from PIL import Image

from components.image_grid import CELL_PX, Cell, image_grid, overlay


def test_overlay_blends_the_jet_map_over_a_grey_picture():
    grey = np.full((4, 4, 1), 100, dtype=np.uint8)
    assert overlay(grey, None).tolist() == np.full((4, 4, 3), 100).tolist()
    hot = overlay(grey, np.ones((4, 4)))  # jet(1.0) is dark red (0.5, 0, 0)
    assert hot[0, 0].tolist() == [round(100 * 0.55 + 127.5 * 0.45), 55, 55]


def test_a_grid_pastes_pictures_as_they_are_and_colours_captions(tmp_path):
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (CELL_PX, CELL_PX, 3), dtype=np.uint8)  # already a cell's size: pasted as is
    cells = [Cell(picture, "cat → cat (0.90)"), Cell(None, "cat → dog (0.80)", "tab:red")]
    with Image.open(image_grid(cells, tmp_path / "grid.png", "Mistakes")) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    height, width = pixels.shape[:2]
    assert width == 2 * (CELL_PX + 12)
    assert pixels[height - 6 - CELL_PX : height - 6, 6 : 6 + CELL_PX].tolist() == picture.tolist()
    caption = slice(height - 6 - CELL_PX - 16, height - 6 - CELL_PX)
    left, right = pixels[caption, : CELL_PX + 12], pixels[caption, CELL_PX + 12 :]
    red = lambda part: ((part[..., 0] - part[..., 2]) > 80).sum()  # noqa: E731
    assert red(right) > 10 and red(left) == 0  # the mistake's caption in red, the other in black
    unreadable = pixels[height - 6 - CELL_PX : height - 6, CELL_PX + 18 : 2 * CELL_PX + 18]
    assert (unreadable < 128).any() and (unreadable == 255).mean() > 0.9  # a few letters on white, no picture
