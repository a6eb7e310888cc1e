#!/usr/bin/env bash
# padmoe train, one launcher per node and no ssh (torchrun style): run this on every node with its own NODE_RANK.
#   launch/multi_node_no_ssh.sh HOSTFILE NODE_RANK MASTER_ADDR CONFIG [key=value ...] [--resume]
# HOSTFILE is the same file on every node ("HOST slots=GPUS" lines, in node-rank order); MASTER_ADDR is the address of
# node 0, reachable from all nodes; MASTER_PORT (default 29500) must be free there. The environment of this shell is
# what the local ranks get (no .deepspeed_env needed). Set DEEPSPEED_TIMEOUT (minutes) so that a dead node stops the
# others instead of leaving them waiting in a collective.
set -euo pipefail
me=$(basename "$0")
if [ $# -lt 4 ]; then
  echo "$me: error: usage: $me HOSTFILE NODE_RANK MASTER_ADDR CONFIG [key=value ...] [--resume]" >&2; exit 2
fi
hostfile=$1 node_rank=$2 master_addr=$3; shift 3
[ -f "$hostfile" ] || { echo "$me: error: hostfile '$hostfile' does not exist; write one 'HOST slots=N' line per node" >&2; exit 2; }
awk -v me="$me" -v f="$hostfile" '
  /^[[:space:]]*(#|$)/ { next }
  $0 !~ /^[[:space:]]*[^[:space:]]+[[:space:]]+slots=[0-9]+[[:space:]]*$/ {
    printf "%s: error: hostfile %s line %d \"%s\" is not \"HOST slots=N\"; fix it (e.g. \"node1 slots=8\")\n", me, f, NR, $0 > "/dev/stderr"; exit 2 }
  seen[$1]++ { printf "%s: error: hostfile %s lists host %s twice (line %d); give each host one line\n", me, f, $1, NR > "/dev/stderr"; exit 2 }' "$hostfile"
nodes=$(grep -cE '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=' "$hostfile" || true)
if [ "$nodes" -eq 0 ]; then
  echo "$me: error: hostfile $hostfile has no \"HOST slots=N\" line; add one per node" >&2; exit 2
fi
if ! [[ "$node_rank" =~ ^[0-9]+$ ]] || [ "$node_rank" -ge "$nodes" ]; then
  echo "$me: error: NODE_RANK=$node_rank is not in [0, $nodes) for the $nodes nodes of $hostfile; pass this node's line index" >&2
  exit 2
fi
exec deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" --master_addr "$master_addr" \
  --master_port "${MASTER_PORT:-29500}" --module pad_moe.cli train "$@"
