"""The frozen causal LM (LLaMA-3-8B-Instruct by default, or Qwen2.5/Qwen3 or Mistral), loaded through
`AutoModelForCausalLM`.

`LLM_FAMILIES` is the one place that knows the families: their model_type and the token that ends an assistant turn
in their chat template (generation stops there; see `pipeline.model.anymal.terminator_ids`). Everything else comes from
the checkpoint: the decoder layers from transformers, BOS and EOS from the tokenizer (a model without BOS, like Qwen,
starts stage-1 rows with the image; `pipeline.model.layout.caption_text`), the chat format from the tokenizer's
template (`pipeline.data.conversations`), LoRA's targets from the decoder's Linear layers (`pipeline.model.lora`).
Adding a family whose decoder transformers implements is an entry here, plus the tests' tiny model of it.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from pipeline.common.dtypes import torch_dtype
from pipeline.config import LLMConfig
from pipeline.model.attention import VARLEN, register_varlen, varlen_available

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LLMFamily:
    name: str
    # The token the chat template closes an assistant turn with, where it is not the tokenizer's EOS in every
    # release (LLaMA-3's EOS has been <|end_of_text|>; Qwen base models' EOS is <|endoftext|>).
    end_of_turn: tuple[str, ...] = ()


LLM_FAMILIES = {
    "llama": LLMFamily("LLaMA-3.x", ("<|eot_id|>",)),
    "qwen2": LLMFamily("Qwen2.5", ("<|im_end|>",)),
    "qwen3": LLMFamily("Qwen3", ("<|im_end|>",)),
    "mistral": LLMFamily("Mistral"),  # [INST] ... [/INST] answer</s>: the EOS ends the turn
}


class UnsupportedLLM(ValueError):
    """An LLM of a family the pipeline has not been checked with; the message names the supported ones."""


def llm_family(model_type: str) -> LLMFamily:
    if model_type not in LLM_FAMILIES:
        raise UnsupportedLLM(
            f"model.llm.model has model_type '{model_type}'; supported: {', '.join(sorted(LLM_FAMILIES))} "
            "(pipeline/model/llm.py LLM_FAMILIES)"
        )
    return LLM_FAMILIES[model_type]


def end_of_turn_tokens() -> set[str]:
    """Every family's end-of-turn token strings (a tokenizer has at most its own family's)."""
    return {token for family in LLM_FAMILIES.values() for token in family.end_of_turn}


def sliding_window(config) -> int | None:
    """The attention window of an LLM config's sliding layers, or None when every layer attends to the whole
    sequence (Qwen2/3 set sliding_window to None unless use_sliding_window; Mistral v0.1 has 4096, later ones none)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


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
    from transformers import AutoConfig

    llm_family(AutoConfig.from_pretrained(config.model).model_type)
    quantization = quantization_config(config)
    placement = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": str(device)}}
    llm = AutoModelForCausalLM.from_pretrained(
        config.model, dtype=torch_dtype(config.dtype), attn_implementation=config.attn_implementation, **placement
    )
    llm.requires_grad_(False)
    llm.eval()
    if config.activation_checkpointing:
        checkpoint_layers(llm, compile_layers=config.compile_layers)
    elif config.compile_layers:
        for layer in llm.get_decoder().layers:
            layer.compile(dynamic=True)
    log.info(
        "LLM %s: %s parameters, %s attention%s%s%s",
        config.model,
        f"{llm.num_parameters():,}",
        config.attn_implementation,
        ", compiled layers" if config.compile_layers else "",
        f", {config.quantization} weights" if quantization is not None else "",
        ", activation checkpointing" if config.activation_checkpointing else "",
    )
    return llm


def checkpoint_layers(llm: PreTrainedModel, compile_layers: bool = False) -> None:
    """Recompute each decoder layer in the backward instead of keeping its activations (`torch.utils.checkpoint`,
    non-reentrant, so keyword arguments such as the varlen boundaries pass through and a frozen layer whose only
    input needing a gradient is the hidden state still gets one). Without gradients (evaluation, generation) the
    layer runs as it is. Wrapping the layer's own `forward` keeps the module tree, and so the parameter names that
    LoRA adapters and exports use, as it was. With `compile_layers` the checkpoint wraps the compiled forward:
    inductor's partitioner fails on a checkpoint region inside a compiled layer."""
    from torch.utils.checkpoint import checkpoint

    for layer in llm.get_decoder().layers:
        inner = torch.compile(layer.forward, dynamic=True) if compile_layers else layer.forward

        def forward(*args, _forward=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
