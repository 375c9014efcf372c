"""`model.llm.attn_implementation=varlen`: packed rows through PyTorch's variable-length flash attention.

A packed row holds many short samples (stage 1: BOS, 64 image tokens and a caption, ~83 tokens). Flex attention
covers it with a block mask built for every step and computes the 128x128 blocks that straddle two samples;
`torch.nn.attention.varlen.varlen_attn` (the flash-attention kernel PyTorch ships, no flash-attn package needed)
takes the samples' boundaries (`cu_seq_lens`) instead and never looks across them.

The trainer's packed forward passes the boundaries as keyword arguments (`varlen_kwargs`), which transformers hands
to the attention function of every layer. The maximum sample length passed is the configured bound, not the
batch's own maximum, so it is a constant and compiled layers are not re-specialised for every batch.

`attend_within_samples` is the one entry to the kernel: causal attention inside each sample of the row.

Everything else falls back to SDPA: padded rows and generation (with their masks), and the CPU, where the packed
case runs SDPA under the equivalent mask (`_span_mask`) so that the tests check the same boundaries.

Every decoder transformers implements with an attention interface goes through here unchanged: LLaMA, Qwen2.5,
Qwen3 (its q_norm/k_norm run in the layer, before the interface) and Mistral. A layer with a sliding window
(Mistral v0.1's 4096 tokens, Qwen with use_sliding_window) passes it as `sliding_window`: a packed sample no longer
than the window is attended exactly, and a longer bound is refused rather than attended past the window.
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

    def attend(query, key, value, cu_query, cu_key, max_length, scale):
        # query [Q, H, D], key/value [K, H_kv, D]
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
        return varlen_attn(query, key, value, cu_query, cu_key, max_length, max_length, **options)

    return attend


_KERNEL = _varlen_kernel()


def varlen_available() -> bool:
    return _KERNEL is not None


def varlen_kwargs(cu_seq_lens: torch.Tensor, max_length: int) -> dict:
    """The keyword arguments that carry a packed row's sample boundaries to every attention layer."""
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": int(max_length),
        "max_length_k": int(max_length),
    }


def _sample_mask(cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """[T, T] boolean mask of a packed row: causal within each sample, nothing across samples."""
    cu_seq_lens = cu_seq_lens.long()
    positions = torch.arange(int(cu_seq_lens[-1]), device=cu_seq_lens.device)
    sample = torch.bucketize(positions, cu_seq_lens[1:], right=True)
    return (sample[:, None] == sample[None, :]) & (positions[None, :] <= positions[:, None])


def attend_within_samples(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention within each sample of a packed row, never across samples.

    query [T, H, D], key/value [T, H_kv, D] -> [T, H, D]. The varlen flash kernel on a GPU; elsewhere SDPA under
    the equivalent mask, so that the CPU tests check the same boundaries."""
    if query.is_cuda and _KERNEL is not None:
        return _KERNEL(query, key, value, cu_seq_lens, cu_seq_lens, max_length, scale)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None],
        key.transpose(0, 1)[None],
        value.transpose(0, 1)[None],
        attn_mask=_sample_mask(cu_seq_lens),
        scale=scale,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out[0].transpose(0, 1)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An `AttentionInterface` function. query [B, H, T, D], key/value [B, H_kv, T, D]; returns ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.pop("cu_seq_lens_q", None)
    max_length = kwargs.pop("max_length_q", None)
    for key_name in ("cu_seq_lens_k", "max_length_k"):
        kwargs.pop(key_name, None)
    if cu_seq_lens is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("varlen attention takes one packed row without an attention mask")
    check_window(kwargs.get("sliding_window"), max_length)
    if dropout:
        raise ValueError("varlen attention has no attention dropout; set the LLM's attention_dropout to 0")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend_within_samples(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_seq_lens, max_length, scale
    )
    return out[None], None


def check_window(window: int | None, max_length: int) -> None:
    """Packed samples up to `max_length` tokens fit a sliding window of `window` tokens (None: no window), so that
    attending to the whole sample is what the window would attend to."""
    if window is not None and max_length > window:
        raise ValueError(
            f"the LLM attends within a sliding window of {window} tokens, and packed samples may be {max_length} "
            "tokens long; varlen attention has no window: lower model.max_sequence_tokens (stage 2) or "
            "model.max_caption_tokens to fit, or use model.llm.attn_implementation=sdpa or flex_attention"
        )


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
