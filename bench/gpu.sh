#!/usr/bin/env bash
# One command for a GPU machine: training throughput (default job and resnet18 224×224, on 1 GPU and on all GPUs
# under DDP), GPU utilisation and peak memory, the train loader's images/s against torchvision, small images held on
# the GPU, and what a checkpoint save holds the training thread (bench/writes.py).
#
#   bash bench/gpu.sh                 # on a GPU machine with this repository (creates .venv with `make install` if needed)
#   bash bench/gpu.sh --cpu-smoke     # a tiny run of the same steps on CPU, to check the script anywhere
#
# Extra arguments go to bench/train_devices.py (--epochs, --images, --batch-size, --precision).
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true NO_ALBUMENTATIONS_UPDATE=1

PYTHON="${VISIONFLOW_PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ]; then
    echo "[gpu.sh] no virtual environment yet: make install" >&2
    make install
    PYTHON=.venv/bin/python
fi

LOADER_IMAGES=5000
WRITES_DEVICE=cuda
# Small images at in-memory speed: the decoded train split held on the GPU and augmented there in batches, against a
# plain loop over a preloaded tensor and the per-image loader (generated digits, no download).
SMALL_IMAGES=(--accelerator gpu --images 5000 --images-224 5000)
for arg in "$@"; do
    if [ "$arg" = "--cpu-smoke" ]; then LOADER_IMAGES=300; WRITES_DEVICE=cpu; SMALL_IMAGES=(--accelerator cpu --sizes 28 --images 300 --epochs 2); fi
done

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
fi
"$PYTHON" -c 'import torch; print(f"[gpu.sh] torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")'

"$PYTHON" bench/train_devices.py "$@"
"$PYTHON" bench/dataloader.py --images "$LOADER_IMAGES"
"$PYTHON" bench/small_images.py "${SMALL_IMAGES[@]}"
# What a checkpoint save holds the training thread with GPU-resident weights, synchronous against the background writer.
"$PYTHON" bench/writes.py --device "$WRITES_DEVICE"
