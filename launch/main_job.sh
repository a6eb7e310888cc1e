#!/usr/bin/env bash
# The main job on its embedded default (offline, CPU is enough): install what is needed, then fine-tune
# all-MiniLM-L6-v2 upcycled in static, moe and pad (κ=0.5) modes on the VADER movie-review sentences with 2 ranks,
# expert parallel 2, ZeRO-2, and print a comparison table. Extra arguments are key=value overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

exec python -m pad_moe.train.compare configs/minilm_vader.yaml "$@"
