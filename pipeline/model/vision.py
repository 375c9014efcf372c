"""The frozen CLIP vision tower: an HF `CLIPVisionModel` loaded by hub id or local path.

Stage 1 reads one hidden layer of it, [B, 257, 1024] for ViT-L/14 at 224 px (256 patches plus CLS). Layers
after the chosen one are dropped at load time: they would cost compute and memory and never be read.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import CLIPVisionModel

from pipeline.common.dtypes import torch_dtype
from pipeline.config import VisionConfig

log = logging.getLogger(__name__)


class VisionTower(nn.Module):
    """Frozen CLIP encoder that returns the hidden states of `feature_layer` (negative counts from the end)."""

    def __init__(self, clip: CLIPVisionModel, feature_layer: int):
        super().__init__()
        num_layers = clip.config.num_hidden_layers
        # hidden_states has num_layers + 1 entries (the embeddings first), so layer -1 is the last block.
        index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
        if not 0 <= index <= num_layers:
            raise ValueError(
                f"model.vision.feature_layer={feature_layer} is out of range for a {num_layers}-layer CLIP; "
                f"use a value in [-{num_layers + 1}, {num_layers}]"
            )
        # transformers 5 flattened CLIPVisionModel; 4.x nests it under .vision_model.
        del getattr(clip, "vision_model", clip).encoder.layers[index:]
        self.clip = clip
        self.index = index
        self.width = clip.config.hidden_size
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # Always in eval mode: the tower is frozen, whatever the surrounding module is switched to.
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(dtype=self.clip.dtype)
        outputs = self.clip(pixel_values=pixel_values, output_hidden_states=True)
        return outputs.hidden_states[self.index]


def load_vision_tower(config: VisionConfig) -> VisionTower:
    clip = CLIPVisionModel.from_pretrained(config.model, dtype=torch_dtype(config.dtype))
    tower = VisionTower(clip, config.feature_layer)
    log.info(
        "vision tower %s: hidden layer %d of %d, width %d",
        config.model,
        tower.index,
        clip.config.num_hidden_layers,
        tower.width,
    )
    return tower
