#!/usr/bin/env bash
# padmoe train on N local ranks (GPUs, or CPU processes): launch/single_node.sh N CONFIG [key=value ...] [--resume]
set -euo pipefail
n=$1; shift
exec deepspeed --num_gpus "$n" --module pad_moe.cli train "$@"
