"""Rebuild a trained model for inference, without DeepSpeed or the training checkpoint.

Stage 1: `load_run` takes a run directory (its saved config plus the exported resampler).
Stage 2: `load_instruct` takes a run directory, its export/ or a merged directory (`python -m pipeline.merge`), reads
the manifest there and loads the base models it names, the resampler and the adapter (none when merged).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pipeline.config import ConfigError, LLMConfig, RunConfig, VisionConfig, load_config
from pipeline.inference.export import MANIFEST, load_exported_resampler
from pipeline.model.anymal import AnyMAL, build_anymal

log = logging.getLogger(__name__)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[AnyMAL, object, RunConfig]:
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} has no config.yaml; point at a training run directory")
    config = load_config(run_dir / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(config.model.llm.model)
    model = build_anymal(config.model, tokenizer)
    resampler, _ = load_exported_resampler(run_dir / "export", dtype=model.llm.dtype)
    model.resampler = resampler
    model.to(device).eval()
    return model, tokenizer, config


def find_instruct_export(path: str | Path) -> Path:
    """The directory holding a stage-2 manifest: `path` itself (an export or merged directory) or `path`/export."""
    path = Path(path)
    for candidate in (path, path / "export"):
        if (candidate / MANIFEST).is_file():
            return candidate
    raise ConfigError(
        f"{path} has no {MANIFEST} (nor export/{MANIFEST}); point at a finished stage-2 run, its "
        "export/ directory or a merged directory (stage-1 runs only caption)"
    )


def read_manifest(path: str | Path) -> tuple[Path, dict]:
    export_dir = find_instruct_export(path)
    return export_dir, json.loads((export_dir / MANIFEST).read_text())


def load_instruct(
    path: str | Path,
    device: str | torch.device = "cpu",
    quantization: str | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[AnyMAL, object, dict]:
    """An instruction-tuned model in eval mode, with its tokenizer and manifest.

    The base LLM is loaded in its training dtype and, unless `quantization` says otherwise, with the quantization it
    was trained over (NF4 for a QLoRA run), so that answers are those of training's forward.
    """
    from transformers import AutoTokenizer

    from pipeline.common.dtypes import torch_dtype
    from pipeline.config import ModelConfig
    from pipeline.model.lora import load_adapter

    export_dir, manifest = read_manifest(path)
    merged = manifest["merged"]
    llm_path = str(export_dir) if merged else manifest["llm_model"]
    if quantization is None:
        quantization = "none" if merged else manifest["llm_quantization_in_training"]
    llm_config = LLMConfig(
        model=llm_path, dtype=manifest["llm_dtype"], attn_implementation=attn_implementation, quantization=quantization
    )
    vision_config = VisionConfig(
        model=manifest["vision_model"], feature_layer=manifest["feature_layer"], dtype=manifest["vision_dtype"]
    )
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    resampler, _ = load_exported_resampler(export_dir, dtype=torch_dtype(manifest["llm_dtype"]))
    model = build_anymal(
        ModelConfig(vision=vision_config, llm=llm_config), tokenizer, device=device, resampler=resampler
    )
    if not merged:
        model.llm = load_adapter(model.llm, export_dir / manifest["adapter"])
    model.resampler.to(device)
    model.vision.to(device)
    if quantization == "none":
        model.llm.to(device)
    model.eval()
    log.info("stage-2 model from %s (step %s%s)", export_dir, manifest["step"], ", merged" if merged else "")
    return model, tokenizer, manifest
