"""Packed and padded layouts give the same loss and resampler gradients (fp32), under SDPA's block-diagonal mask
and under the varlen attention's sample boundaries (on the CPU its SDPA fallback reads the same boundaries)."""

import pytest
import torch
from transformers import AutoTokenizer

from pipeline.common.labels import IGNORE_INDEX
from pipeline.config import ModelConfig
from pipeline.model.anymal import build_anymal
from pipeline.model.layout import packed_caption_sequence


def test_packed_layout_restarts_positions_and_labels_only_captions():
    captions = [[5, 6, 2], [7, 2]]
    seq = packed_caption_sequence(torch.tensor([5, 6, 2, 7, 2]), torch.tensor([3, 2]), prefix_length=3, bos_id=1)
    assert seq.input_ids[0].tolist() == [1, 1, 1, 1, 5, 6, 2, 1, 1, 1, 1, 7, 2]  # prefix slots hold BOS ids
    assert seq.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5]
    assert seq.prefix_positions.tolist() == [1, 2, 3, 8, 9, 10]
    assert seq.labels[0][seq.labels[0] != IGNORE_INDEX].tolist() == [t for c in captions for t in c]


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_packed_equals_padded_loss_and_gradients(tiny_models, attn):
    """Packed rows (under SDPA's block-diagonal mask, or through HF's layers with the varlen boundaries) give the
    padded rows' loss and resampler gradients."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "llm")
    config = ModelConfig()
    config.vision.model, config.vision.dtype = str(tiny_models / "clip"), "float32"
    config.llm.model, config.llm.dtype = str(tiny_models / "llm"), "float32"
    config.llm.attn_implementation = attn
    config.max_caption_tokens = 12
    config.resampler.num_latents, config.resampler.depth, config.resampler.heads = 4, 2, 4
    config.resampler.head_dim = 16
    torch.manual_seed(0)
    model = build_anymal(config, tokenizer)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 9, 1, 6, 12])
    ids = torch.randint(0, 40, (int(lengths.sum()),), generator=generator)
    batch = {
        "pixel_values": torch.randn(5, 3, 64, 64, generator=generator),
        "caption_ids": ids,
        "caption_lengths": lengths,
    }
    results = {}
    for packing in (False, True):
        model.packing = packing
        model.resampler.zero_grad()
        loss, tokens = model.caption_loss(batch)
        loss.backward()
        results[packing] = (
            loss.item(),
            tokens.item(),
            {n: p.grad.clone() for n, p in model.resampler.named_parameters()},
        )
    padded_loss, padded_tokens, padded_grads = results[False]
    packed_loss, packed_tokens, packed_grads = results[True]
    assert padded_tokens == packed_tokens == int(lengths.sum())
    assert abs(packed_loss - padded_loss) / padded_loss < 1e-5
    for name, grad in padded_grads.items():
        assert ((packed_grads[name] - grad).abs().max() / grad.abs().max()).item() < 1e-5, name


def test_packed_layout_boundaries_and_loss_positions():
    seq = packed_caption_sequence(torch.tensor([5, 6, 2, 7, 2]), torch.tensor([3, 2]), prefix_length=3, bos_id=1)
    assert seq.cu_seq_lens.tolist() == [0, 7, 13] and seq.cu_seq_lens.dtype == torch.int32
    # Positions 3-5 predict the first caption, 10-11 the second.
    assert seq.loss_positions.tolist() == [3, 4, 5, 10, 11] and seq.targets.tolist() == [5, 6, 2, 7, 2]


def test_sample_mask_is_causal_within_each_sample_only():
    from pipeline.model.attention import _sample_mask

    mask = _sample_mask(torch.tensor([0, 2, 3]))
    assert mask.int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_varlen_boundaries_and_bound():
    from pipeline.model.attention import varlen_kwargs

    kwargs = varlen_kwargs(torch.tensor([0, 4, 13, 15], dtype=torch.int32), max_length=16)
    assert kwargs["cu_seq_lens_q"].tolist() == kwargs["cu_seq_lens_k"].tolist() == [0, 4, 13, 15]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 16


def test_varlen_refuses_a_sample_longer_than_the_bound(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "llm")
    config = ModelConfig()
    config.vision.model, config.vision.dtype = str(tiny_models / "clip"), "float32"
    config.llm.model, config.llm.dtype = str(tiny_models / "llm"), "float32"
    config.llm.attn_implementation = "varlen"
    config.resampler.num_latents, config.resampler.depth = 4, 1
    config.max_caption_tokens = 3
    model = build_anymal(config, tokenizer)
    batch = {
        "pixel_values": torch.randn(2, 3, 64, 64),
        "caption_ids": torch.arange(6),
        "caption_lengths": torch.tensor([2, 4]),
    }
    with pytest.raises(RuntimeError, match="longer than the configured maximum"):
        model.caption_loss(batch)
