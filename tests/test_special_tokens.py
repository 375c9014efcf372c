"""LLaMA-3's special tokens outside the chat template: generation (chat, evaluation, training samples, stage-1
captions) stops on every terminator the model defines, and captions are tokenized as text.

The chat template's side (special-token strings in conversation messages and chat input) is tested in
`test_conversation_labels.py`, with the same real LLaMA-3 tokenizer.
"""

import pytest
import torch
from test_conversation_labels import llama3_tokenizer_dir
from transformers import AutoTokenizer, CLIPVisionConfig, GenerationConfig

from pipeline.config import load_config
from pipeline.data.captions import CaptionSampleDecoder
from pipeline.model.anymal import build_anymal, terminator_ids
from pipeline.model.llm import load_llm

END_OF_TEXT, EOT = 128001, 128009  # LLaMA-3's <|end_of_text|> and <|eot_id|>


@pytest.fixture(scope="module")
def llama3():
    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_dir())
    assert tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"]) == [END_OF_TEXT, EOT]
    return tokenizer


def test_terminators_are_the_union_of_eos_eot_and_the_generation_config(llama3):
    """LLaMA-3-8B-Instruct's generation config lists both terminators; its tokenizer's EOS has been either one."""
    instruct_config = GenerationConfig(eos_token_id=[END_OF_TEXT, EOT])
    assert llama3.eos_token == "<|end_of_text|>"
    assert terminator_ids(llama3, instruct_config) == [END_OF_TEXT, EOT]
    assert terminator_ids(llama3, None) == [END_OF_TEXT, EOT]  # EOS, and <|eot_id|> because the vocabulary has it
    llama3_eot_eos = AutoTokenizer.from_pretrained(llama3_tokenizer_dir(), eos_token="<|eot_id|>")
    assert terminator_ids(llama3_eot_eos, GenerationConfig(eos_token_id=END_OF_TEXT)) == [END_OF_TEXT, EOT]
    assert terminator_ids(llama3_eot_eos, None) == [EOT]  # what stopped generation before: <|end_of_text|> did not


@pytest.fixture(scope="module")
def toy_model(tiny_models):
    """A tiny AnyMAL whose tokenizer's EOS is <|eot_id|> and whose LLM's generation config lists <|eot_id|> and
    <|end_of_text|>, as LLaMA-3-8B-Instruct's does (and the demo's pretrained toy LM's)."""
    config = load_config(
        "configs/toy.yaml", [f"model.vision.model={tiny_models}/clip", f"model.llm.model={tiny_models}/llm"]
    )
    tokenizer = AutoTokenizer.from_pretrained(config.model.llm.model)
    llm = load_llm(config.model.llm)
    llm.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end_of_text|>")]
    torch.manual_seed(0)
    model = build_anymal(config.model, tokenizer, load_vision=False, llm=llm).eval()
    width = CLIPVisionConfig.from_pretrained(config.model.vision.model).hidden_size
    return model, tokenizer, width


def test_generation_stops_on_a_terminator_that_only_the_generation_config_names(toy_model):
    """With the LM made to say <|end_of_text|> at every step, stage-1 captions and stage-2 answers end after one
    step with nothing generated, although the tokenizer's EOS is <|eot_id|>."""
    model, tokenizer, width = toy_model
    end_of_text = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    assert tokenizer.eos_token == "<|eot_id|>" and end_of_text != tokenizer.eos_token_id
    assert end_of_text in model.llm.generation_config.eos_token_id
    assert model.stop_ids == sorted({tokenizer.eos_token_id, end_of_text})

    steps = []

    def say_end_of_text(module, inputs, logits):
        steps.append(logits.shape)
        forced = torch.zeros_like(logits)
        forced[..., end_of_text] = 1e4
        return logits + forced

    hook = model.llm.get_output_embeddings().register_forward_hook(say_end_of_text)
    try:
        batch = {"image_features": torch.randn(2, 5, width)}
        assert model.generate_captions(batch, max_new_tokens=6) == [[], []]
        assert len(steps) == 1
        steps.clear()
        prompt = tokenizer("what colour is the shape ?", add_special_tokens=False).input_ids
        assert model.generate(batch, [prompt, prompt[:3]], [0, 1], max_new_tokens=6) == [[], []]
        assert len(steps) == 1
    finally:
        hook.remove()


def test_a_caption_is_tokenized_as_text(tmp_path):
    """A caption that contains "<|end_of_text|>" keeps it as text; the one EOS is the one appended at its end."""
    decoder = CaptionSampleDecoder(str(llama3_tokenizer_dir()), max_caption_tokens=64)
    ids = decoder.encode_caption(b"a sign that reads <|end_of_text|> on a wall").tolist()
    assert ids.count(END_OF_TEXT) == 1 and ids[-1] == END_OF_TEXT
    assert decoder.tokenizer.decode(ids[:-1]) == "a sign that reads <|end_of_text|> on a wall"
