"""Exports of trained runs, loadable without DeepSpeed or the training checkpoint.

Stage 1: `resampler.safetensors` plus `resampler.json` (its shape and the base models).
Stage 2: the same resampler pair, `adapter/` (the LoRA adapter in peft format) and `manifest.json` naming the base
models and how to rebuild the prompt (system prompt, image tokens, quantization of the base LLM during training).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.model.resampler import PerceiverResampler

MANIFEST = "manifest.json"
ADAPTER_DIR = "adapter"


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


def export_stage2(model, out_dir: Path, run_config: dict, step: int) -> Path:
    """The adapter (peft format), the resampler pair and a manifest naming the base models."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.llm.save_pretrained(out_dir / ADAPTER_DIR)
    export_resampler(model.resampler, out_dir, run_config["model"], step)
    model_config = run_config["model"]
    manifest = {
        "stage": 2,
        "step": step,
        "vision_model": model_config["vision"]["model"],
        "feature_layer": model_config["vision"]["feature_layer"],
        "vision_dtype": model_config["vision"]["dtype"],
        "llm_model": model_config["llm"]["model"],
        "llm_dtype": model_config["llm"]["dtype"],
        "llm_quantization_in_training": model_config["llm"]["quantization"],
        "adapter": ADAPTER_DIR,
        "resampler": "resampler.safetensors",
        "image_tokens": model.resampler.num_latents,
        "max_sequence_tokens": model_config["max_sequence_tokens"],
        "system_prompt": model_config["system_prompt"],
        "merged": False,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir
