#!/usr/bin/env bash
# The GPU check of docs/predict_at_scale.md and docs/finetune.md: one command, under 8 minutes on one GPU, that
# prints training with --amp and channels_last and predict.py's steady rate against the forward ceiling, and the
# 12 MP JPEG decode on the GPU (torchvision's decode_jpeg) against Pillow. Run it from the repository's root, in
# the environment of requirements.txt, where a GPU is lent:  bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
  echo "no NVIDIA GPU here: nothing to check (python bench/gpu_check.py --device cpu --quick tries the steps on the CPU)"
  exit 2
fi
timeout 480 python bench/gpu_check.py "$@"
