"""Finished runs on tiny models, written in seconds for the export and serving tests: a stage-1 run (config.yaml and
export/ with a resampler) and a stage-2 export (resampler, LoRA adapter, manifest), with random but non-trivial
weights, over any tower and LLM directory (the tiny CLIP + Llama of conftest, or tests/families.py's SigLIP +
Qwen3); plus toy images and what the pipeline itself generates for them: its captioner, and `python -m pipeline.chat`
run in this process."""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["what colour is the shape ?", "<image>\nhow many shapes are there ?", "is it a star ?"]


def siglip_qwen3_models(out_dir: Path) -> tuple[Path, Path]:
    """(tower, LLM) directories of a tiny SigLIP and a tiny Qwen3 with the real Qwen3 tokenizer."""
    from families import build_tiny_llm, build_tiny_siglip

    return build_tiny_siglip(out_dir / "siglip"), build_tiny_llm("qwen3", out_dir / "qwen3")


def overrides(vision: Path, llm: Path, run_dir: Path) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"model.vision.model={vision}",
        f"model.llm.model={llm}",
        "model.stage1_resampler=",
        "model.resampler.num_latents=4",
        "model.lora.r=4",
        "model.lora.dropout=0.0",
    ]


def write_stage1_run(vision: Path, llm: Path, run_dir: Path, seed: int = 1) -> Path:
    """A stage-1 run directory as training leaves it for inference: config.yaml and export/resampler.*."""
    from transformers import AutoTokenizer

    from pipeline.config import load_config, save_config, to_dict
    from pipeline.inference.export import export_resampler
    from pipeline.model.anymal import build_anymal

    config = load_config(ROOT / "configs/toy.yaml", overrides(vision, llm, run_dir))
    tokenizer = AutoTokenizer.from_pretrained(config.model.llm.model)
    torch.manual_seed(seed)
    model = build_anymal(config.model, tokenizer)
    with torch.no_grad():
        for parameter in model.resampler.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    export_resampler(model.resampler, run_dir / "export", to_dict(config)["model"], step=3)
    return run_dir


def write_stage2_run(vision: Path, llm: Path, run_dir: Path, seed: int = 3, system_prompt: str = "") -> Path:
    """A stage-2 run directory whose export/ holds a resampler, a LoRA adapter with non-zero B and a manifest."""
    from transformers import AutoTokenizer

    from pipeline.config import load_config, to_dict
    from pipeline.inference.export import export_stage2
    from pipeline.model.anymal import build_anymal
    from pipeline.model.lora import add_lora

    extra = [f"model.system_prompt={system_prompt}"] if system_prompt else []
    config = load_config(ROOT / "configs/toy_stage2.yaml", overrides(vision, llm, run_dir) + extra)
    tokenizer = AutoTokenizer.from_pretrained(config.model.llm.model)
    torch.manual_seed(seed)
    model = build_anymal(config.model, tokenizer)
    model.llm = add_lora(model.llm, config.model.lora)
    for name, parameter in model.llm.named_parameters():
        if "lora_B" in name:  # B = 0 at initialisation would make the adapter a no-op
            torch.nn.init.normal_(parameter, std=0.2)
    export_stage2(model.eval(), run_dir / "export", to_dict(config), step=7)
    return run_dir


def toy_images(out_dir: Path, count: int, seed: int = 5) -> list[Path]:
    from pipeline.toy.world import render_image, sample_attributes

    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = out_dir / f"{index}.png"
        render_image(sample_attributes(rng), rng).save(path)
        paths.append(path)
    return paths


def chat_answers(model: Path, image: Path, questions: list[str], max_new_tokens: int) -> list[str]:
    """The answers `python -m pipeline.chat` prints, one per question, stripped as the pipeline strips the answers
    it keeps (the stream shows a leading space where the first token has one): one question is asked with
    --question, several are typed at its prompt as one conversation."""
    from pipeline import chat

    args = [str(model), "--image", str(image), "--max-new-tokens", str(max_new_tokens), "--device", "cpu"]
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        if len(questions) == 1:
            args += ["--question", questions[0]]
        else:
            typed = iter([*questions, ""])
            patch.setattr("builtins.input", lambda prompt="": next(typed))
        assert chat.main(args) == 0
    return [line.strip() for line in printed.getvalue().strip().splitlines()]


def pipeline_captions(run: Path, images: list[Path], max_new_tokens: int) -> list[str]:
    """What the pipeline's captioner (evaluation and training samples) generates for a stage-1 run."""
    from pipeline.data.captions import load_image_processor
    from pipeline.inference.answering import Stage1Captioner
    from pipeline.inference.loading import load_run

    model, tokenizer, config = load_run(run, "cpu")
    captioner = Stage1Captioner(model, tokenizer, load_image_processor(config.model.vision.model), max_new_tokens)
    pictures = []
    for path in images:
        with Image.open(path) as image:
            pictures.append(image.convert("RGB"))
    return captioner(pictures, [""] * len(pictures))
