"""The small CNN of the seed article: conv32-pool-conv64-pool-dense128-denseN, with dropout."""

from torch import nn


def small_cnn_stages(
    in_channels: int, num_classes: int, image_size: int, dropout: float, width: float = 1.0
) -> list[nn.Sequential]:
    """The small CNN as its stages: conv block 1, conv block 2, dense block, classifier.

    `width` scales the 32/64 channels and the 128 dense units (0.25 gives a distillation student).
    """
    side = image_size // 4
    c1, c2, dense = (max(4, round(n * width)) for n in (32, 64, 128))
    return [
        nn.Sequential(nn.Conv2d(in_channels, c1, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(c1, c2, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(c2 * side * side, dense), nn.ReLU(), nn.Dropout(dropout)),
        nn.Sequential(nn.Linear(dense, num_classes)),
    ]


def small_cnn(in_channels: int, num_classes: int, image_size: int, dropout: float, width: float = 1.0) -> nn.Sequential:
    """Build the small CNN for square inputs of side `image_size`; returns an nn.Sequential."""
    stages = small_cnn_stages(in_channels, num_classes, image_size, dropout, width)
    return nn.Sequential(*(layer for stage in stages for layer in stage))
