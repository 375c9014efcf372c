"""Exports of trained runs, loadable without DeepSpeed or the training checkpoint.

Stage 1: `resampler.safetensors` plus `resampler.json` (its shape and the base models).
Stage 2: the same resampler pair, `adapter/` (the LoRA adapter in peft format) and `manifest.json` naming the base
models and how to rebuild the prompt (system prompt, image tokens, quantization of the base LLM during training).
Stage 2 starts from a stage-1 resampler: `load_stage1_resampler` takes its export, its run or one checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.model.resampler import PerceiverResampler
from pipeline.training.checkpoint import COMPLETE_MARKER, latest_complete

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


def load_stage1_resampler(source: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PerceiverResampler, str]:
    """A stage-1 resampler from its export directory, its run directory (the export, else the newest complete
    checkpoint) or one checkpoint directory. Returns it with a description of where it came from."""
    from pipeline.config import load_config
    from pipeline.model.anymal import build_resampler

    source = Path(source)
    for export_dir in (source, source / "export"):
        if (export_dir / "resampler.json").is_file():
            resampler, meta = load_exported_resampler(export_dir, dtype)
            return resampler, f"export {export_dir} (step {meta['step']})"
    checkpoint = source if (source / COMPLETE_MARKER).is_file() else latest_complete(source / "checkpoints")
    if checkpoint is None:
        raise FileNotFoundError(
            f"model.stage1_resampler '{source}' holds no resampler.json, export/ or complete checkpoint; point at a "
            "stage-1 run directory, its export/ directory or one of its checkpoints/step_* directories"
        )
    config = load_config(checkpoint.parent.parent / "config.yaml")
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    width = states["latents"].shape[1]
    vision_width = states["project_in.weight"].shape[1] if "project_in.weight" in states else width
    resampler = build_resampler(config.model, vision_width, states["to_llm.weight"].shape[0])
    resampler.load_state_dict(states)
    return resampler.to(dtype), f"checkpoint {checkpoint}"


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
