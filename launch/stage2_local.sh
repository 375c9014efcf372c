#!/usr/bin/env bash
# Stage 2 (instruction tuning) on one node through the deepspeed launcher, like stage1_local.sh.
#
#   launch/stage2_local.sh CONFIG [key=value ...]
#
# NPROC   processes to start (default: one per visible GPU; 1 without GPUs)
# MASTER_PORT   rendezvous port on this node (default 29500)
# On a CPU-only machine set NPROC and pass train.distributed_backend=gloo (configs/toy_stage2.yaml does).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: launch/stage2_local.sh CONFIG [key=value ...]}
shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC:-0}" -gt 0 ] || NPROC=1
fi
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec deepspeed --num_gpus "$NPROC" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" \
  --module pipeline.train_stage2 --config "$config" "$@"
