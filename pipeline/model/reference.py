"""Published architecture values of the real backbones, for building them with random weights and no download.

Benchmarks and shape tests use these; training always loads the real weights by hub id or path.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig

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


def clip_vit_l14_config(**overrides) -> CLIPVisionConfig:
    return CLIPVisionConfig(**{**CLIP_VIT_L14, **overrides})
