"""The frozen causal LM (LLaMA-3-8B-Instruct by default), loaded through `AutoModelForCausalLM`."""

from __future__ import annotations

import importlib.util
import logging

from transformers import AutoModelForCausalLM, PreTrainedModel

from pipeline.config import LLMConfig
from pipeline.model.vision import torch_dtype

log = logging.getLogger(__name__)


def check_attn_implementation(name: str) -> None:
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise RuntimeError(
            "model.llm.attn_implementation=flash_attention_2 but flash-attn is not installed; "
            "pip install -r requirements-gpu.txt, or use sdpa"
        )


def load_llm(config: LLMConfig) -> PreTrainedModel:
    check_attn_implementation(config.attn_implementation)
    llm = AutoModelForCausalLM.from_pretrained(
        config.model, dtype=torch_dtype(config.dtype), attn_implementation=config.attn_implementation
    )
    llm.requires_grad_(False)
    llm.eval()
    log.info("LLM %s: %.2fB parameters, %s attention", config.model, llm.num_parameters() / 1e9,
             config.attn_implementation)
    return llm
