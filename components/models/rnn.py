"""An RNN image classifier: the image read as a sequence of rows (or of patches) by a GRU or LSTM."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class SequenceClassifier(nn.Module):
    """Reads an (N, C, H, W) image as a sequence and classifies the last or mean-pooled state.

    `sequence="rows"`: H steps of C*W features. `sequence="patches"`: (H/p)*(W/p) steps of C*p*p
    features in raster order.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        cell: Literal["gru", "lstm"] = "gru",
        hidden_size: int = 128,
        num_layers: int = 2,
        bidirectional: bool = True,
        pooling: Literal["last", "mean"] = "mean",
        sequence: Literal["rows", "patches"] = "rows",
        patch_size: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.sequence = sequence
        self.patch_size = patch_size
        self.pooling = pooling
        features = in_channels * (image_size if sequence == "rows" else patch_size * patch_size)
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(
            features,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)
        )

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → (N, steps, features)."""
        n, c, h, w = x.shape
        if self.sequence == "rows":
            return x.permute(0, 2, 1, 3).reshape(n, h, c * w)
        p = self.patch_size
        patches = x.unfold(2, p, p).unfold(3, p, p)  # N, C, H/p, W/p, p, p
        return patches.permute(0, 2, 3, 1, 4, 5).reshape(n, (h // p) * (w // p), c * p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.to_sequence(x))
        state = out.mean(dim=1) if self.pooling == "mean" else out[:, -1]
        return self.head(state)
