"""Merge a stage-2 adapter into its base LLM: `python -m pipeline.merge RUN_OR_EXPORT --out DIR`.

DIR becomes a Hugging Face model directory (config, safetensors weights, tokenizer: `from_pretrained(DIR)` loads it
with no peft) that also holds the resampler and a manifest with `"merged": true`, so `pipeline.chat DIR` and
`pipeline.eval` use it like the export. The base is loaded unquantized in its training dtype: W + (alpha / r) B A is
computed there. A QLoRA adapter was trained against the dequantized NF4 weights, so its merged model differs from
training's forward by the quantization error of W; merge into the NF4 base's dequantized weights is not offered.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from pipeline.config import ConfigError


def merge(path: str | Path, out_dir: str | Path) -> Path:
    from pipeline.inference.export import MANIFEST
    from pipeline.inference.loading import load_instruct, read_manifest

    export_dir, manifest = read_manifest(path)
    if manifest["merged"]:
        raise ConfigError(f"{export_dir} is already merged")
    model, tokenizer, _ = load_instruct(export_dir, "cpu", quantization="none")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = model.llm.merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for name in ("resampler.safetensors", "resampler.json"):
        shutil.copy2(export_dir / name, out_dir / name)
    merged_manifest = {
        **manifest,
        "merged": True,
        "adapter": None,
        "base_llm_model": manifest["llm_model"],
        "llm_model": ".",
    }
    (out_dir / MANIFEST).write_text(json.dumps(merged_manifest, indent=2) + "\n")
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", metavar="RUN_OR_EXPORT", help="a finished stage-2 run directory or its export/")
    parser.add_argument("--out", required=True, help="the merged model directory to write")
    args = parser.parse_args(argv)
    try:
        out = merge(args.model, args.out)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
