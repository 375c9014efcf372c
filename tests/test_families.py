"""Every supported backbone family on tiny random models loaded by path: the towers' own token counts and widths,
packed == padded loss and gradients (resampler and LoRA) for every LLM family, LoRA on every decoder Linear layer,
generation stopping on each family's terminators, stage-1 rows without BOS, and the families and windows refused."""

import pytest
import torch
from families import LLM_FAMILIES, build_family_models, build_tiny_llm
from transformers import AutoTokenizer, SiglipVisionModel

from pipeline.common.labels import IGNORE_INDEX
from pipeline.config import ConfigError, ModelConfig, VisionConfig, load_config
from pipeline.data.features import expected_feature_shape
from pipeline.model.anymal import build_anymal
from pipeline.model.layout import caption_sequence
from pipeline.model.llm import UnsupportedLLM, llm_family
from pipeline.model.lora import add_lora
from pipeline.model.vision import UnsupportedTower, load_vision_tower, tower_family

TERMINATORS = {
    "llama": {"<|eot_id|>", "<|end_of_text|>"},
    "qwen2": {"<|im_end|>", "<|endoftext|>"},
    "qwen3": {"<|im_end|>", "<|endoftext|>"},
    "mistral": {"</s>"},
}
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict:
    return build_family_models(tmp_path_factory.mktemp("family_models"))


