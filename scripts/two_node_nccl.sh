#!/usr/bin/env bash
# Two "nodes" on one host: two processes, one GPU each, NCCL forced onto its socket
# transport (what it uses between nodes without InfiniBand), checked against the
# reference by examples/nccl_check.rs. Modes:
#
#   check      both processes pass every step                      (2 GPUs)
#   kill       rank 1's process exits mid-run; rank 0 must fail
#              with an EpError within the timeout, not hang         (2 GPUs)
#   per-node   two processes of two GPUs each: device copies inside
#              a process, NCCL between them                         (4 GPUs)
#   one-gpu    one process (NCCL's own segment through loopback),
#              and two processes sharing GPU 0, which NCCL refuses:
#              both must fail by name within the timeout            (1 GPU)
#
#   scripts/two_node_nccl.sh MODE [path/to/nccl_check] [log dir]
#
# Build the program with:
#   CUDARC_CUDA_VERSION=13000 cargo build --release -p burn-ep --features cuda --example nccl_check
set -uo pipefail
mode=${1:?mode: check | kill | per-node | one-gpu}
bin=${2:-target/release/examples/nccl_check}
logs=${3:-$(mktemp -d)}
mkdir -p "$logs"
timeout_s=20
port=$((29500 + RANDOM % 1000))
export MASTER_ADDR=127.0.0.1 MASTER_PORT=$port
export NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_SOCKET_IFNAME=lo
failures=0

# start NAME GPUS VAR=VALUE... -- ARGS...: one process in the background.
start() {
  local name=$1 gpus=$2; shift 2
  local vars=()
  while [[ $1 != -- ]]; do vars+=("$1"); shift; done
  shift
  env CUDA_VISIBLE_DEVICES="$gpus" "${vars[@]}" \
    timeout $((timeout_s * 3)) "$bin" --timeout-s "$timeout_s" "$@" >"$logs/$name.log" 2>&1 &
  pids[$name]=$!
}

# expect NAME STATUS...: the process ended with one of these statuses.
expect() {
  local name=$1; shift
  wait "${pids[$name]}"; local got=$?
  for want in "$@"; do
    if [[ $got == "$want" ]]; then echo "ok   $name exited $got"; return; fi
  done
  echo "FAIL $name exited $got (wanted $*); its log:"; sed 's/^/     /' "$logs/$name.log"
  failures=$((failures + 1))
}

declare -A pids
began=$SECONDS
case $mode in
  check)
    start rank0 0 RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 -- --steps 5
    start rank1 1 RANK=1 WORLD_SIZE=2 LOCAL_RANK=0 -- --steps 5
    expect rank0 0; expect rank1 0 ;;
  kill)
    start rank0 0 RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 -- --steps 20 --kill-rank 1 --kill-step 2
    start rank1 1 RANK=1 WORLD_SIZE=2 LOCAL_RANK=0 -- --steps 20 --kill-rank 1 --kill-step 2
    expect rank1 9; expect rank0 2
    grep -h "error after" "$logs/rank0.log" | head -3 ;;
  per-node)
    start node0 0,1 NODE_RANK=0 NNODES=2 -- --steps 5
    start node1 2,3 NODE_RANK=1 NNODES=2 -- --steps 5
    expect node0 0; expect node1 0 ;;
  one-gpu)
    start alone 0 RANK=0 WORLD_SIZE=1 BURN_EP_NCCL_LOOPBACK=1 -- --steps 3
    expect alone 0
    port=$((port + 1)); export MASTER_PORT=$port
    start shared0 0 RANK=0 WORLD_SIZE=2 -- --steps 3
    start shared1 0 RANK=1 WORLD_SIZE=2 -- --steps 3
    expect shared0 2; expect shared1 2
    grep -h "error after" "$logs/shared0.log" | head -3 ;;
  *) echo "unknown mode $mode"; exit 1 ;;
esac
echo "$mode: $failures failure(s) in $((SECONDS - began)) s; logs in $logs"
[[ $failures == 0 ]]
