#!/usr/bin/env bash
# One node through the deepspeed launcher: stage1_local.sh and stage2_local.sh call this with their module.
#
#   launch/train_local.sh MODULE CONFIG [key=value ...]     (MODULE: pipeline.train or pipeline.train_stage2)
#
# NPROC   processes to start (default: one per visible GPU; 1 without GPUs)
# MASTER_PORT   rendezvous port on this node (default 29500)
# On a CPU-only machine set NPROC and pass train.distributed_backend=gloo (the toy configs do).
set -euo pipefail
cd "$(dirname "$0")/.."
module=${1:?usage: launch/train_local.sh MODULE CONFIG [key=value ...]}
config=${2:?usage: launch/train_local.sh MODULE CONFIG [key=value ...]}
shift 2
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC:-0}" -gt 0 ] || NPROC=1
fi
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec deepspeed --num_gpus "$NPROC" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" \
  --module "$module" --config "$config" "$@"
