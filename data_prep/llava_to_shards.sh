#!/usr/bin/env bash
# Convert LLaVA-format instruction data (conversation JSON + image folder) into webdataset shards for stage 2.
#
# Usage:
#   data_prep/llava_to_shards.sh --json FILE --images DIR --out DIR [--shard-size N] [--workers N]
#
#   --json FILE        a list of {"id", "image", "conversations"} records (e.g. llava/llava_instruct_150k.json)
#   --images DIR       the folder the records' "image" paths are relative to (e.g. coco/train2017)
#   --out DIR          where {00000..N}.tar, stats.json and skipped.jsonl are written
#   --shard-size N     samples per shard [5000]
#   --workers N        threads reading and checking images [8]
#
# Each sample is KEY.jpg (the image file's bytes) + KEY.json (the record). Missing, unreadable or absent images and
# malformed records are skipped, listed in OUT/skipped.jsonl and counted in OUT/stats.json; they never stop the job.
#
# Environment:
#   PYTHON             interpreter with the pipeline's requirements [.venv/bin/python if present, else python3]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$([[ -x "$root/.venv/bin/python" ]] && echo "$root/.venv/bin/python" || echo python3)}"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m pipeline.prep.instruct_shards "$@"
