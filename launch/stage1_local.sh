#!/usr/bin/env bash
# Stage 1 on one node through the deepspeed launcher (see train_local.sh for NPROC and MASTER_PORT).
#
#   launch/stage1_local.sh CONFIG [key=value ...]
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: launch/stage1_local.sh CONFIG [key=value ...]" >&2; exit 2; }
exec "$(dirname "$0")/train_local.sh" pipeline.train "$@"
