#!/usr/bin/env bash
# Download an image-text URL list (LAION-style parquet) into webdataset tar shards with img2dataset.
#
# The same job serves LAION and the toy world; only the input, the column names and the image size differ.
# It runs fully offline apart from the image URLs themselves: wandb is off and disabled by environment,
# albumentations' update check is off, and loopback addresses bypass any HTTP proxy.
#
# Usage:
#   data_prep/img2dataset.sh --input PARQUET_OR_DIR --output DIR [options] [-- extra img2dataset flags]
#
# Options (defaults in brackets):
#   --input PATH           parquet file, or a folder whose *.parquet files are all read (required)
#   --output DIR           folder for the shards (required)
#   --image-size N         target size in pixels [256]; what it applies to depends on --resize-mode
#   --resize-mode MODE     keep_ratio (shorter side = N, as CLIP's processor expects), center_crop, border,
#                          keep_ratio_largest or no [keep_ratio]
#   --processes N          download processes [number of cores]
#   --threads N            download threads per process [64]
#   --shard-size N         samples per shard (number_sample_per_shard) [10000]
#   --url-col NAME         URL column [url]   (LAION parquets: URL)
#   --caption-col NAME     caption column [caption]   (LAION parquets: TEXT)
#   --extra-columns A,B    input columns copied into each sample's .json (save_additional_columns) [none]
#   --incremental MODE     incremental (skip shards that have a *_stats.json), overwrite or extend [incremental]
#   --timeout S            per-image download timeout in seconds [10]
#   --retries N            retries per image [0]
#   -h, --help             print this header
# Anything after "--" is passed to img2dataset unchanged (e.g. -- --min_image_size 64).
#
# Environment:
#   IMG2DATASET            the img2dataset executable [img2dataset on PATH]
#   PYTHON                 python used to summarise the stats files [python3]
#
# Output in DIR: {00000..N}.tar webdataset shards whose samples are KEY.jpg, KEY.txt (caption) and KEY.json
# (the input row's url, caption and extra columns plus img2dataset's key, status, sizes and sha256), one
# {shard}.parquet of the same metadata per shard (failed downloads included) and one {shard}_stats.json per
# shard. The job exits non-zero when no shard stats were written or no image downloaded.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

input=""
output=""
image_size=256
resize_mode="keep_ratio"
processes="$(nproc)"
threads=64
shard_size=10000
url_col="url"
caption_col="caption"
extra_columns=""
incremental="incremental"
timeout_s=10
retries=0
passthrough=()

while (($# > 0)); do
    case "$1" in
        --input) input="$2"; shift 2 ;;
        --output) output="$2"; shift 2 ;;
        --image-size) image_size="$2"; shift 2 ;;
        --resize-mode) resize_mode="$2"; shift 2 ;;
        --processes) processes="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --shard-size) shard_size="$2"; shift 2 ;;
        --url-col) url_col="$2"; shift 2 ;;
        --caption-col) caption_col="$2"; shift 2 ;;
        --extra-columns) extra_columns="$2"; shift 2 ;;
        --incremental) incremental="$2"; shift 2 ;;
        --timeout) timeout_s="$2"; shift 2 ;;
        --retries) retries="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; passthrough=("$@"); break ;;
        *) echo "img2dataset.sh: unknown option '$1'; run with --help for the list" >&2; exit 2 ;;
    esac
done

if [[ -z "$input" || -z "$output" ]]; then
    echo "img2dataset.sh: --input and --output are required; run with --help for usage" >&2
    exit 2
fi
if [[ ! -e "$input" ]]; then
    echo "img2dataset.sh: input '$input' does not exist; pass a parquet file or a folder of them" >&2
    exit 2
fi
img2dataset_bin="${IMG2DATASET:-img2dataset}"
if ! command -v "$img2dataset_bin" > /dev/null; then
    echo "img2dataset.sh: '$img2dataset_bin' not found; install requirements.txt or set IMG2DATASET" >&2
    exit 2
fi

# fire parses this Python-literal list into save_additional_columns.
extra_columns_flag=()
if [[ -n "$extra_columns" ]]; then
    extra_columns_flag=(--save_additional_columns "[\"${extra_columns//,/\",\"}\"]")
fi

export WANDB_MODE=disabled WANDB_SILENT=true NO_ALBUMENTATIONS_UPDATE=1
# urllib honours *_proxy variables; a proxy must never see requests for the loopback file server.
export no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}" NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"

"$img2dataset_bin" \
    --url_list "$input" \
    --input_format parquet \
    --url_col "$url_col" \
    --caption_col "$caption_col" \
    "${extra_columns_flag[@]}" \
    --output_folder "$output" \
    --output_format webdataset \
    --image_size "$image_size" \
    --resize_mode "$resize_mode" \
    --resize_only_if_bigger False \
    --encode_format jpg \
    --encode_quality 95 \
    --number_sample_per_shard "$shard_size" \
    --processes_count "$processes" \
    --thread_count "$threads" \
    --distributor multiprocessing \
    --timeout "$timeout_s" \
    --retries "$retries" \
    --incremental_mode "$incremental" \
    --extract_exif False \
    --compute_hash sha256 \
    --enable_wandb False \
    "${passthrough[@]}"

# img2dataset exits 0 even when every download failed, so check its per-shard stats.
"${PYTHON:-python3}" - "$output" << 'EOF'
import json
import pathlib
import sys

output = pathlib.Path(sys.argv[1])
stats = [json.loads(path.read_text()) for path in sorted(output.glob("*_stats.json"))]
if not stats:
    sys.exit(f"img2dataset.sh: no *_stats.json in {output}; img2dataset wrote no shard")
count = sum(s["count"] for s in stats)
successes = sum(s["successes"] for s in stats)
errors = {}
for s in stats:
    for message, n in s.get("status_dict", {}).items():
        if message != "success":
            errors[message] = errors.get(message, 0) + n
print(f"img2dataset.sh: {successes}/{count} images in {len(stats)} shards in {output}")
for message, n in sorted(errors.items(), key=lambda item: -item[1])[:5]:
    print(f"  {n} x {message}")
if successes == 0:
    sys.exit("img2dataset.sh: no image downloaded; check that the URLs are reachable from this machine")
EOF
