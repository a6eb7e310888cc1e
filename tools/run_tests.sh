#!/usr/bin/env bash
# The project's test command: install what is needed, then run the CI suite (slow tests: pass -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
. .venv/bin/activate
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  DEEPSPEED_TIMEOUT=${DEEPSPEED_TIMEOUT:-3}
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec python -m pytest -q "$@"
