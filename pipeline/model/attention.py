"""`model.llm.attn_implementation=varlen`: packed rows through PyTorch's variable-length flash attention.

A packed row holds many short samples (stage 1: BOS, 64 image tokens and a caption, ~83 tokens). Flex attention
covers it with a block mask built for every step and computes the 128x128 blocks that straddle two samples;
`torch.nn.attention.varlen.varlen_attn` (the flash-attention kernel PyTorch ships, no flash-attn package needed)
takes the samples' boundaries (`cu_seq_lens`) instead and never looks across them.

The trainer's packed forward passes the boundaries as keyword arguments (`varlen_kwargs`), which transformers hands
to the attention function of every layer. The maximum sample length passed is the configured bound, not the
batch's own maximum, so it is a constant and compiled layers are not re-specialised for every batch.

Everything else falls back to SDPA: padded rows and generation (with their masks), and the CPU, where the packed
case runs SDPA under the equivalent block-diagonal mask so that the tests check the same boundaries.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

VARLEN = "varlen"


def _varlen_kernel():
    """`varlen_attn` with its causal and GQA options spelled for the installed PyTorch, or None if it has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    native_gqa = "enable_gqa" in parameters
    takes_scale = "scale" in parameters

    def attend(query, key, value, cu_seq_lens, max_length, scale):
        # query [T, H, D], key/value [T, H_kv, D]
        options = dict(causal)
        if key.shape[1] != query.shape[1]:
            if native_gqa:
                options["enable_gqa"] = True
            else:
                groups = query.shape[1] // key.shape[1]
                key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        if takes_scale:
            options["scale"] = scale
        elif abs(scale - query.shape[-1] ** -0.5) > 1e-6:
            raise RuntimeError("this PyTorch's varlen_attn has no scale argument; use flex_attention")
        return varlen_attn(query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, **options)

    return attend


_KERNEL = _varlen_kernel()


def varlen_available() -> bool:
    return _KERNEL is not None


def varlen_kwargs(sample_lengths: torch.Tensor, max_length: int) -> dict:
    """The keyword arguments that carry a packed row's sample boundaries to every attention layer."""
    cu_seq_lens = F.pad(torch.cumsum(sample_lengths, 0, dtype=torch.int32), (1, 0))
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": int(max_length),
            "max_length_k": int(max_length)}


def _block_diagonal_mask(cu_seq_lens: torch.Tensor, length: int) -> torch.Tensor:
    """[1, 1, T, T] boolean mask: causal within each sample, nothing across samples."""
    sample = torch.bucketize(torch.arange(length, device=cu_seq_lens.device), cu_seq_lens[1:], right=True)
    positions = torch.arange(length, device=cu_seq_lens.device)
    allowed = (sample[:, None] == sample[None, :]) & (positions[:, None] >= positions[None, :])
    return allowed[None, None]


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An `AttentionInterface` function. query [B, H, T, D], key/value [B, H_kv, T, D]; returns ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.pop("cu_seq_lens_q", None)
    max_length = kwargs.pop("max_length_q", None)
    for key_name in ("cu_seq_lens_k", "max_length_k"):
        kwargs.pop(key_name, None)
    if cu_seq_lens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("varlen attention takes one packed row without an attention mask")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.is_cuda and _KERNEL is not None:
        out = _KERNEL(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_seq_lens,
                      max_length, scale)
        return out[None], None
    mask = _block_diagonal_mask(cu_seq_lens, query.shape[2])
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scale, dropout=dropout, **kwargs)


def varlen_mask(attention_mask=None, **kwargs):
    """An `AttentionMaskInterface` function: no mask for packed rows (the boundaries travel as kwargs) or unpadded
    ones (causal), SDPA's mask for padded rows."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def register_varlen() -> None:
    """Make `attn_implementation="varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, varlen_mask)
