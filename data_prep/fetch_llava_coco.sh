#!/usr/bin/env bash
# Fetch LLaVA-Instruct-150K and COCO train2017 (stage 2), COCO val2014, the Karpathy split and VQAv2 val
# (evaluation) into one layout.
#
# Usage:
#   data_prep/fetch_llava_coco.sh --root DIR [--only NAMES] [--base-url KEY=URL ...] [--keep-archives]
#
#   --root DIR            where the layout is built (required)
#   --only NAMES          comma-separated subset of llava_instruct, coco_train2017, coco_val2014, karpathy, vqav2
#   --base-url KEY=URL    a mirror for one source; KEY and its default:
#                           llava     https://huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K/resolve/main
#                           coco      http://images.cocodataset.org/zips
#                           karpathy  https://cs.stanford.edu/people/karpathy/deepimagesent
#                           vqa       https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa
#   --keep-archives       keep the zips in DIR/downloads after extraction
#   --attempts N          tries per file before giving up [5]
#
# Layout in DIR:
#   llava/llava_instruct_150k.json
#   coco/train2017/*.jpg                    (118,287 images, 19.3 GB zip)
#   coco/val2014/*.jpg                      (40,504 images, 6.6 GB zip)
#   coco/karpathy/dataset_coco.json
#   vqav2/v2_OpenEnded_mscoco_val2014_questions.json, vqav2/v2_mscoco_val2014_annotations.json
#   manifest.json                           url, size and sha256 of every download
# Interrupted? Run the same command again: transfers resume and finished outputs are skipped.
#
# Environment:
#   PYTHON                interpreter with the pipeline's requirements [.venv/bin/python if present, else python3]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$([[ -x "$root/.venv/bin/python" ]] && echo "$root/.venv/bin/python" || echo python3)}"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m pipeline.prep.llava_coco "$@"
