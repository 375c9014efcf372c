"""Tiny stand-ins for the real backbones, saved in Hugging Face format so the pipeline loads them unchanged.

- `build_tokenizer`: a word-level tokenizer over the toy world's words with the LLaMA-3 special tokens and
  chat template, as a `PreTrainedTokenizerFast`.
- `build_tiny_clip`: a randomly initialised `CLIPVisionModel` for 64 px images plus its `CLIPImageProcessor`,
  loadable like `openai/clip-vit-large-patch14`.
- `build_tiny_llama`: a `LlamaForCausalLM` briefly pretrained on "attributes : caption" text. A frozen LM can
  only be steered by a visual prefix if it has learned to copy what earlier context states
  (shared/notes/toy-world-findings.md), so the pretraining text states the attributes first.
- `build_toy_models`: all of the above for a world written by `pipeline.toy.world.write_toy_world`.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from pipeline.toy import world

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
# LLaMA-3.1's dedicated padding token: padding with an end token would hide real end tokens from the loss.
PAD_TOKEN = "<|finetune_right_pad_id|>"
# A word-level vocabulary needs an unknown token; LLaMA-3's byte-level BPE never does.
UNK_TOKEN = "<unk>"
# Unused, like LLaMA-3's reserved tokens, so the pipeline can claim one (e.g. as an image placeholder)
# without resizing the embeddings.
RESERVED_TOKENS = [f"<|reserved_special_token_{index}|>" for index in range(4)]
CHAT_ROLES = ["system", "user", "assistant"]

# Renders exactly what Meta's Llama-3-8B-Instruct template renders: BOS once, then per message
# <|start_header_id|>role<|end_header_id|>\n\n{content stripped}<|eot_id|>, then the assistant header if
# a generation prompt is asked for.
LLAMA3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
    "{{ '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

MAX_POSITION_EMBEDDINGS = 512


def toy_vocabulary() -> list[str]:
    """The words the toy tokenizer needs: everything the world says, plus the chat role names."""
    return list(dict.fromkeys(world.vocabulary() + CHAT_ROLES))


def build_tokenizer(out_dir: str | Path, words: list[str]) -> PreTrainedTokenizerFast:
    """Build, save to `out_dir` and return a word-level tokenizer over `words` with LLaMA-3 special tokens.

    Words are split on whitespace and at punctuation ("colour?" is "colour", "?"), case-sensitively with no
    normalisation: the toy vocabulary is lower case and any other word becomes <unk>. Special tokens are
    LLaMA-3-Instruct's: bos <|begin_of_text|>, eos <|eot_id|>, pad <|finetune_right_pad_id|>, plus
    <|end_of_text|>, <|start_header_id|>, <|end_header_id|> and four reserved tokens. `tokenizer(text)` adds
    no special tokens, not even BOS: the pipeline adds BOS and EOS itself; special tokens written in the
    text are recognised. Decoding joins words with single spaces.
    """
    special_tokens = [BOS_TOKEN, END_OF_TEXT_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN, PAD_TOKEN]
    special_tokens += [UNK_TOKEN, *RESERVED_TOKENS]
    unique_words = [word for word in dict.fromkeys(words) if word not in special_tokens]
    if not unique_words:
        raise ValueError("build_tokenizer needs at least one word")
    # Words first and special tokens after them, as in LLaMA-3's vocabulary.
    vocab = {token: index for index, token in enumerate(unique_words + special_tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(token, special=True) for token in special_tokens])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[END_OF_TEXT_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, *RESERVED_TOKENS],
        add_bos_token=False,
        add_eos_token=False,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        padding_side="right",
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised 64 px `CLIPVisionModel` and its `CLIPImageProcessor` in `out_dir`.

    The tower has patch 8, width 128, 4 layers and 4 heads, so it yields [65, 128] hidden states per image
    (64 patches plus the class token). The processor resizes the shortest edge to 64, centre-crops 64 x 64 and
    normalises with CLIP's mean and std. It is built with the PIL backend because torchvision is not a
    dependency; the saved config names `CLIPImageProcessor`, as OpenAI's does.
    """
    out_dir = Path(out_dir)
    config = CLIPVisionConfig(
        image_size=world.IMAGE_SIZE_PX,
        patch_size=8,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        projection_dim=128,
    )
    torch.manual_seed(seed)
    CLIPVisionModel(config).save_pretrained(out_dir)
    processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": world.IMAGE_SIZE_PX},
        do_center_crop=True,
        crop_size={"height": world.IMAGE_SIZE_PX, "width": world.IMAGE_SIZE_PX},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    processor.save_pretrained(out_dir)
    return out_dir


