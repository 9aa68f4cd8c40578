"""Suspicious labels: labels flipped on purpose rank at the top of the area-under-the-margin ranking."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import lightning as L
import torch

from components import tracking
from components.data.ingest import read_manifest
from components.training.fit import fit
from components.training.margins import MarginRecorder, batch_margins
from tests.helpers.params import planned_fit_spec
from tests.helpers.shapes import CLASSES, make_shapes

FLIPPED = 5


def _flip_train_labels(manifest: Path, count: int, seed: int = 3) -> set[str]:
    """Give `count` train rows of the manifest another class (a copy's labels only; no image changes)."""
    rows = read_manifest(str(manifest))
    train = [row for row in rows if row["split"] == "train"]
    rng = random.Random(seed)
    flipped = rng.sample(train, count)
    for row in flipped:
        row["label"] = rng.choice([c for c in CLASSES if c != row["label"]])
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {row["path"] for row in flipped}


def test_flipped_labels_rank_first_and_reach_mlflow(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=24, size=16, bad_files=False, seed=5)
    spec = planned_fit_spec(
        tmp_path, data, train__max_epochs=5, train__num_workers=0, train__suspicious_top_k=2 * FLIPPED
    )
    flipped = _flip_train_labels(Path(spec.manifest_path), FLIPPED)
    result = fit(spec)
    found = result.suspicious_labels
    assert found is not None and Path(found.csv).is_file() and Path(found.grid).is_file()
    ranked = list(csv.DictReader(Path(found.csv).read_text().splitlines()))
    assert len(ranked) == 2 * FLIPPED and [r["rank"] for r in ranked[:2]] == ["1", "2"]
    top = [row["path"] for row in ranked[:FLIPPED]]
    # A random order of the ~50 train rows puts 0.5 of the 5 flipped ones in its top 5; AUM must find nearly all.
    assert len(flipped & set(top)) >= FLIPPED - 1, (flipped, ranked)
    assert all(row["likely_label"] != row["given_label"] for row in ranked[:FLIPPED] if row["path"] in flipped)
    assert found.flagged >= FLIPPED - 1
    artifacts = tracking.client().list_artifacts(spec.mlflow_run_id, "suspicious_labels")
    assert {Path(a.path).name for a in artifacts} == {"suspicious_labels.csv", "suspicious_labels.png"}


def test_margins_of_mixed_batches_are_skipped_and_averaged_over_visits():
    """Rows 1 and 3 are seen in two epochs (a mixed batch, without logits, in between counts for nothing)."""
    recorder = MarginRecorder(4)
    trainer, module = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False), L.LightningModule()
    recorder.on_train_start(trainer, module)
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]])
    margin, other = batch_margins(logits, torch.tensor([0, 0]))
    assert margin.tolist() == [1.0, -3.0] and other.tolist() == [2, 1]
    batch = (None, torch.tensor([0, 0]), torch.tensor([1, 3]))
    recorder.on_train_epoch_start(trainer, module)
    recorder.on_train_batch_end(None, None, {"loss": torch.tensor(0.0)}, batch, 0)  # mixed: no logits
    recorder.on_train_batch_end(None, None, {"loss": torch.tensor(0.0), "logits": logits}, batch, 0)
    recorder.on_validation_epoch_start(trainer, module)  # the epoch's sums join the totals before its checkpoints
    recorder.on_train_epoch_end(trainer, module)  # once per epoch
    recorder.on_train_epoch_start(trainer, module)
    recorder.on_train_batch_end(None, None, {"loss": torch.tensor(0.0), "logits": logits * 3}, batch, 1)
    recorder.on_train_epoch_end(trainer, module)  # an epoch without validation
    assert recorder.ranking() == [(3, -6.0, 1, 2, -9.0), (1, 2.0, 2, 2, 3.0)]  # last: the second epoch's margin
    assert recorder.ranking()[0].flagged and not recorder.ranking()[1].flagged


def test_the_grid_shrinks_large_pictures_and_enlarges_small_ones(tmp_path):
    """A 12-megapixel photo is shrunk to a cell as it is read (a canvas of full-size photos would take gigabytes); an
    8×8 grey digit is enlarged to the cell pixel by pixel, so its pixels stay sharp."""
    import numpy as np
    from PIL import Image

    from components.image_grid import CELL_PX, fit_to_cell
    from components.training.margins import suspicious_grid

    photo = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    assert fit_to_cell(photo).shape == (128, CELL_PX, 3)  # 4000 → 171 wide, 3000 → 128 high: the aspect kept
    digit = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    enlarged = fit_to_cell(digit)
    assert enlarged.shape == (CELL_PX, CELL_PX, 1)
    assert set(np.unique(enlarged)) == set(range(64))  # nearest neighbour: no blended values
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(digit[..., 0]).save(tmp_path / "digit.png")
    cells = [(str(tmp_path / "photo.png"), "cat", "dog", -0.5), (str(tmp_path / "digit.png"), "3", "8", 0.1)]
    grid = suspicious_grid(cells, tmp_path / "grid.png", 3, 10**8)
    with Image.open(grid) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[1] == 2 * (CELL_PX + 12)  # two cells side by side, each the picture and its margins
    digit_cell = pixels[-CELL_PX - 6 : -6, CELL_PX + 12 + 6 : 2 * CELL_PX + 12 + 6]
    assert digit_cell[..., 0].tolist() == enlarged[..., 0].tolist()  # pasted without resampling


def test_a_picture_gone_since_training_is_an_unreadable_cell_not_a_failed_training(tmp_path):
    """The ranking's grid is drawn after the last epoch: a training image deleted or damaged in the meantime leaves
    its cell blank but for "unreadable" (as the misclassified grid does), where it used to fail the train stage."""
    import numpy as np
    from PIL import Image

    from components.image_grid import CELL_PX
    from components.training.margins import suspicious_grid

    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "digit.png")
    (tmp_path / "damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image any more")
    cells = [(str(tmp_path / p), "3", "8", -0.2) for p in ("digit.png", "gone.png", "damaged.png")]
    grid = suspicious_grid(cells, tmp_path / "grid.png", 1, 10**8)
    with Image.open(grid) as im:
        pixels = np.asarray(im.convert("RGB"))
    height = pixels.shape[0]
    assert (pixels[height - 6 - CELL_PX : height - 6, 6 : 6 + CELL_PX] == 0).all()  # the black digit is drawn
    for column in (1, 2):
        left = column * (CELL_PX + 12) + 6
        cell = pixels[height - 6 - CELL_PX : height - 6, left : left + CELL_PX]
        assert (cell < 128).any() and (cell == 255).mean() > 0.9  # a few letters on white, no picture
