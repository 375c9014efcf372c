"""LLaMA's decoder layer over a packed row, spelled out: what the packed varlen forward runs instead of HF's layer.

A packed row is one [T, width] sequence of many samples (`TokenLayout`); the layers attend within each sample
through the varlen kernel (`attend_spans`). Spelling the layer out does two things HF's layer cannot:

- **Fused q/k/v** (`fuse_qkv`): a frozen layer's three projections run as one GEMM against one
  [(heads + 2 kv_heads) * head_dim, width] weight, and the three `nn.Linear` weights become views of it, so memory
  does not grow; one larger GEMM shortens stage 1's kernel time per step (docs/performance.md). Layers with
  adapters (stage 2's LoRA), quantized weights or biases cannot fuse; the packed forward then runs HF's layers
  (`AnyMAL._spelled_out_layers`).
- **The last layer at the loss rows** (`last_layer_at_rows`): the loss reads only the positions that predict a
  supervised token (in stage 1 a caption's, against the 65 BOS and image positions before them), so the last layer
  computes keys and values up to the end of each sample's loss positions, and queries, attention output, residual
  and MLP only over those positions (`LastLayerRows`). That saves ~78% of one layer of 32 in stage 1.

Both equal HF's `LlamaDecoderLayer` at the rows they return (tests/test_packing.py compares them with the padded
layout through HF's layers). `last_layer_at_rows` also serves HF's layers (stage 2, with adapters). Other layer
types run whole through HF's decoder (`supports_packed_layers`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.attention import attend_spans

PACKED_LAYERS = {"LlamaDecoderLayer": ("LlamaAttention", "LlamaMLP")}
FUSED_QKV = "fused_qkv_weight"  # a non-persistent buffer on the attention module: not in any state_dict


def supports_packed_layers(layer) -> bool:
    parts = PACKED_LAYERS.get(type(layer).__name__)
    return parts is not None and (type(layer.self_attn).__name__, type(layer.mlp).__name__) == parts


def _projections(attention) -> tuple[nn.Module, nn.Module, nn.Module]:
    return attention.q_proj, attention.k_proj, attention.v_proj


def fuse_qkv(attention) -> bool:
    """Give a frozen attention one q/k/v weight whose row blocks are its three projections' weights; True if it
    has one now. Called before every packed forward: a model moved since (`.to`) gets its weights re-joined."""
    projections = _projections(attention)
    if not all(type(p) is nn.Linear and p.bias is None and not p.weight.requires_grad for p in projections):
        return False
    fused = getattr(attention, FUSED_QKV, None)
    if fused is not None and _are_row_blocks_of(fused, [p.weight for p in projections]):
        return True
    fused = torch.cat([p.weight.detach() for p in projections])
    begin = 0
    for p in projections:
        rows = p.weight.shape[0]
        p.weight.data = fused[begin : begin + rows]  # the separate weight is freed here
        begin += rows
    attention.register_buffer(FUSED_QKV, fused, persistent=False)
    return True


def _are_row_blocks_of(fused: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    """Whether `weights` are `fused`'s consecutive row blocks (by address: this runs before every forward)."""
    address, row_bytes = fused.data_ptr(), fused.stride(0) * fused.element_size()
    for weight in weights:
        if weight.data_ptr() != address or weight.device != fused.device or weight.dtype != fused.dtype:
            return False
        address += weight.shape[0] * row_bytes
    return address == fused.data_ptr() + fused.shape[0] * row_bytes


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x [N, heads, D] with cos/sin [N, D] (LLaMA's half-split convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(x.shape[0], -1, head_dim)


def _query_key_value(attention, normed: torch.Tensor):
    fused = getattr(attention, FUSED_QKV, None)
    q_proj, k_proj, v_proj = _projections(attention)
    if fused is None:
        return q_proj(normed), k_proj(normed), v_proj(normed)
    sizes = [q_proj.out_features, k_proj.out_features, v_proj.out_features]
    return F.linear(normed, fused).split(sizes, dim=-1)


def _attention_output_and_mlp(layer, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    out = residual + layer.self_attn.o_proj(attended.flatten(1))
    return out + layer.mlp(layer.post_attention_layernorm(out))


def packed_layer(
    layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seq_lens: torch.Tensor, max_length: int
) -> torch.Tensor:
    """`layer`'s output [T, width] for the packed row `hidden` [T, width]; cos/sin [T, head_dim] are the rotary
    tables at the row's positions, `cu_seq_lens` the samples' boundaries."""
    attention = layer.self_attn
    query, key, value = (
        _heads(x, attention.head_dim) for x in _query_key_value(attention, layer.input_layernorm(hidden))
    )
    query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
    attended = attend_spans(query, key, value, cu_seq_lens, cu_seq_lens, max_length, attention.scaling)
    return _attention_output_and_mlp(layer, hidden, attended)


def last_layer_at_rows(
    layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows, max_length: int
) -> torch.Tensor:
    """`layer`'s output [Q, width] at `rows.query_positions` of the packed row `hidden` [T, width].

    cos/sin [T, head_dim] are the rotary tables at the row's positions; `rows` a `LastLayerRows`. Queries and keys
    come from different rows, so the projections run separately (on views of the fused weight, if there is one).
    """
    attention = layer.self_attn
    q_proj, k_proj, v_proj = _projections(attention)
    normed = layer.input_layernorm(hidden)
    keys_in = normed.index_select(0, rows.key_positions)
    queries_in = normed.index_select(0, rows.query_positions)
    query = _heads(q_proj(queries_in), attention.head_dim)
    key = _heads(k_proj(keys_in), attention.head_dim)
    value = _heads(v_proj(keys_in), attention.head_dim)
    query = _rotate(query, cos.index_select(0, rows.query_positions), sin.index_select(0, rows.query_positions))
    key = _rotate(key, cos.index_select(0, rows.key_positions), sin.index_select(0, rows.key_positions))
    attended = attend_spans(query, key, value, rows.cu_query, rows.cu_key, max_length, attention.scaling)
    return _attention_output_and_mlp(layer, hidden.index_select(0, rows.query_positions), attended)
