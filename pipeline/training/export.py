"""Export of a trained resampler: `resampler.safetensors` plus `resampler.json` (its shape and the base models).

Stage 2 and inference load this pair without DeepSpeed or the training checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.model.resampler import PerceiverResampler


def export_resampler(resampler: PerceiverResampler, out_dir: Path, model_config: dict, step: int) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in resampler.state_dict().items()}
    save_file(tensors, out_dir / "resampler.safetensors")
    meta = {
        "resampler": resampler.config,
        "vision_model": model_config["vision"]["model"],
        "feature_layer": model_config["vision"]["feature_layer"],
        "llm_model": model_config["llm"]["model"],
        "step": step,
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
    }
    (out_dir / "resampler.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def load_exported_resampler(
    export_dir: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[PerceiverResampler, dict]:
    export_dir = Path(export_dir)
    meta_path = export_dir / "resampler.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found; point at a run's export/ directory")
    meta = json.loads(meta_path.read_text())
    shape = dict(meta["resampler"])
    resampler = PerceiverResampler(shape.pop("vision_width"), shape.pop("output_width"), **shape)
    resampler.load_state_dict(load_file(export_dir / "resampler.safetensors"))
    return resampler.to(dtype), meta
