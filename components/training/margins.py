"""Suspicious labels from training dynamics: the area under the margin (AUM, Pleiss et al. 2020).

At every training step the margin of each sample is the logit of its given label minus the largest other logit;
its AUM is the mean margin over the epochs (over every unmixed visit). A sample the network keeps disagreeing with
has a low, often negative AUM: its label is probably wrong. Mixed-up / cutmix batches are left out (their logits
answer a blend of two images and two labels; an extra unmixed forward pass would cost a third of the step), so
with mixup_p = 0.5 each image is scored from about half its epochs.

Under DDP every process records the samples its sampler gave it; the per-epoch sums are all-reduced over the
processes before validation (so every process, and every checkpoint, holds the same totals and a resumed run
keeps the epochs before it). Rank zero writes the ranking: lowest AUM first, and flagged where the last epoch's
margin is below 0 as well (early epochs give hard but right images a negative AUM too; the flag asks that the network
still disagrees at the end). Multi-hot (multi-label) targets have no single given label and are not scored.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from components.data.manifest import ManifestRow
from components.training.spec import SuspiciousLabels

CSV_NAME = "suspicious_labels.csv"
GRID_NAME = "suspicious_labels.png"
GRID_MAX = 64


class Scored(NamedTuple):
    """One training image's record: its row position, AUM, likely class, unmixed visits, last epoch's margin."""

    row: int
    aum: float
    likely: int
    visits: int
    last: float

    @property
    def flagged(self) -> bool:
        """The network disagreed with the label on average and still did in the last epoch that saw the image."""
        return self.aum < 0 and self.last < 0


def batch_margins(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(margin, other class) per row: the given class's logit minus the largest other logit, and that class."""
    logits = logits.float()
    given = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf"))
    top, other = others.max(dim=1)
    return given - top, other


class MarginRecorder(Callback):
    """Records every training sample's margin per step and keeps their sums across epochs (see the module doc).

    Needs train batches that carry the samples' row positions as a third item (ImageDataModule(index_train=True))
    and a training_step that returns the primary logits of unmixed batches as outputs["logits"]; other batches
    (mixed, multi-hot targets) are skipped."""

    def __init__(self, size: int):
        self.size = size
        self.total = torch.zeros(size)
        self.count = torch.zeros(size)
        self.likely = torch.full((size,), -1, dtype=torch.long)  # the largest other class at the last visit
        self.last = torch.zeros(size)  # the mean margin of the last epoch that saw each sample
        self._epoch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._folded = False  # this epoch's sums are in the totals (every process agrees: same hooks, same order)
        self.seconds = 0.0  # spent in this callback's hooks (its cost)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        self.total, self.count, self.likely, self.last = (
            t.to(device) for t in (self.total, self.count, self.likely, self.last)
        )
        self._reset_epoch(device)

    def _reset_epoch(self, device: torch.device) -> None:
        self._epoch = (
            torch.zeros(self.size, device=device),
            torch.zeros(self.size, device=device),
            torch.full((self.size,), -1, dtype=torch.long, device=device),
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._epoch is None or not isinstance(outputs, Mapping) or "logits" not in outputs or len(batch) < 3:
            return
        targets, rows = batch[1], batch[2]
        if targets.is_floating_point():  # multi-hot targets: the margin of one given label is not defined
            return
        start = time.perf_counter()
        if targets.ndim == 2:  # multi-task: the primary task's labels
            targets = targets[:, 0]
        margin, other = batch_margins(outputs["logits"], targets)
        total, count, likely = self._epoch
        total.index_add_(0, rows, margin)
        count.index_add_(0, rows, torch.ones_like(margin))
        likely[rows] = other
        self.seconds += time.perf_counter() - start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._folded = False

    def _fold(self, trainer: L.Trainer) -> None:
        """Add this epoch's sums (all processes together) to the totals, once per epoch: at the start of its
        validation (before the epoch's checkpoints), or at its end without one. Every process runs it at the same
        point: its all-reduces must not meet another collective on another process."""
        if self._epoch is None or self._folded:
            return
        self._folded = True
        start = time.perf_counter()
        total, count, likely = self._epoch
        total = trainer.strategy.reduce(total, reduce_op="sum")
        count = trainer.strategy.reduce(count, reduce_op="sum")
        likely = trainer.strategy.reduce(likely, reduce_op="max")
        self.total += total
        self.count += count
        self.likely = torch.where(likely >= 0, likely, self.likely)
        self.last = torch.where(count > 0, total / count.clamp(min=1), self.last)
        self._reset_epoch(total.device)
        self.seconds += time.perf_counter() - start

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._fold(trainer)  # before the checkpoints of this epoch are written

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fold(trainer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).cpu() for name in ("total", "count", "likely", "last")}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if state_dict.get("total") is not None and len(state_dict["total"]) == self.size:
            for name in ("total", "count", "likely", "last"):
                setattr(self, name, state_dict[name])

    def ranking(self) -> list[Scored]:
        """Every scored sample (seen unmixed at least once), lowest AUM first (ties by row position)."""
        count = self.count.cpu()
        seen = torch.nonzero(count > 0).flatten()
        aum = (self.total.cpu()[seen] / count[seen]).tolist()
        likely, visits = self.likely.cpu()[seen].tolist(), count[seen].long().tolist()
        last = self.last.cpu()[seen].tolist()
        scored = [Scored(int(r), aum[i], likely[i], visits[i], last[i]) for i, r in enumerate(seen.tolist())]
        return sorted(scored, key=lambda s: (s.aum, s.row))


