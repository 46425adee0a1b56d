#!/usr/bin/env bash
# The GPU check in one call (see benchmarks/gpu_check.py): a few steps of each task on cuda at paper
# size with the GPU presets, host-device syncs refused, and a table of ms/step, samples/s, loader
# samples/s and peak GPU memory. Under 8 minutes on one H100. Extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
WANDB_MODE=disabled exec .venv/bin/python benchmarks/gpu_check.py --device cuda --scale paper "$@"
