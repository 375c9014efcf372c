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
    if config.compile_layers:
        for layer in llm.get_decoder().layers:
            layer.compile(dynamic=True)
    log.info("LLM %s: %s parameters, %s attention%s", config.model, f"{llm.num_parameters():,}",
             config.attn_implementation, ", compiled layers" if config.compile_layers else "")
    return llm
