"""Configuration of an AnyMAL image-text model: a vision tower, a Perceiver Resampler and a causal LLM.

The vision tower is stored cut after the layer the resampler reads, so its last hidden state is the feature.
`task` says what the model was trained for: "caption" (stage 1: BOS, image tokens, then the caption) or "chat"
(stage 2: the LLM's chat template with the image tokens in the first user turn). `adapter` names the subfolder of a
LoRA adapter in peft format that loading puts on the LLM, or is None when the weights already hold it (merged).
"""

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec


class AnyMALConfig(PretrainedConfig):
    model_type = "anymal"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    num_image_tokens: int = 64
    resampler_depth: int = 6
    resampler_heads: int = 16
    resampler_head_dim: int = 64
    resampler_width: int | None = None
    resampler_ff_mult: int = 4
    image_token_id: int = 0
    task: str = "chat"
    adapter: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.task not in ("chat", "caption"):
            raise ValueError(f"task must be 'chat' or 'caption', not {self.task!r}")
        if self.text_config is not None:
            self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    @property
    def resampler_inner_width(self) -> int:
        return self.resampler_width or self.vision_config.hidden_size