@pytest.mark.parametrize("family, shape", [("clip", (65, 128)), ("siglip", (64, 96))])
def test_towers_give_their_own_token_count_and_width(family_models, family, shape):
    """CLIP's 64 patches plus CLS, SigLIP's 64 patches alone; the kept layers give the full tower's hidden state."""
    tower = load_vision_tower(VisionConfig(model=str(family_models[family]), feature_layer=-2, dtype="float32"))
    assert (tower.tokens, tower.width) == shape == expected_feature_shape(str(family_models[family]))
    pixels = torch.randn(2, 3, 64, 64)
    features = tower(pixels)
    assert tuple(features.shape) == (2, *shape)
    if family == "siglip":
        full = SiglipVisionModel.from_pretrained(family_models[family])  # the tower alone, from a full checkpoint
        expected = full(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(features, expected)
        assert not hasattr(tower.encoder, "head") and len(tower.encoder.encoder.layers) == 2


def test_unsupported_families_are_refused_with_what_to_use():
    assert tower_family("siglip_vision_model") == "siglip" and tower_family("clip") == "clip"
    with pytest.raises(UnsupportedTower, match="NaFlex.*siglip2-so400m-patch14-384"):
        tower_family("siglip2")
    with pytest.raises(UnsupportedTower, match="supported towers: clip, siglip"):
        tower_family("dinov2")
    with pytest.raises(UnsupportedLLM, match="supported: llama, mistral, qwen2, qwen3"):
        llm_family("gpt2")


def family_model(family_models, family: str, attn: str = "varlen", tower: str = "siglip", **overrides):
    config = ModelConfig()
    config.vision.model, config.vision.dtype = str(family_models[tower]), "float32"
    config.llm.model, config.llm.dtype = str(family_models[family]), "float32"
    config.llm.attn_implementation = attn
    config.max_caption_tokens = 12
    config.resampler.num_latents, config.resampler.depth, config.resampler.heads = 4, 2, 4
    config.resampler.head_dim = 16
    for key, value in overrides.items():
        setattr(config, key, value)
    tokenizer = AutoTokenizer.from_pretrained(config.llm.model)
    torch.manual_seed(0)
    return build_anymal(config, tokenizer), tokenizer, config


def caption_batch(tokenizer, lengths: list[int], seed: int = 1) -> dict:
    """Random captions of the given lengths, each ending in the tokenizer's EOS, with random 64 px images."""
    generator = torch.Generator().manual_seed(seed)
    captions = [torch.randint(0, 40, (n - 1,), generator=generator) for n in lengths]
    ids = torch.cat([torch.cat([c, torch.tensor([tokenizer.eos_token_id])]) for c in captions])
    return {
        "pixel_values": torch.randn(len(lengths), 3, 64, 64, generator=generator),
        "caption_ids": ids,
        "caption_lengths": torch.tensor(lengths),
    }


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_packed_equals_padded_loss_and_gradients_per_family(family_models, family):
    """Packed rows through varlen attention (its CPU path reads the same sample boundaries) give the padded rows'
    loss and the same gradients of the resampler and of LoRA adapters on every Linear layer."""
    model, tokenizer, config = family_model(family_models, family)
    config.lora.dropout, config.lora.r = 0.0, 4
    model.llm = add_lora(model.llm, config.lora)
    for name, param in model.llm.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a nonzero B makes A's gradient nonzero too
            torch.nn.init.normal_(param, std=0.02)
    model.freeze_for_stage2()
    batch = caption_batch(tokenizer, [3, 9, 1, 6, 12])
    results = {}
    for packing in (False, True):
        model.packing = packing
        model.zero_grad()
        loss, tokens = model.caption_loss(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[packing] = (loss.item(), tokens.item(), grads)
    (padded_loss, padded_tokens, padded_grads), (packed_loss, packed_tokens, packed_grads) = (
        results[False],
        results[True],
    )
    assert padded_tokens == packed_tokens == 31
    assert abs(packed_loss - padded_loss) / padded_loss < 1e-5
    assert any("lora_A" in name for name in padded_grads) and any(n.startswith("resampler.") for n in padded_grads)
    for name, grad in padded_grads.items():
        assert grad.abs().max() > 0, name
        assert ((packed_grads[name] - grad).abs().max() / grad.abs().max()).item() < 1e-4, name


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_lora_adapts_every_linear_layer_of_the_decoder_but_not_the_head(family_models, family):
    model, _, config = family_model(family_models, family)
    assert config.lora.target_modules == ["all-linear"]
    llm = add_lora(model.llm, config.lora)
    adapted = {name.split(".lora_A")[0] for name, _ in llm.named_parameters() if "lora_A" in name}
    layers = llm.get_base_model().config.num_hidden_layers
    assert {name.rsplit(".", 1)[1] for name in adapted} == PROJECTIONS
    assert len(adapted) == len(PROJECTIONS) * layers
    assert not any("lm_head" in name or "embed" in name for name in adapted)


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_generation_stops_on_each_of_the_family_terminators(family_models, family):
    """With the LM made to say one terminator at every step, captions and answers end after one step, empty."""
    model, tokenizer, _ = family_model(family_models, family, attn="sdpa")
    model.eval()
    ids = {tokenizer.convert_tokens_to_ids(token) for token in TERMINATORS[family]}
    assert set(model.stop_ids) == ids
    for terminator in sorted(ids):
        steps = []

        def say(module, inputs, logits, terminator=terminator, steps=steps):
            steps.append(1)
            forced = torch.zeros_like(logits)
            forced[..., terminator] = 1e4
            return logits + forced

        hook = model.llm.get_output_embeddings().register_forward_hook(say)
        try:
            batch = {"image_features": torch.randn(2, 64, 96)}
            assert model.generate_captions(batch, max_new_tokens=5) == [[], []]
            prompt = tokenizer("what colour is the shape ?", add_special_tokens=False).input_ids
            assert model.generate(batch, [prompt, prompt[:2]], [0, 1], max_new_tokens=5) == [[], []]
            assert len(steps) == 2
        finally:
            hook.remove()


def test_stage1_rows_of_a_model_without_bos_start_with_the_image(family_models):
    """Qwen has no BOS: a row is the image tokens, the caption and EOS, and captions are generated from the image."""
    model, tokenizer, _ = family_model(family_models, "qwen3")
    assert model.bos_id is None and model.eos_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = model.eos_id
    captions = [[5, 6, eos], [7, eos]]
    seq = caption_sequence(torch.tensor([5, 6, eos, 7, eos]), torch.tensor([3, 2]), 4, None, model.pad_id)
    assert seq.prefix_positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    for row, caption in enumerate(captions):
        assert seq.labels[row][seq.labels[row] != IGNORE_INDEX].tolist() == caption
        assert seq.input_ids[row, 4 : 4 + len(caption)].tolist() == caption
    prompts = []
    model.generate = lambda batch, texts, offsets, max_new_tokens: prompts.append((texts, offsets)) or []
    model.generate_captions({"image_features": torch.randn(2, 64, 96)})
    assert prompts == [([[], []], [0, 0])]


def test_a_sliding_window_shorter_than_a_packed_sample_is_refused(family_models, tmp_path):
    """Mistral v0.1 attends within 4096 tokens; varlen attention has no window, so a bound past it is refused, in the
    forward and before anything loads, while a bound within it (the packing test's 4096) trains exactly."""
    build_tiny_llm("mistral", tmp_path / "windowed", sliding_window=8)
    family_models = {**family_models, "windowed": tmp_path / "windowed"}
    model, tokenizer, _ = family_model(family_models, "windowed")
    with pytest.raises(ValueError, match="sliding window of 8 tokens"):
        model.caption_loss(caption_batch(tokenizer, [3, 5]))
    from pipeline.training.preflight import check_llm

    config = load_config(
        "configs/toy.yaml",
        [
            f"model.llm.model={tmp_path / 'windowed'}",
            "model.llm.attn_implementation=varlen",
            "data.sources=[{shards: x}]",
        ],
    )
    with pytest.raises(ConfigError, match="sliding window of 8 tokens.*sdpa or flex_attention"):
        check_llm(tmp_path / "windowed", config)
    config.model.llm.attn_implementation = "sdpa"  # SDPA builds the window into its mask
    check_llm(tmp_path / "windowed", config)
