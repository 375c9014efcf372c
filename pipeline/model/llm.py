"""The frozen causal LM (LLaMA-3-8B-Instruct by default), loaded through `AutoModelForCausalLM`."""

from __future__ import annotations

import importlib.util
import logging

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from pipeline.common.dtypes import torch_dtype
from pipeline.config import LLMConfig
from pipeline.model.attention import VARLEN, register_varlen, varlen_available

log = logging.getLogger(__name__)


def check_attn_implementation(name: str) -> None:
    """Fail early on an attention implementation this environment lacks; register ours with transformers."""
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise RuntimeError(
            "model.llm.attn_implementation=flash_attention_2 but flash-attn is not installed; "
            "pip install -r requirements-gpu.txt, or use varlen, flex_attention or sdpa"
        )
    if name == VARLEN:
        if not varlen_available():
            raise RuntimeError(
                f"model.llm.attn_implementation=varlen needs torch.nn.attention.varlen (PyTorch >= 2.10), "
                f"this is {torch.__version__}; use flex_attention"
            )
        register_varlen()


def quantization_config(config: LLMConfig):
    """QLoRA's 4-bit base weights: NF4 with double quantisation, computing in the configured dtype."""
    if config.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quantization,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(config.dtype),
    )


def load_llm(config: LLMConfig, device=None) -> PreTrainedModel:
    """The frozen LLM in eval mode. A quantized LLM is loaded straight onto `device` (bitsandbytes quantizes
    while loading); an unquantized one is loaded on the CPU and moved by the caller."""
    check_attn_implementation(config.attn_implementation)
    quantization = quantization_config(config)
    placement = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": str(device)}}
    llm = AutoModelForCausalLM.from_pretrained(
        config.model, dtype=torch_dtype(config.dtype), attn_implementation=config.attn_implementation, **placement
    )
    llm.requires_grad_(False)
    llm.eval()
    if config.compile_layers:
        for layer in llm.get_decoder().layers:
            layer.compile(dynamic=True)
    log.info(
        "LLM %s: %s parameters, %s attention%s%s",
        config.model,
        f"{llm.num_parameters():,}",
        config.attn_implementation,
        ", compiled layers" if config.compile_layers else "",
        f", {config.quantization} weights" if quantization is not None else "",
    )
    return llm
