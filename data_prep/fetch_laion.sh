#!/usr/bin/env bash
# Fetch LAION metadata parquets, filter them, and write one parquet for data_prep/img2dataset.sh.
#
# Usage:
#   data_prep/fetch_laion.sh --out-dir DIR [which parquets] [filters] [--max-samples N]
#                            [--shards SHARD_DIR [-- img2dataset.sh options]]
#
# Which parquets (default: LAION-400M part 0 from the LAION-400M release URL):
#   --base-url URL           where the parts are served
#   --parts 0-3,7            LAION-400M part indices (32 parts, 0-31)
#   --files NAME ...         part file names under --base-url instead (other releases, e.g. LAION-2B-en)
#   --local PARQUET|DIR ...  parquets already on disk; nothing is fetched
# Filters (defaults in brackets; a missing value fails; a filter whose column is absent is off):
#   --min-caption-chars [5]  --max-caption-chars [512]       caption length after trimming (TEXT)
#   --min-image-side [224]   --max-aspect-ratio [3.0]        original image size (WIDTH, HEIGHT)
#   --nsfw-keep [UNLIKELY]                                   NSFW tags to keep (LAION-400M)
#   --max-punsafe [0.1]      --max-pwatermark [0.5]          probabilities (LAION-5B)
#   --min-similarity X                                       CLIP image-text similarity [no filter]
# Output in DIR: raw/ (the parts and manifest.json), laion_filtered.parquet (URL, TEXT and the other columns) and
# laion_filtered.stats.json (rows read, kept, failed per filter). With --shards it then runs
#   data_prep/img2dataset.sh --input DIR/laion_filtered.parquet --output SHARD_DIR --url-col URL --caption-col TEXT
# with anything after "--" added (e.g. -- --processes 32 --threads 128).
# Re-running resumes: parts already downloaded are verified against manifest.json instead of fetched again.
#
# Environment:
#   PYTHON                   interpreter with the pipeline's requirements [.venv/bin/python if present, else python3]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$([[ -x "$root/.venv/bin/python" ]] && echo "$root/.venv/bin/python" || echo python3)}"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m pipeline.prep.laion "$@"