def write_suspicious_labels(
    recorder: MarginRecorder,
    rows: list[ManifestRow],
    classes: list[str],
    out_dir: Path,
    top_k: int,
    channels: int,
    max_pixels: int,
) -> SuspiciousLabels:
    """Write the `top_k` lowest-AUM training rows (`rows`: the train split in the loader's order) to
    out_dir/suspicious_labels.csv (rank, path, given_label, likely_label, score = AUM, last_margin, epochs_seen,
    flagged) and the first 64 of them as a grid; returns the files and counts. Flagged: AUM and the last epoch's
    margin both below 0 (the network disagreed with the label on average and still did at the end)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranked = recorder.ranking()
    top = ranked[:top_k]
    path = out_dir / CSV_NAME
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["rank", "path", "given_label", "likely_label", "score", "last_margin", "epochs_seen", "flagged"]
        )
        for rank, s in enumerate(top, start=1):
            row = rows[s.row]
            likely = classes[s.likely]
            writer.writerow(
                [rank, row["path"], row["label"], likely, f"{s.aum:.4f}", f"{s.last:.4f}", s.visits, s.flagged]
            )
    grid = None
    if top:
        cells = [(rows[s.row]["path"], rows[s.row]["label"], classes[s.likely], s.aum) for s in top[:GRID_MAX]]
        grid = str(suspicious_grid(cells, out_dir / GRID_NAME, channels, max_pixels))
    flagged = sum(1 for s in ranked if s.flagged)
    summary = (
        f"{flagged} of {len(ranked)} training images look mislabelled (area under the margin and last epoch's "
        f"margin below 0): see {CSV_NAME}"
    )
    seconds = recorder.seconds + time.perf_counter() - start
    return SuspiciousLabels(
        csv=str(path),
        grid=grid,
        flagged=flagged,
        scored=len(ranked),
        summary=summary,
        seconds=seconds,
        record_seconds=recorder.seconds,
    )


def suspicious_grid(
    cells: list[tuple[str, str, str, float]], path: Path, channels: int, max_pixels: int, columns: int = 8
) -> Path:
    """A grid of (image path, given label, likely label, AUM) cells, saved as a PNG at `path` (one canvas,
    components/image_grid.py), a negative AUM's caption in red."""
    from components.image_grid import Cell, image_grid, read_picture

    drawn = [
        Cell(
            read_picture(image_path, channels, max_pixels),
            f"given {given}\nlikely {likely}\nAUM {aum:.2f}",
            "C3" if aum < 0 else "black",
        )
        for image_path, given, likely, aum in cells
    ]
    title = "Training images whose label is probably wrong (lowest area under the margin first)"
    return image_grid(drawn, path, title, columns=columns)
