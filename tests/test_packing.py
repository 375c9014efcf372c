"""Packed and padded layouts give the same loss and resampler gradients (fp32), under SDPA's block-diagonal mask
and under the varlen attention's sample boundaries (on the CPU its SDPA fallback reads the same boundaries)."""

import pytest
import torch
from transformers import AutoTokenizer

from pipeline.config import ModelConfig
from pipeline.model.anymal import IGNORE_INDEX, build_anymal, packed_caption_sequence
from pipeline.model.llama_layers import FUSED_QKV, fuse_qkv


def test_packed_layout_restarts_positions_and_labels_only_captions():
    captions = [[5, 6, 2], [7, 2]]
    seq = packed_caption_sequence(torch.tensor([5, 6, 2, 7, 2]), torch.tensor([3, 2]), prefix_length=3, bos_id=1)
    assert seq.input_ids[0].tolist() == [1, 1, 1, 1, 5, 6, 2, 1, 1, 1, 1, 7, 2]  # prefix slots hold BOS ids
    assert seq.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5]
    assert seq.prefix_positions.tolist() == [1, 2, 3, 8, 9, 10]
    assert seq.labels[0][seq.labels[0] != IGNORE_INDEX].tolist() == [t for c in captions for t in c]


@pytest.mark.parametrize(
    "attn,prune,packed_layers",
    [("sdpa", False, False), ("varlen", False, True), ("varlen", True, True), ("varlen", True, False)],
)
def test_packed_equals_padded_loss_and_gradients(tiny_models, attn, prune, packed_layers, monkeypatch):
    """With varlen, `packed_layers` runs LLaMA's layers spelled out, with q/k/v fused
    (`pipeline/model/llama_layers.py`), else HF's layers; `prune` runs the last layer only at the rows the loss
    reads. Padded rows always go through HF's layers, so each packed path is checked against them."""
    import pipeline.model.anymal as anymal

    pruned_calls = []
    full_layer = anymal.last_layer_at_rows
    monkeypatch.setattr(anymal, "last_layer_at_rows", lambda *args: pruned_calls.append(1) or full_layer(*args))
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
    model.prune_last_layer, model.packed_layers = prune, packed_layers
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
    assert len(pruned_calls) == (1 if prune else 0)
    fused = [hasattr(layer.self_attn, FUSED_QKV) for layer in model.llm.get_decoder().layers]
    assert fused == [attn == "varlen" and packed_layers] * len(fused)
    padded_loss, padded_tokens, padded_grads = results[False]
    packed_loss, packed_tokens, packed_grads = results[True]
    assert padded_tokens == packed_tokens == int(lengths.sum())
    assert abs(packed_loss - padded_loss) / padded_loss < 1e-5
    for name, grad in padded_grads.items():
        assert ((packed_grads[name] - grad).abs().max() / grad.abs().max()).item() < 1e-5, name


def test_packed_layout_boundaries_and_last_layer_rows():
    from pipeline.model.anymal import last_layer_rows

    seq = packed_caption_sequence(torch.tensor([5, 6, 2, 7, 2]), torch.tensor([3, 2]), prefix_length=3, bos_id=1)
    assert seq.cu_seq_lens.tolist() == [0, 7, 13] and seq.cu_seq_lens.dtype == torch.int32
    # Positions 3-5 predict the first caption, 10-11 the second.
    assert seq.loss_positions.tolist() == [3, 4, 5, 10, 11] and seq.targets.tolist() == [5, 6, 2, 7, 2]
    rows = last_layer_rows(seq.loss_positions, seq.cu_seq_lens[:-1].long())
    assert rows.query_positions.tolist() == [3, 4, 5, 10, 11]
    assert rows.key_positions.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11]  # each sample's last token sees none
    assert rows.cu_query.tolist() == [0, 3, 5] and rows.cu_key.tolist() == [0, 6, 11]
    assert rows.loss_rows.tolist() == [0, 1, 2, 3, 4]


def test_last_layer_rows_of_a_sample_with_a_gap_and_one_with_nothing_to_predict():
    from pipeline.model.anymal import last_layer_rows

    # Samples start at 0, 6 and 9; the first predicts at 2 and 4 (not 3), the second nothing, the third at 10.
    rows = last_layer_rows(torch.tensor([2, 4, 10]), torch.tensor([0, 6, 9]))
    assert rows.query_positions.tolist() == [2, 3, 4, 10]
    assert rows.key_positions.tolist() == [0, 1, 2, 3, 4, 9, 10]
    assert rows.cu_query.tolist() == [0, 3, 3, 4] and rows.cu_key.tolist() == [0, 5, 5, 7]
    assert rows.loss_rows.tolist() == [0, 2, 3]


def test_span_mask_aligns_each_query_span_with_the_end_of_its_key_span():
    from pipeline.model.attention import _span_mask

    # Sample 0: 2 queries over 4 keys; sample 1: 1 query over 2 keys.
    mask = _span_mask(torch.tensor([0, 2, 3]), torch.tensor([0, 4, 6]))
    assert mask.int().tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]]
    equal = _span_mask(torch.tensor([0, 2, 3]), torch.tensor([0, 2, 3]))
    assert equal.int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


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


def test_fused_qkv_weights_are_views_and_follow_a_move(tiny_models, tmp_path):
    """Fusing keeps one copy of q/k/v (the projections' weights become its row blocks), keeps the state_dict as it
    was (and save_pretrained's checkpoint), re-joins after the model is moved, and leaves adapted or trainable
    projections alone."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(tiny_models / "llm", dtype=torch.float32).requires_grad_(False)
    attention = llm.get_decoder().layers[0].self_attn
    before = {name: tensor.clone() for name, tensor in llm.state_dict().items()}
    assert fuse_qkv(attention)
    fused = getattr(attention, FUSED_QKV)
    q_rows = attention.q_proj.weight.shape[0]
    assert attention.q_proj.weight.data_ptr() == fused.data_ptr()
    assert attention.k_proj.weight.data_ptr() == fused[q_rows:].data_ptr()
    after = llm.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    llm.save_pretrained(tmp_path / "fused")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32).state_dict()
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in before.items())
    llm.to(torch.float64)  # moves the buffer and the weights apart
    assert fuse_qkv(attention) and getattr(attention, FUSED_QKV).dtype == torch.float64
    assert (
        attention.v_proj.weight.data_ptr() == getattr(attention, FUSED_QKV)[-attention.v_proj.out_features :].data_ptr()
    )
    other = llm.get_decoder().layers[1].self_attn
    other.k_proj.weight.requires_grad_(True)
    assert not fuse_qkv(other) and not hasattr(other, FUSED_QKV)
