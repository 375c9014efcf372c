"""Published architecture values of the real backbones, for building them with random weights and no download:
the CLIP ViT-L/14 + LLaMA-3-8B recipe, the SigLIP2-so400m-384 + Qwen3-8B one, and LLaMA-3-70B for sizing stage 1
with a larger frozen LLM.

Benchmarks and shape tests use these; training always loads the real weights by hub id or path.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, Qwen3Config, SiglipVisionConfig

# meta-llama/Meta-Llama-3-8B-Instruct, config.json as released.
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128009,
)

# meta-llama/Meta-Llama-3-70B-Instruct, config.json as released: the 8B's vocabulary, rotary and norm settings at
# twice the width, twice the heads (the same 8 key/value heads) and 80 layers; 70.55B parameters.
LLAMA3_70B = dict(
    LLAMA3_8B,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    torch_dtype="bfloat16",
)

# openai/clip-vit-large-patch14, vision_config.
CLIP_VIT_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)


def llama3_8b_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**LLAMA3_8B, **overrides})


def llama3_70b_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**LLAMA3_70B, **overrides})


def clip_vit_l14_config(**overrides) -> CLIPVisionConfig:
    return CLIPVisionConfig(**{**CLIP_VIT_L14, **overrides})


# Qwen/Qwen3-8B, config.json as released: 8.19B parameters, 36 layers with q/k RMSNorm, no sliding window (its
# use_sliding_window is false), untied embeddings. Its tokenizer has no BOS; <|im_end|> ends a turn.
QWEN3_8B = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    attention_bias=False,
    tie_word_embeddings=False,
    use_sliding_window=False,
    bos_token_id=151643,
    eos_token_id=151645,
)

# google/siglip2-so400m-patch14-384, vision_config (a fixed-resolution SigLIP2, loaded as a SigLIP vision model):
# (384 // 14)^2 = 729 patch tokens of width 1152, no CLS token.
SIGLIP2_SO400M_384 = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)


def qwen3_8b_config(**overrides) -> Qwen3Config:
    return Qwen3Config(**{**QWEN3_8B, **overrides})


def siglip2_so400m_384_config(**overrides) -> SiglipVisionConfig:
    return SiglipVisionConfig(**{**SIGLIP2_SO400M_384, **overrides})
