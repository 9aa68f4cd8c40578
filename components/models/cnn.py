"""The small CNN of the seed article: conv32-pool-conv64-pool-dense128-denseN, with dropout."""

from torch import nn


def small_cnn_stages(in_channels: int, num_classes: int, image_size: int, dropout: float) -> list[nn.Sequential]:
    """The small CNN as its stages: conv block 1, conv block 2, dense block, classifier."""
    side = image_size // 4
    return [
        nn.Sequential(nn.Conv2d(in_channels, 32, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Dropout(dropout)),
        nn.Sequential(nn.Linear(128, num_classes)),
    ]


def small_cnn(in_channels: int, num_classes: int, image_size: int, dropout: float) -> nn.Sequential:
    """Build the small CNN for square inputs of side `image_size`; returns an nn.Sequential."""
    return nn.Sequential(*(layer for stage in small_cnn_stages(in_channels, num_classes, image_size, dropout) for layer in stage))
