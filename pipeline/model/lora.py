"""Stage 2's LoRA adapters on the LLM (peft), over bf16 or 4-bit NF4 base weights (QLoRA).

`add_lora` puts fresh adapters on the projections the config names, or with `all-linear` (the default) on every
Linear layer of the decoder whatever its family calls them (peft finds them, leaving out the LM head): q/k/v/o and
gate/up/down in LLaMA, Qwen and Mistral; `adapter_modules` lists the adapters' own
Linear layers (what trains inside the LLM, and all that the optimizer and DeepSpeed may see of it);
`load_adapter` puts a trained adapter directory (peft format) on a base LLM for inference or merging.
"""

from __future__ import annotations

from torch import nn

from pipeline.config import LoRAConfig

ALL_LINEAR = "all-linear"


def add_lora(llm, config: LoRAConfig):
    """Wrap `llm` in a peft model with fresh adapters (B = 0, so the model's output is unchanged at first)."""
    from peft import LoraConfig, get_peft_model

    targets = list(config.target_modules)
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        # peft resolves the string, not a list holding it.
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(llm, lora)


def has_adapters(llm) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(layer, LoraLayer) for layer in llm.modules())


def adapter_modules(llm) -> list[nn.Module]:
    """The lora_A and lora_B Linear layers of every adapted projection, in model order."""
    from peft.tuners.lora import LoraLayer

    modules = []
    for layer in llm.modules():
        if isinstance(layer, LoraLayer):
            for adapter in layer.active_adapters:
                modules += [layer.lora_A[adapter], layer.lora_B[adapter]]
    if not modules:
        raise RuntimeError("the LLM has no LoRA adapters; call add_lora or load_adapter first")
    return modules


def load_adapter(llm, adapter_dir, trainable: bool = False):
    """A base LLM with the trained adapter of `adapter_dir` (peft's adapter_config.json + adapter weights)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(llm, str(adapter_dir), is_trainable=trainable)
