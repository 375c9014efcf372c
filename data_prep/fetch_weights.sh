#!/usr/bin/env bash
# Prefetch Hugging Face models into a local directory, on a machine with internet (a login node).
#
# Usage:
#   data_prep/fetch_weights.sh --out-dir DIR [--config CONFIG] [REPO_ID ...] [--revision REV] [--all-files]
#
#   --out-dir DIR      models go to DIR/<org>/<name>, e.g. DIR/meta-llama/Meta-Llama-3-8B-Instruct (required)
#   --config CONFIG    fetch the run config's model.vision.model and model.llm.model, e.g.
#                        configs/stage1_8b.yaml: openai/clip-vit-large-patch14 + meta-llama/Meta-Llama-3-8B-Instruct
#                        configs/stage1_70b.yaml: openai/clip-vit-large-patch14 + meta-llama/Meta-Llama-3-70B-Instruct
#                          (about 132 GiB of safetensors in 30 shards)
#                        configs/stage1_siglip2_qwen3_8b.yaml: google/siglip2-so400m-patch14-384 + Qwen/Qwen3-8B
#   REPO_ID ...        further Hub model ids, e.g. openai/clip-vit-large-patch14
#   --revision REV     branch, tag or commit [main]
#   --all-files        also fetch duplicate weight formats (.bin next to .safetensors, TF, Flax) and original/
#
# Gated models (meta-llama/*; the SigLIP2 and Qwen3 models are not gated): accept the Meta Llama 3 licence on each
# model's own Hub page (https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct, and for the 70B
# https://huggingface.co/meta-llama/Meta-Llama-3-70B-Instruct), create a read token at
# https://huggingface.co/settings/tokens, then export HF_TOKEN=hf_... or run `hf auth login`.
# Before downloading it checks that the files still missing fit on DIR's filesystem, and stops with one line if not.
# It prints the overrides that point a run at the local copies; see docs/real_data.md.
#
# Environment:
#   HF_TOKEN           Hub token (else the one saved by `hf auth login`)
#   HF_ENDPOINT        Hub endpoint or mirror [https://huggingface.co]
#   PYTHON             interpreter with the pipeline's requirements [.venv/bin/python if present, else python3]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$([[ -x "$root/.venv/bin/python" ]] && echo "$root/.venv/bin/python" || echo python3)}"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m pipeline.prep.weights "$@"
