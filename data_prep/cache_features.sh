#!/usr/bin/env bash
# Cache the CLIP features of img2dataset shards, for stage-1 runs with data.input=features.
#
# A thin wrapper around `python -m pipeline.prep.feature_cache` (its --help lists every option), runnable from
# any directory. One process per GPU: under torchrun or srun, or as a SLURM array task, each process reads its
# rank from the environment and takes every world-th shard; rerunning the same command finishes what is missing.
#
# Usage:
#   data_prep/cache_features.sh run --config configs/stage1_8b.yaml \
#       --shards '/data/laion/shards/{00000..41407}.tar' --out /data/laion/features [options] [overrides]
#   data_prep/cache_features.sh verify /data/laion/features [--shards SPEC]
#
# Options of `run` (defaults in brackets):
#   --dtype float16|bfloat16|float32   stored dtype [float16]; float32 doubles the storage and is for tests
#   --batch-size N                     images per forward pass [256]
#   --num-workers N                    decode processes [5/8 of the cores per GPU; give a task 16 cores]
#   --writer-threads N                 threads writing and hashing feature shards [4]
#   --rank R --world W                 this process's share [from RANK/WORLD_SIZE or SLURM_* or 0 of 1]
#   --device D                         [cuda:LOCAL_RANK, else cpu]
#   model.vision.model=PATH ...        config overrides, as for python -m pipeline.train
#
# Output in --out: one feature shard per input shard with the same name, and manifest/NAME.json per shard
# (samples, bytes, sha256, skipped counts, model, layer, dtype). At fp16 a sample takes ~517 KiB.
#
# Environment:
#   PYTHON   the python that has the project's requirements [python3]
set -euo pipefail

if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m pipeline.prep.feature_cache "$@"
