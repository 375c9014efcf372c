"""Shared fixtures: tiny models saved in HF format and loaded back through `from_pretrained`, like the real ones."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


def build_tiny_models(out_dir: Path) -> Path:
    """A random tiny CLIP and a random (not pretrained) tiny Llama with the toy tokenizer, under out_dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.toy.models import build_tiny_clip, build_tokenizer, toy_vocabulary

    build_tiny_clip(out_dir / "clip", seed=0)
    tokenizer = build_tokenizer(out_dir / "llm", toy_vocabulary())
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    llm.save_pretrained(out_dir / "llm")
    return out_dir


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))
