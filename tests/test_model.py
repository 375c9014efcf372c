"""Model shapes on the real 8B recipes (meta device, no weights) and the caption label layout."""

from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from pipeline.common.labels import IGNORE_INDEX
from pipeline.config import load_config
from pipeline.model.anymal import build_resampler
from pipeline.model.layout import caption_sequence
from pipeline.model.reference import CLIP_VIT_L14, llama3_8b_config, qwen3_8b_config, siglip2_so400m_384_config

ROOT = Path(__file__).resolve().parents[1]


def test_real_recipe_shapes_on_meta_device():
    """The 8B recipe builds an 8.03B-parameter LLM, and its resampler maps [B,257,1024] to [B,64,4096]."""
    config = load_config(ROOT / "configs/stage1_8b.yaml")
    with torch.device("meta"):
        llm = LlamaForCausalLM(llama3_8b_config())
        resampler = build_resampler(config.model, CLIP_VIT_L14["hidden_size"], llm.config.hidden_size)
        prefix = resampler(torch.empty(2, 257, 1024))
    n_llm = sum(p.numel() for p in llm.parameters())
    assert round(n_llm / 1e9, 2) == 8.03, n_llm
    assert tuple(prefix.shape) == (2, 64, 4096)
    n_resampler = sum(p.numel() for p in resampler.parameters())
    # Inner width 1024 by default: ~80M, not the 1.6B of a 4096-wide connector.
    assert 70e6 < n_resampler < 90e6, n_resampler


def test_siglip2_qwen3_recipe_shapes_on_meta_device():
    """SigLIP2-so400m at 384 px gives [729, 1152] (27 x 27 patches, no CLS) from its penultimate layer; the recipe's
    resampler maps them to 64 tokens of Qwen3-8B's width 4096; Qwen3-8B has 8.19B parameters and no sliding window."""
    from transformers import Qwen3ForCausalLM, SiglipVisionModel

    from pipeline.model.llm import sliding_window
    from pipeline.model.vision import VisionTower

    config = load_config(ROOT / "configs/stage1_siglip2_qwen3_8b.yaml")
    with torch.device("meta"):
        tower = VisionTower(SiglipVisionModel(siglip2_so400m_384_config()), config.model.vision.feature_layer)
        llm = Qwen3ForCausalLM(qwen3_8b_config())
        resampler = build_resampler(config.model, tower.width, llm.config.hidden_size)
        features = tower(torch.empty(2, 3, 384, 384))
        prefix = resampler(features)
    assert (tower.tokens, tower.width) == (729, 1152) and tuple(features.shape) == (2, 729, 1152)
    assert len(tower.encoder.encoder.layers) == 26 and not hasattr(tower.encoder, "head")
    assert tuple(prefix.shape) == (2, 64, 4096)
    assert round(sum(p.numel() for p in llm.parameters()) / 1e9, 2) == 8.19
    assert sliding_window(llm.config) is None


def test_mfu_counts_the_body_at_every_token_and_the_head_at_supervised_tokens():
    from pipeline.training.metrics import llm_flop_parameters, step_flops
    from pipeline.training.stages import parameter_count

    with torch.device("meta"):
        llm = LlamaForCausalLM(llama3_8b_config())
    n_body, n_head = llm_flop_parameters(llm, parameter_count)
    assert n_head == 128256 * 4096
    assert n_body == parameter_count(llm) - 2 * 128256 * 4096  # untied: embedding and head both left out
    assert round(n_body / 1e9, 2) == 6.98
    # One sample: BOS + 64 image tokens + 18 caption tokens, 18 of them supervised, 64 latents.
    flops = step_flops(n_body, n_head, 80_000_000, 0, 83, 18, 1, 64, 0)
    assert flops == 4 * n_body * 83 + 4 * n_head * 18 + 6 * 80_000_000 * 64


def test_only_caption_tokens_and_eos_carry_labels():
    """BOS and the image prefix are never supervised; each caption token and its EOS is."""
    bos, eos, pad, latents = 1, 2, 0, 4
    captions = [[5, 6, eos], [7, eos], [8, 9, 10, 11, eos]]
    ids = torch.tensor([t for c in captions for t in c])
    lengths = torch.tensor([len(c) for c in captions])
    seq = caption_sequence(ids, lengths, latents, bos, pad)
    start = 1 + latents
    for row, caption in enumerate(captions):
        assert seq.input_ids[row, 0] == bos
        supervised = seq.labels[row][seq.labels[row] != IGNORE_INDEX].tolist()
        assert supervised == caption  # caption tokens then EOS, in order, nothing else
        assert (seq.labels[row, :start] == IGNORE_INDEX).all()
        assert seq.labels[row, start : start + len(caption)].tolist() == caption
        assert seq.attention_mask[row].sum() == start + len(caption)
    assert seq.input_ids.shape[1] == start + 5
