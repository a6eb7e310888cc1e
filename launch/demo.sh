#!/usr/bin/env bash
# The main job on its embedded default: install what is needed, then train a tiny PAD-MoE encoder with
# 2 CPU ranks (expert parallel 2, ZeRO-2) under the deepspeed launcher. Extra arguments are key=value overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
name=demo-$(date +%Y%m%d-%H%M%S)
exec deepspeed --num_gpus 2 --module pad_moe.cli train configs/debug.yaml name="$name" "$@"
