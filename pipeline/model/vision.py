"""The frozen vision tower: an HF CLIP or SigLIP vision model loaded by hub id or local path.

Stage 1 reads one hidden layer of it: [B, 257, 1024] for CLIP ViT-L/14 at 224 px (256 patches plus CLS), [B, 729,
1152] for SigLIP(2) so400m/14 at 384 px (27 x 27 patches; SigLIP has no CLS token). The token count and width come
from the tower itself, never from the recipe. Layers after the chosen one are dropped at load time, and so is
SigLIP's attention-pooling head: they would cost compute and memory and never be read.

`TOWERS` is the one place that knows the families: a family is the vision-model class that loads the tower alone
out of a full checkpoint (image and text towers, as the Hub publishes CLIP and SigLIP). Adding one is an entry there.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline.common.dtypes import torch_dtype
from pipeline.config import VisionConfig

log = logging.getLogger(__name__)


def _clip():
    from transformers import CLIPVisionModel

    return CLIPVisionModel


def _siglip():
    from transformers import SiglipVisionModel

    return SiglipVisionModel


# model_type of a full or vision-only checkpoint, without "_vision_model", to its vision-model class. SigLIP2's
# fixed-resolution checkpoints (google/siglip2-so400m-patch14-384 and the other -patchN-SIZE ones) are "siglip".
TOWERS = {"clip": _clip, "siglip": _siglip}


class UnsupportedTower(ValueError):
    """A vision checkpoint of a family the pipeline does not load; the message names the supported ones."""


def tower_family(model_type: str) -> str:
    """The `TOWERS` key of a config's model_type, or `UnsupportedTower` saying what to use instead."""
    family = model_type.removesuffix("_vision_model")
    if family in TOWERS:
        return family
    if family == "siglip2":
        raise UnsupportedTower(
            "model.vision.model is a SigLIP2 NaFlex checkpoint (model_type siglip2): it gives a different number of "
            "patches per image; use a fixed-resolution SigLIP2 such as google/siglip2-so400m-patch14-384"
        )
    raise UnsupportedTower(
        f"model.vision.model has model_type '{model_type}'; supported towers: {', '.join(sorted(TOWERS))} "
        "(pipeline/model/vision.py TOWERS)"
    )


def vision_config_of(config):
    """The vision tower's settings in a full (image + text) or vision-only model config."""
    return getattr(config, "vision_config", None) or config


class VisionTower(nn.Module):
    """Frozen encoder that returns the hidden states of `feature_layer` (negative counts from the end)."""

    def __init__(self, encoder: nn.Module, feature_layer: int):
        super().__init__()
        num_layers = encoder.config.num_hidden_layers
        # hidden_states has num_layers + 1 entries (the embeddings first), so layer -1 is the last block.
        index = hidden_state_index(feature_layer, num_layers)
        if not 0 <= index <= num_layers:
            raise ValueError(
                f"model.vision.feature_layer={feature_layer} is out of range for a {num_layers}-layer tower; "
                f"use a value in [-{num_layers + 1}, {num_layers}]"
            )
        # transformers 5 flattened the vision models; 4.x nests them under .vision_model.
        body = getattr(encoder, "vision_model", encoder)
        del body.encoder.layers[index:]
        if getattr(body, "use_head", False):  # SigLIP's pooling head reads the last layer, which is not kept
            body.use_head = False
            del body.head
        self.encoder = encoder
        self.index = index
        self.width = encoder.config.hidden_size
        self.tokens = body.embeddings.num_positions  # patches, plus CLS where the family has one
        self.signature = tower_signature(encoder.config)
        self.requires_grad_(False)
        self.eval()

    @property
    def clip(self) -> nn.Module:
        """The encoder under the name that training's FLOP count and the HF export read it by."""
        return self.encoder

    def train(self, mode: bool = True):
        # Always in eval mode: the tower is frozen, whatever the surrounding module is switched to.
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(dtype=self.encoder.dtype)
        outputs = self.encoder(pixel_values=pixel_values, output_hidden_states=True)
        return outputs.hidden_states[self.index]


def load_vision_tower(config: VisionConfig) -> VisionTower:
    from transformers import AutoConfig

    family = tower_family(AutoConfig.from_pretrained(config.model).model_type)
    encoder = TOWERS[family]().from_pretrained(config.model, dtype=torch_dtype(config.dtype))
    tower = VisionTower(encoder, config.feature_layer)
    log.info(
        "vision tower %s (%s): hidden layer %d of %d, %d tokens of width %d",
        config.model,
        family,
        tower.index,
        encoder.config.num_hidden_layers,
        tower.tokens,
        tower.width,
    )
    return tower


def tower_width(model: str) -> int:
    """The hidden size of a vision checkpoint's tower, from its config alone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    tower_family(config.model_type)
    return vision_config_of(config).hidden_size


def tower_signature(config) -> dict:
    """What makes two towers' features interchangeable, from a (full or vision-only) model config: the family and
    the architecture. A feature cache records it, so that training can refuse features of another tower even when
    the same tower is reached by another path."""
    vision = vision_config_of(config)
    return {
        "family": tower_family(config.model_type),
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "hidden_size": vision.hidden_size,
        "num_hidden_layers": vision.num_hidden_layers,
    }


def hidden_state_index(feature_layer: int, num_layers: int) -> int:
    """The hidden_states index `feature_layer` names in a tower of `num_layers` layers (negative: from the end)."""
    return feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
