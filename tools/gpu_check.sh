#!/usr/bin/env bash
# The prepared GPU check (issue 12): one script, about 8 minutes on one GPU, in an environment that already has
# pad_moe's dependencies with CUDA torch (the device machine reaches no network):
#   1. the CUDA-selected layer paths in bf16 and fp16 (tools/gpu_layer_check.py),
#   2. a single-GPU run of the main job's PAD mode in bf16 (NCCL, CUDA device selection, fused AdamW on GPU),
#   3. bench_dropless in bf16, figures as a fraction of the GPU's measured bf16 matmul peak,
#   4. bench_vision in fp32 (issue 26): train / inference throughput vs static of DY-Conv, CondConv, PAD (κ 0.1, 0.5)
#      on ResNet-18 and MobileNetV2 with the CUDA-selected paths (auto) next to the CPU fast paths forced (chunked,
#      tiled) and the K-convolution mix; --check first compares every spec with impl=reference (exit 1 above 1e-3).
# Everything lands in ${OUT:-gpu_check_out}/ (logs and bench JSON). Exit status: the first failing step's.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)" | tee -a "$out/gpu.txt"

timeout 120 python tools/gpu_layer_check.py 2>&1 | tee "$out/layer_check.txt"
timeout 240 deepspeed --num_gpus 1 --module pad_moe.cli train configs/minilm_vader.yaml moe.mode=pad moe.ep_size=1 \
    train.dtype=bf16 output_dir="$out/runs" name=gpu-main-pad 2>&1 | tail -n 40 > "$out/main_job.txt"
python -c "import json,sys; s=json.load(open('$out/runs/gpu-main-pad/summary.json')); print('main job pad bf16:', s['eval'], round(s['wall_time_s']), 's')" | tee -a "$out/gpu.txt"
timeout 240 python tools/bench_dropless.py --device cuda --dtype bf16 --tokens 16384 --threads 1 --quiet-wait 0 \
    --retries 0 --repeats 3 --peak-size 8192 --json "$out/bench_dropless_bf16.json" 2>/dev/null | tee "$out/bench_dropless_bf16.txt"
timeout 240 python tools/bench_vision.py --device cuda --models resnet18,mobilenetv2_100 --image-size 32 --batch 64 \
    --convs static,dyconv,pad:0.1,pad:0.5,condconv,dyconv@chunked,dyconv@tiled,dyconv@mix,pad:0.1@tiled \
    --warmup 2 --steps 5 --rounds 2 --check --json "$out/bench_vision_cuda.json" 2>&1 | tee "$out/bench_vision_cuda.txt"
# 5. serving a compressed HF MoE on CUDA in bf16: source vs every load_deployed form (issue 23)
timeout 240 python tools/bench_deployed.py --device cuda --dtype bf16 --batches 1 8 --repeats 3 \
    --json "$out/bench_deployed_bf16.json" 2>&1 | grep -v '^\[' | tee "$out/bench_deployed_bf16.txt"
