"""Configuration of an AnyMAL image-text model: a vision tower, a Perceiver Resampler and a causal LLM.

The vision tower is stored cut after the layer the resampler reads, so its last hidden state is the feature.
`task` says what the model was trained for: "caption" (stage 1: BOS where the LLM has one, image tokens, then the
caption) or "chat" (stage 2: the LLM's chat template with the image tokens in the first user turn, or where the
conversation marks the image). `image_token_id` is the id that stands for an image token in `input_ids`: past the
LLM's vocabulary, so no text gives it. `adapter` names the subfolder of a LoRA adapter in peft format that loading
puts on the LLM, or is None when the weights already hold it (merged).

The class is written the classic way, an explicit `__init__` that builds the sub-configs itself, because every
transformers release the export supports takes that form; the declarative sub-config specs of recent releases do
not exist in older ones.
"""

from transformers import AutoConfig, PretrainedConfig

TASKS = ("chat", "caption")


def _sub_config(value, default_model_type: str) -> PretrainedConfig:
    """A sub-config from a config, a dict (its `model_type` picks the class) or None (that type's defaults)."""
    if isinstance(value, PretrainedConfig):
        return value
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"a sub-config is a dict, a PretrainedConfig or None, not {type(value).__name__}")
    values = dict(value or {})
    model_type = values.pop("model_type", None) or default_model_type
    return AutoConfig.for_model(model_type, **values)


class AnyMALConfig(PretrainedConfig):
    model_type = "anymal"
    # transformers walks these for per-part settings (attention implementation, dtype) and nested serialization.
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        num_image_tokens: int = 64,
        resampler_depth: int = 6,
        resampler_heads: int = 16,
        resampler_head_dim: int = 64,
        resampler_width: int | None = None,
        resampler_ff_mult: int = 4,
        image_token_id: int = 0,
        task: str = "chat",
        adapter: str | None = None,
        **kwargs,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be 'chat' or 'caption', not {task!r}")
        # Set before the base initialiser, which already propagates the attention implementation to them.
        self.vision_config = _sub_config(vision_config, "clip_vision_model")
        self.text_config = _sub_config(text_config, "llama")
        self.num_image_tokens = num_image_tokens
        self.resampler_depth = resampler_depth
        self.resampler_heads = resampler_heads
        self.resampler_head_dim = resampler_head_dim
        self.resampler_width = resampler_width
        self.resampler_ff_mult = resampler_ff_mult
        self.image_token_id = image_token_id
        self.task = task
        self.adapter = adapter
        # The LLM alone decides whether its embeddings are tied; a stored value must not contradict it.
        kwargs.pop("tie_word_embeddings", None)
        super().__init__(**kwargs)
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    @property
    def resampler_inner_width(self) -> int:
        return self.resampler_width or self.vision_config.hidden_size
