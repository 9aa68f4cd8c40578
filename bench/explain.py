"""What an evaluation's explanation grid costs: attribution maps of 16 images per architecture family.

Untrained networks (the cost does not depend on the weights), CPU, the method `evaluate.explain_method: auto`
picks: Grad-CAM (one forward and one backward pass) for the CNNs, Integrated Gradients (16 path steps, so 16
forward and backward passes per image) for the ViT and the RNN. Prints the median of `--repeats` timings.

    python bench/explain.py                 # cnn, rnn, vit at 32 px; resnet18, mobilenet_v3_small at 224 px
    python bench/explain.py --images 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from components.evaluation.explain import attribution_maps  # noqa: E402
from components.models import ModelSpec, build_model  # noqa: E402

CASES = [("cnn", 32), ("rnn", 32), ("vit", 32), ("resnet18", 224), ("mobilenet_v3_small", 224)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="Images explained at once (evaluate.explain_images).")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    table = Table(title=f"attribution maps of {args.images} images, CPU ({torch.get_num_threads()} threads)")
    for column in ("model", "input", "method", "layer", "seconds", "ms / image"):
        table.add_column(column)
    for name, side in CASES:
        torch.manual_seed(0)
        model = build_model(ModelSpec(name=name, num_classes=10, image_size=side)).eval()
        images = torch.randn(args.images, 3, side, side)
        targets = [i % 10 for i in range(args.images)]
        attribution_maps(model, name, images[:2], targets[:2])  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            _, method, layer = attribution_maps(model, name, images, targets)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        per_image = f"{1000 * seconds / args.images:.0f}"
        table.add_row(name, f"{side}x{side}", method, layer or "-", f"{seconds:.2f}", per_image)
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