def attribute_context(attrs: dict) -> str:
    """The words that precede a caption in LM pretraining, e.g. "small red circle blue"."""
    return f"{attrs['size']} {attrs['colour']} {attrs['shape']} {attrs['background']}"


def caption_pretraining_text(attrs: dict) -> str:
    """One caption line: BOS, the attributes, ":", the caption, <|eot_id|>.

    For example "<|begin_of_text|>small red circle blue : a small red circle on a blue background<|eot_id|>";
    the caption follows the ":", so the LM learns to copy the attributes stated before it.
    """
    return f"{BOS_TOKEN}{attribute_context(attrs)} : {world.caption_for(attrs)}{EOT_TOKEN}"


def question_pretraining_text(tokenizer: PreTrainedTokenizerFast, attrs: dict, question: str, answer: str) -> str:
    """One chat-formatted question line whose user turn states the attributes before the question."""
    messages = [
        {"role": "user", "content": f"{attribute_context(attrs)} : {question}"},
        {"role": "assistant", "content": answer},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _pretraining_texts(tokenizer: PreTrainedTokenizerFast, world_records: list[dict], rng: random.Random) -> list[str]:
    # One caption line per record and one question line for every second record: captions are what the
    # first training stage needs; the questions give instruction tuning a head start.
    texts = []
    for record in world_records:
        texts.append(caption_pretraining_text(record["attrs"]))
        if rng.random() < 0.5:
            question, answer = rng.choice(world.question_answer_pairs(record["attrs"], rng))
            texts.append(question_pretraining_text(tokenizer, record["attrs"], question, answer))
    return texts


def _encode_for_pretraining(
    tokenizer: PreTrainedTokenizerFast, texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels; only tokens after the first ":" carry loss.

    The attribute words before ":" are random draws, so predicting them would only add irreducible loss.
    """
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    colon_id = tokenizer.convert_tokens_to_ids(":")
    is_colon = input_ids == colon_id
    if not bool(is_colon.any(dim=1).all()):
        raise ValueError("every pretraining text must contain ':' between its context and its target")
    after_colon = torch.cumsum(is_colon.int(), dim=1) > 0
    after_colon &= ~is_colon
    labels = input_ids.masked_fill(~(after_colon & attention_mask.bool()), -100)
    return input_ids, attention_mask, labels


def _learning_rate(step: int, progress: float, peak_lr: float, warmup_steps: int) -> float:
    # Linear warm-up, then cosine decay to a tenth of the peak over the time or step budget.
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def caption_copy_accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, attrs_list: list[dict]) -> float:
    """Fraction of attribute contexts that the LM continues greedily with exactly the matching caption."""
    prompts = [f"{BOS_TOKEN}{attribute_context(attrs)} :" for attrs in attrs_list]
    input_ids = tokenizer(prompts, return_tensors="pt")["input_ids"]
    caption_length = len(tokenizer(world.caption_for(attrs_list[0]))["input_ids"])
    was_training = model.training
    model.eval()
    generated = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=caption_length + 1,
        do_sample=False,
    )
    model.train(was_training)
    continuations = tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
    return sum(world.parse_caption(text) == attrs for text, attrs in zip(continuations, attrs_list, strict=True)) / len(
        attrs_list
    )


def build_tiny_llama(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    world_records: list[dict],
    seconds: float | None,
    seed: int,
    max_steps: int | None = None,
    batch_size: int = 64,
    peak_lr: float = 3e-3,
    threads: int | None = None,
) -> dict:
    """Pretrain a tiny `LlamaForCausalLM` on text made from `world_records` and save it with `tokenizer`.

    The model has width 128, 3 layers, 4 heads, MLP width 512, untied embeddings and the tokenizer's
    vocabulary. Training runs on the CPU for `max_steps` steps, or `seconds` of wall-clock time, whichever comes
    first (None: no limit of that kind); when `max_steps` ends it the run is reproducible given `seed`, whatever
    the machine's load. `threads` (torch intra-op threads
    during training) defaults to half the cores, at most 4. Saves safetensors weights, the
    generation config (stop on <|eot_id|> or <|end_of_text|>) and the tokenizer in `out_dir`, loadable by
    `AutoModelForCausalLM` and `AutoTokenizer`. Returns {"steps", "seconds", "final_loss", "copy_accuracy"},
    where final_loss averages the last 20 steps and copy_accuracy is `caption_copy_accuracy` on 64 random
    attribute draws.
    """
    if not world_records:
        raise ValueError("build_tiny_llama needs world records to make pretraining text from")
    if seconds is None and max_steps is None:
        raise ValueError("build_tiny_llama needs a step or a time limit")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    previous_threads = torch.get_num_threads()
    # Half the cores, at most 4: a model this small gains little from more threads, and OpenMP threads that
    # compete with other processes for the cores slow each step down several-fold.
    torch.set_num_threads(threads or max(1, min(4, (os.cpu_count() or 1) // 2)))
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        rng = random.Random(seed)
        input_ids, attention_mask, labels = _encode_for_pretraining(
            tokenizer, _pretraining_texts(tokenizer, world_records, rng)
        )
        step, train_seconds, recent_losses = _pretrain(
            model, (input_ids, attention_mask, labels), seconds, max_steps, batch_size, peak_lr, seed
        )
        evaluation_attrs = [world.sample_attributes(rng) for _ in range(64)]
        stats = {
            "steps": step,
            "seconds": round(train_seconds, 2),
            "final_loss": sum(recent_losses) / len(recent_losses) if recent_losses else float("nan"),
            "copy_accuracy": caption_copy_accuracy(model, tokenizer, evaluation_attrs),
        }
    finally:
        torch.set_num_threads(previous_threads)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TEXT_TOKEN)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return stats


def _pretrain(model, encoded, seconds, max_steps, batch_size: int, peak_lr: float, seed: int):
    """The tiny LM's training loop until the step or time limit; returns (steps, seconds, the last 20 losses)."""
    input_ids, attention_mask, labels = encoded
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.01)
    batch_generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(input_ids), generator=batch_generator)
    cursor = 0
    recent_losses: list[float] = []
    step = 0
    model.train()
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        progress = max(elapsed / seconds if seconds else 0.0, step / max_steps if max_steps else 0.0)
        if progress >= 1.0:
            break
        if cursor + batch_size > len(order):
            order = torch.randperm(len(input_ids), generator=batch_generator)
            cursor = 0
        batch = order[cursor : cursor + batch_size]
        cursor += batch_size
        # Trim the padding columns that no sequence in this batch uses.
        width = int(attention_mask[batch].sum(dim=1).max())
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, progress, peak_lr, warmup_steps=20)
        loss = model(
            input_ids=input_ids[batch, :width],
            attention_mask=attention_mask[batch, :width],
            labels=labels[batch, :width],
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent_losses = (recent_losses + [loss.item()])[-20:]
        step += 1
    return step, time.perf_counter() - start, recent_losses


def build_toy_models(
    out_dir: str | Path, world_dir: str | Path, seed: int, lm_steps: int | None = None, lm_seconds: float | None = None
) -> dict:
    """Write `out_dir/clip` (vision tower + processor) and `out_dir/llm` (pretrained LM + tokenizer).

    The LM is pretrained on the train split of the world in `world_dir` for `lm_steps` steps or `lm_seconds`,
    whichever ends first. Returns {"clip": path, "llm": path,
    "lm_stats": the dict from `build_tiny_llama`}.
    """
    out_dir = Path(out_dir)
    clip_dir = build_tiny_clip(out_dir / "clip", seed=seed)
    llm_dir = out_dir / "llm"
    tokenizer = build_tokenizer(llm_dir, toy_vocabulary())
    lm_stats = build_tiny_llama(
        llm_dir, tokenizer, world.read_records(world_dir, "train"), lm_seconds, seed, max_steps=lm_steps
    )
    return {"clip": clip_dir, "llm": llm_dir, "lm_stats": lm_stats}
