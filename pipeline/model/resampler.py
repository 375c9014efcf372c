"""Perceiver Resampler (Flamingo, Alayrac et al. 2022): a fixed number of learned latents read the vision features.

Each block lets the latents cross-attend to the concatenation [vision features; latents], then applies a
feed-forward layer; both are pre-norm residual branches. A final norm and a linear map the latents to the
LLM's width, so the output is a [B, num_latents, llm_width] prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PerceiverAttention(nn.Module):
    """Latents attend to [features; latents]; keys and values of both come from one projection."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm_features = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features = self.norm_features(features)
        latents = self.norm_latents(latents)
        batch = latents.shape[0]
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(batch, -1, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(batch, -1, self.heads * self.head_dim))


class FeedForward(nn.Sequential):
    def __init__(self, width: int, mult: int):
        super().__init__(
            nn.LayerNorm(width),
            nn.Linear(width, width * mult, bias=False),
            nn.GELU(),
            nn.Linear(width * mult, width, bias=False),
        )


class PerceiverResampler(nn.Module):
    """Maps vision features [B, N, vision_width] to [B, num_latents, output_width]."""

    def __init__(
        self,
        vision_width: int,
        output_width: int,
        *,
        num_latents: int = 64,
        depth: int = 6,
        heads: int = 16,
        head_dim: int = 64,
        width: int | None = None,
        ff_mult: int = 4,
    ):
        super().__init__()
        width = width or vision_width
        self.config = dict(
            vision_width=vision_width,
            output_width=output_width,
            num_latents=num_latents,
            depth=depth,
            heads=heads,
            head_dim=head_dim,
            width=width,
            ff_mult=ff_mult,
        )
        # A projection only when the inner width differs from the vision width (not in the default).
        self.project_in = nn.Linear(vision_width, width) if width != vision_width else nn.Identity()
        self.latents = nn.Parameter(torch.randn(num_latents, width) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(width, heads, head_dim), FeedForward(width, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.to_llm = nn.Linear(width, output_width)

    @property
    def num_latents(self) -> int:
        return self.latents.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.project_in(features)
        latents = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1)
        for attention, feed_forward in self.layers:
            latents = latents + attention(features, latents)
            latents = latents + feed_forward(latents)
        return self.to_llm(self.norm(latents))
