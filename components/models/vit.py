"""A Vision Transformer sized for small inputs, built from torch.nn.TransformerEncoder."""

from __future__ import annotations

import torch
from torch import nn


class SmallViT(nn.Module):
    """Patch embedding (a strided conv), a class token, learned position embeddings and a
    pre-norm TransformerEncoder; classifies the class token. Input (N, C, S, S), S divisible by patch."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        patch_size: int = 4,
        depth: int = 4,
        heads: int = 4,
        width: int = 128,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        steps = (image_size // patch_size) ** 2
        self.embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.randn(1, steps + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, int(width * mlp_ratio), dropout=dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.position
        return self.head(self.norm(self.encoder(tokens))[:, 0])
