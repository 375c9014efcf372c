"""Rebuild a trained model for inference from a run directory: its saved config plus the exported resampler."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.model.anymal import AnyMAL, build_anymal
from pipeline.training.export import load_exported_resampler


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
