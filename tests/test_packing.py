"""Packed and padded layouts give the same loss and resampler gradients (fp32)."""

import torch
from transformers import AutoTokenizer

from pipeline.config import ModelConfig
from pipeline.model.anymal import IGNORE_INDEX, build_anymal, packed_caption_sequence


def test_packed_layout_restarts_positions_and_labels_only_captions():
    captions = [[5, 6, 2], [7, 2]]
    seq = packed_caption_sequence(torch.tensor([5, 6, 2, 7, 2]), torch.tensor([3, 2]), prefix_length=3, bos_id=1)
    assert seq.input_ids[0].tolist() == [1, 1, 1, 1, 5, 6, 2, 1, 1, 1, 1, 7, 2]  # prefix slots hold BOS ids
    assert seq.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5]
    assert seq.prefix_positions.tolist() == [1, 2, 3, 8, 9, 10]
    assert seq.labels[0][seq.labels[0] != IGNORE_INDEX].tolist() == [t for c in captions for t in c]


def test_packed_equals_padded_loss_and_gradients(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "llm")
    config = ModelConfig()
    config.vision.model, config.vision.dtype = str(tiny_models / "clip"), "float32"
    config.llm.model, config.llm.dtype = str(tiny_models / "llm"), "float32"
    config.resampler.num_latents, config.resampler.depth, config.resampler.heads = 4, 2, 4
    config.resampler.head_dim = 16
    torch.manual_seed(0)
    model = build_anymal(config, tokenizer)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 9, 1, 6, 12])
    ids = torch.randint(0, 40, (int(lengths.sum()),), generator=generator)
    batch = {"pixel_values": torch.randn(5, 3, 64, 64, generator=generator), "caption_ids": ids,
             "caption_lengths": lengths}
    results = {}
    for packing in (False, True):
        model.packing = packing
        model.resampler.zero_grad()
        loss, tokens = model.caption_loss(batch)
        loss.backward()
        results[packing] = (loss.item(), tokens.item(),
                            {n: p.grad.clone() for n, p in model.resampler.named_parameters()})
    padded_loss, padded_tokens, padded_grads = results[False]
    packed_loss, packed_tokens, packed_grads = results[True]
    assert padded_tokens == packed_tokens == int(lengths.sum())
    assert abs(packed_loss - padded_loss) / padded_loss < 1e-5
    for name, grad in padded_grads.items():
        assert ((packed_grads[name] - grad).abs().max() / grad.abs().max()).item() < 1e-5, name
