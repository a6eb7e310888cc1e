#!/usr/bin/env bash
# padmoe train on every node of a DeepSpeed hostfile, started from one node over pdsh/ssh:
#   launch/multi_node_hostfile.sh HOSTFILE CONFIG [key=value ...] [--resume]
# HOSTFILE lines: "HOST slots=GPUS" (e.g. "node1 slots=8"); every host needs passwordless ssh, this repository at the
# same path and the same environment. Environment variables are not forwarded by ssh: put the ones the ranks need
# (OMP_NUM_THREADS, NCCL_*, HF_*_OFFLINE, DEEPSPEED_TIMEOUT, ...) in ./.deepspeed_env (see launch/deepspeed_env.example).
# Optional: MASTER_ADDR (default: the first host's address), MASTER_PORT (29500), LAUNCHER (pdsh; or openmpi, slurm).
set -euo pipefail
me=$(basename "$0")
if [ $# -lt 2 ]; then
  echo "$me: error: usage: $me HOSTFILE CONFIG [key=value ...] [--resume]" >&2; exit 2
fi
hostfile=$1; shift
check_hostfile() {  # one line naming the bad entry and the fix, exit 2
  [ -f "$1" ] || { echo "$me: error: hostfile '$1' does not exist; write one 'HOST slots=N' line per node" >&2; exit 2; }
  awk -v me="$me" -v f="$1" '
    /^[[:space:]]*(#|$)/ { next }
    $0 !~ /^[[:space:]]*[^[:space:]]+[[:space:]]+slots=[0-9]+[[:space:]]*$/ {
      printf "%s: error: hostfile %s line %d \"%s\" is not \"HOST slots=N\"; fix it (e.g. \"node1 slots=8\")\n", me, f, NR, $0 > "/dev/stderr"; bad = 1; exit 2 }
    { if (seen[$1]++) { printf "%s: error: hostfile %s lists host %s twice (line %d); give each host one line\n", me, f, $1, NR > "/dev/stderr"; bad = 1; exit 2 } n++ }
    END { if (!bad && n == 0) { printf "%s: error: hostfile %s has no \"HOST slots=N\" line; add one per node\n", me, f > "/dev/stderr"; exit 2 } }' "$1"
}
check_hostfile "$hostfile"
for env_file in ./.deepspeed_env "$HOME/.deepspeed_env"; do  # DeepSpeed splits every line at '=': no comments
  if [ -f "$env_file" ] && grep -qv '=' "$env_file"; then
    echo "$me: error: $env_file line $(grep -nv '=' "$env_file" | head -1 | cut -d: -f1) has no '='; keep only KEY=VALUE lines" >&2
    exit 2
  fi
done
exec deepspeed --hostfile "$hostfile" --launcher "${LAUNCHER:-pdsh}" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} \
  --master_port "${MASTER_PORT:-29500}" --module pad_moe.cli train "$@"
