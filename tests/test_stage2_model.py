"""Stage 2's model on tiny models (CPU, fp32 unless said): packed and padded conversations give the same loss and
gradients; QLoRA runs forward and backward; the merged model equals base plus adapter; an exported adapter gives the
chat CLI the same greedy answer as the model before export; batched generation equals one-by-one generation; the
stage-1 resampler loads from an export and from a checkpoint."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor

from pipeline.common.labels import IGNORE_INDEX
from pipeline.config import load_config, to_dict
from pipeline.data.conversations import chat_messages, collate_conversations, encode_conversation
from pipeline.inference.answering import InstructAnswerer
from pipeline.model.anymal import build_anymal
from pipeline.toy.world import render_image, sample_attributes
from pipeline.training.stages import stage_for

QUESTIONS = ["what colour is the shape ?", "how many shapes are there ? is it a star ?", "what size is it ?"]


def stage2_config(tiny_models, *overrides):
    return load_config(
        "configs/toy_stage2.yaml",
        [
            f"model.vision.model={tiny_models}/clip",
            f"model.llm.model={tiny_models}/llm",
            "model.stage1_resampler=",
            "model.resampler.num_latents=4",
            "model.lora.r=4",
            "model.lora.dropout=0.0",
            *overrides,
        ],
    )


def stage2_model(config, seed: int = 0):
    tokenizer = AutoTokenizer.from_pretrained(config.model.llm.model)
    torch.manual_seed(seed)
    model = stage_for(build_anymal(config.model, tokenizer), config).model
    for name, param in model.llm.named_parameters():
        if "lora_B" in name:  # B = 0 at initialisation would make the adapter a no-op
            torch.nn.init.normal_(param, std=0.2)
    return model.eval(), tokenizer


def images(count: int, seed: int = 0) -> list[Image.Image]:
    import random

    rng = random.Random(seed)
    return [render_image(sample_attributes(rng), rng) for _ in range(count)]


def conversation_batch(tokenizer, config, pixel_values) -> dict:
    samples = []
    for index, question in enumerate(QUESTIONS):
        turns = [
            {"from": "human", "value": ("<image>\n" if index != 1 else "") + question},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "what shape is it ?"},
            {"from": "gpt", "value": "it is a star ."},
        ][: 2 + 2 * (index % 2)]
        encoded = encode_conversation(tokenizer, chat_messages(turns), config.model.resampler.num_latents, 64)
        samples.append(
            {
                "key": str(index),
                "pixel_values": pixel_values[index],
                "text_ids": torch.tensor(encoded.input_ids),
                "text_labels": torch.tensor(encoded.labels),
                "image_offset": encoded.image_offset,
            }
        )
    return collate_conversations(samples)


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_packed_equals_padded_loss_and_gradients(tiny_models, attn):
    """Packed rows through the adapted layers (under SDPA's mask, or with the varlen boundaries) give the padded rows'
    loss and the gradients of every trained parameter."""
    config = stage2_config(tiny_models, f"model.llm.attn_implementation={attn}")
    model, tokenizer = stage2_model(config)
    pixels = CLIPImageProcessor.from_pretrained(tiny_models / "clip")(images=images(3), return_tensors="pt")
    batch = conversation_batch(tokenizer, config, pixels["pixel_values"])
    results = {}
    for packing in (False, True):
        model.packing = packing
        model.zero_grad()
        loss, tokens = model.conversation_loss(batch)
        loss.backward()
        results[packing] = (
            loss.item(),
            tokens.item(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
        )
    (padded_loss, padded_tokens, padded), (packed_loss, packed_tokens, packed) = results[False], results[True]
    assert padded_tokens == packed_tokens == int((batch["text_labels"] != IGNORE_INDEX).sum()) == 3 * 2 + 6
    assert abs(packed_loss - padded_loss) / padded_loss < 1e-5
    assert any("lora_A" in name for name in packed) and any(name.startswith("resampler.") for name in packed)
    for name, grad in padded.items():
        assert grad.abs().max() > 0, name
        assert ((packed[name] - grad).abs().max() / grad.abs().max()).item() < 1e-5, name


def test_qlora_forward_and_backward_on_cpu(tiny_models):
    from bitsandbytes.nn import Linear4bit

    config = stage2_config(tiny_models, "model.llm.quantization=nf4", "model.llm.dtype=bfloat16")
    tokenizer = AutoTokenizer.from_pretrained(config.model.llm.model)
    torch.manual_seed(0)
    model = stage_for(build_anymal(config.model, tokenizer, device="cpu"), config).model
    projection = model.llm.get_decoder().layers[0].self_attn.q_proj
    assert isinstance(projection.base_layer, Linear4bit) and projection.base_layer.weight.dtype == torch.uint8
    assert projection.base_layer.weight.quant_state.nested  # double quantisation
    pixels = CLIPImageProcessor.from_pretrained(tiny_models / "clip")(images=images(3), return_tensors="pt")
    loss, tokens = model.conversation_loss(conversation_batch(tokenizer, config, pixels["pixel_values"]))
    assert torch.isfinite(loss) and tokens.item() == 12
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(grad is not None for grad in grads.values())
    # lora_B starts at zero, so its gradient is the first to be non-zero; the resampler's comes through the LLM.
    assert all(g.abs().max() > 0 for n, g in grads.items() if "lora_B" in n or n.startswith("resampler."))
    assert projection.base_layer.weight.grad is None


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    """A stage-2 model with random adapters, its answers before export, and its export directory."""
    from pipeline.inference.export import export_stage2

    config = stage2_config(tiny_models)
    model, tokenizer = stage2_model(config, seed=3)
    answerer = InstructAnswerer(
        model, tokenizer, CLIPImageProcessor.from_pretrained(tiny_models / "clip"), max_new_tokens=6
    )
    pictures = images(3, seed=5)
    answers = answerer(pictures, QUESTIONS)
    out = tmp_path_factory.mktemp("stage2_export")
    export_stage2(model, out / "export", to_dict(config), step=7)
    for index, picture in enumerate(pictures):
        picture.save(out / f"{index}.png")
    return {"model": model, "tokenizer": tokenizer, "answerer": answerer, "answers": answers, "dir": out}


def test_generation_under_varlen_equals_sdpa(tiny_models):
    """The varlen implementation hands padded rows and the KV cache to SDPA: the same greedy answers, batched."""
    answers = {}
    for attn in ("sdpa", "varlen"):
        config = stage2_config(tiny_models, f"model.llm.attn_implementation={attn}")
        model, tokenizer = stage2_model(config)
        answerer = InstructAnswerer(
            model, tokenizer, CLIPImageProcessor.from_pretrained(tiny_models / "clip"), max_new_tokens=6
        )
        answers[attn] = answerer(images(3), QUESTIONS)
    assert answers["varlen"] == answers["sdpa"]
    assert any(answers["sdpa"])


def test_batched_generation_equals_one_by_one(exported):
    pictures = [Image.open(exported["dir"] / f"{i}.png").convert("RGB") for i in range(3)]
    one_by_one = [
        exported["answerer"]([picture], [question])[0] for picture, question in zip(pictures, QUESTIONS, strict=True)
    ]
    assert one_by_one == exported["answers"]
    assert all(answer for answer in one_by_one)


def test_chat_cli_answers_like_the_model_before_export(exported, capsys):
    from pipeline import chat

    manifest = json.loads((exported["dir"] / "export" / "manifest.json").read_text())
    assert manifest["stage"] == 2 and manifest["step"] == 7 and manifest["llm_model"].endswith("llm")
    assert (exported["dir"] / "export" / "adapter" / "adapter_config.json").is_file()
    for index, question in enumerate(QUESTIONS):
        capsys.readouterr()
        code = chat.main(
            [
                str(exported["dir"] / "export"),
                "--image",
                str(exported["dir"] / f"{index}.png"),
                "--question",
                question,
                "--max-new-tokens",
                "6",
                "--device",
                "cpu",
            ]
        )
        assert code == 0
        assert capsys.readouterr().out.strip() == exported["answers"][index]


def test_merged_model_equals_base_plus_adapter(exported):
    from pipeline.merge import merge

    merged_dir = merge(exported["dir"] / "export", exported["dir"] / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = exported["tokenizer"]("what colour is the shape ? it is a red star .", return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = exported["model"].llm(input_ids=ids).logits
        with exported["model"].llm.disable_adapter():
            base = exported["model"].llm(input_ids=ids).logits
        merged_logits = merged(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-2  # the adapter matters
    assert (merged_logits - adapted).abs().max() < 1e-4
    manifest = json.loads((merged_dir / "manifest.json").read_text())
    assert manifest["merged"] and manifest["base_llm_model"].endswith("llm")


def test_stage1_resampler_loads_from_export_and_checkpoint(tiny_models, tmp_path):
    from pipeline.config import save_config
    from pipeline.inference.export import export_resampler
    from pipeline.model.anymal import build_resampler
    from pipeline.training.stages import load_stage1_resampler

    config = load_config(
        "configs/toy.yaml", [f"model.vision.model={tiny_models}/clip", f"model.llm.model={tiny_models}/llm"]
    )
    torch.manual_seed(1)
    resampler = build_resampler(config.model, 128, 64)
    run = tmp_path / "stage1"
    checkpoint = run / "checkpoints" / "step_00000010"
    checkpoint.mkdir(parents=True)
    save_config(config, run / "config.yaml")
    # As the engine saves `TrainableParts`: the resampler's keys under "resampler.".
    states = {f"resampler.{name}": tensor for name, tensor in resampler.state_dict().items()}
    torch.save({"module": states}, checkpoint / "mp_rank_00_model_states.pt")
    (checkpoint / "COMPLETE").write_text("10\n")
    export_resampler(resampler, run / "export", to_dict(config.model), step=10)
    features = torch.randn(2, 65, 128)
    for source in (run, run / "export", checkpoint):
        loaded, where = load_stage1_resampler(source)
        assert torch.equal(loaded(features), resampler(features)), where
    (run / "export" / "resampler.json").unlink()
    assert load_stage1_resampler(run)[1].startswith("checkpoint")  # no export yet: the newest complete checkpoint
    with pytest.raises(FileNotFoundError, match="stage1_resampler"):
        load_stage1_resampler(tmp_path)
