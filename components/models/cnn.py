"""The small CNN of the seed article: conv32-pool-conv64-pool-dense128-denseN, with dropout."""

from torch import nn


def small_cnn(in_channels: int, num_classes: int, image_size: int, dropout: float) -> nn.Sequential:
    """Build the small CNN for square inputs of side `image_size`; returns an nn.Sequential."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 128),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(128, num_classes),
    )
