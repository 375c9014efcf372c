"""AnyMAL for images as a transformers model: vision tower -> Perceiver Resampler -> image tokens in a causal LLM.

The processor (`processing_anymal.py`) writes `num_image_tokens` copies of `config.image_token_id` where the image
goes; that id is past the LLM's vocabulary (no text gives it, and no tokenizer needs an image token), and this model
replaces those positions' embeddings with the resampler's output, in order, one image per row. Generation hands the
embeddings alone to the LLM's own `generate`, which is how the model was run in training and evaluation, so greedy
answers match it token for token. The returned sequences start with the prompt's ids, as for any decoder-only model:
decode `sequences[:, input_ids.shape[1]:]` for the answer (`processor.decode_answers`).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_anymal import AnyMALConfig


class PerceiverAttention(nn.Module):
    """The latents' queries attend to keys and values of the features and latents together (pre-norm)."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm_features = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(width, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, width, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = self.norm_latents(latents)
        context = torch.cat([self.norm_features(features), latents], dim=1)
        keys, values = self.to_kv(context).chunk(2, dim=-1)

        def split_heads(states):
            return states.view(states.shape[0], states.shape[1], self.heads, self.head_dim).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split_heads(self.to_q(latents)), split_heads(keys), split_heads(values)
        )
        attended = attended.transpose(1, 2).flatten(2)
        return self.to_out(attended)


class PerceiverFeedForward(nn.Sequential):
    def __init__(self, width: int, mult: int):
        super().__init__(
            nn.LayerNorm(width),
            nn.Linear(width, width * mult, bias=False),
            nn.GELU(),
            nn.Linear(width * mult, width, bias=False),
        )


class PerceiverResampler(nn.Module):
    """A fixed set of learned latents reads the vision features through `depth` residual blocks of cross-attention
    and feed-forward; a norm and a linear map then give [batch, num_latents, LLM width]."""

    def __init__(self, config: AnyMALConfig):
        super().__init__()
        vision_width, width = config.vision_config.hidden_size, config.resampler_inner_width
        self.project_in = nn.Linear(vision_width, width) if width != vision_width else nn.Identity()
        self.latents = nn.Parameter(torch.zeros(config.num_image_tokens, width))
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(width, config.resampler_heads, config.resampler_head_dim),
                    PerceiverFeedForward(width, config.resampler_ff_mult),
                ]
            )
            for _ in range(config.resampler_depth)
        )
        self.norm = nn.LayerNorm(width)
        self.to_llm = nn.Linear(width, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.project_in(features)
        latents = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1)
        for attention, feed_forward in self.layers:
            latents = latents + attention(features, latents)
            latents = latents + feed_forward(latents)
        return self.to_llm(self.norm(latents))


class AnyMALPreTrainedModel(PreTrainedModel):
    config_class = AnyMALConfig
    base_model_prefix = "anymal"
    input_modalities = ("image", "text")
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The towers add their own layer classes to this when the model is built.
    _no_split_modules = ["PerceiverResampler"]

    def _init_weights(self, module):
        # Exported weights overwrite everything; this only gives freshly built models sane values.
        if isinstance(module, PerceiverResampler):
            nn.init.normal_(module.latents, std=0.02)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class AnyMALForConditionalGeneration(AnyMALPreTrainedModel, GenerationMixin):
    """Vision tower + Perceiver Resampler + causal LLM. `forward` gives the LLM's outputs (logits, loss with
    `labels`); `generate` answers or captions."""

    def __init__(self, config: AnyMALConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.resampler = PerceiverResampler(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if model.config.adapter:
            model.load_lora_adapter(pretrained_model_name_or_path, kwargs)
        return model

    def load_lora_adapter(self, source, loading_kwargs: dict | None = None) -> None:
        """Put the LoRA adapter of `source`/`config.adapter` (peft format) on the LLM, as training ran it."""
        try:
            from peft import PeftModel
        except ImportError:
            raise ImportError(
                "this model keeps its LoRA adapter apart from the base weights (peft format); install peft, or load "
                "an export written with --merge"
            ) from None
        options = {
            key: value
            for key, value in (loading_kwargs or {}).items()
            if key in ("cache_dir", "revision", "token", "local_files_only", "force_download")
        }
        if os.path.isdir(str(source)):
            self.language_model = PeftModel.from_pretrained(
                self.language_model, os.path.join(str(source), self.config.adapter), **options
            )
        else:
            self.language_model = PeftModel.from_pretrained(
                self.language_model, str(source), subfolder=self.config.adapter, **options
            )
        self.language_model.eval()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, num_image_tokens, LLM width]: the resampler's tokens of the tower's last kept hidden layer."""
        tower_dtype = next(self.vision_tower.parameters()).dtype
        hidden = self.vision_tower(pixel_values=pixel_values.to(tower_dtype), output_hidden_states=True)
        # The tower was cut after the feature layer; hidden_states[-1] is that layer's output before any final norm.
        features = hidden.hidden_states[-1]
        resampler_dtype = self.resampler.latents.dtype
        return self.resampler(features.to(resampler_dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings of `input_ids` with each row's image tokens replaced by its image's resampler tokens."""
        image_slots = input_ids == self.config.image_token_id
        # The image id has no row of the embedding table; its positions are overwritten below.
        embeddings = self.get_input_embeddings()(input_ids.masked_fill(image_slots, 0))
        if pixel_values is None:
            if image_slots.any():
                raise ValueError("input_ids hold image tokens but no pixel_values were given")
            return embeddings
        image_tokens = self.get_image_features(pixel_values)
        expected = image_tokens.shape[0] * image_tokens.shape[1]
        if int(image_slots.sum()) != expected:
            raise ValueError(
                f"input_ids hold {int(image_slots.sum())} image tokens, but {image_tokens.shape[0]} image(s) give "
                f"{expected}; build the inputs with the model's processor (one image per text)"
            )
        mask = image_slots.unsqueeze(-1).expand_as(embeddings)
        return embeddings.masked_scatter(mask, image_tokens.to(embeddings.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """Generate after the prompt (with its image); the stop tokens, padding and defaults come from
        generation_config.json unless given here. Returns the prompt's ids followed by the new tokens (with
        `return_dict_in_generate`, the output's `sequences` are)."""
        if input_ids is None:
            raise ValueError("generate needs input_ids; build them with the model's processor")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # generation_config.json's settings, updated by the ones given here; the rest are the LLM's model kwargs.
        generation_config = copy.deepcopy(kwargs.pop("generation_config", None) or self.generation_config)
        model_kwargs = generation_config.update(**kwargs)
        # Embeddings alone, as the pipeline generates: the LLM never sees the image id, which has no embedding row,
        # and it returns the new tokens only.
        output = self.language_model.generate(
            inputs_embeds=self.embed(input_ids, pixel_values),
            attention_mask=attention_mask,
            generation_config=generation_config,
            **model_kwargs,
        )
        new_tokens = output.sequences if hasattr(output, "sequences") else output
        sequences = torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=1)
        if hasattr(output, "sequences"):
            output.sequences = sequences
            return output
        return sequences


__all__ = ["AnyMALForConditionalGeneration", "AnyMALPreTrainedModel"]
