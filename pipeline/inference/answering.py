"""Captioning and answering with a trained model: the prompts and the callables that chat, evaluation and training's
sample tables generate through.

Each callable has the signature `generate(images, prompts) -> texts` that the evaluation runner splits over ranks:
`Stage1Captioner` captions from BOS (where the model has one) and the image prefix alone (stage 1 trains with no text
before the caption); `InstructAnswerer` puts each prompt in a user turn of the chat template, exactly as stage 2 trains.
"""

from __future__ import annotations

import torch
from PIL import Image

# Prompt templates, filled with the question where there is one. These are LLaVA-1.5's evaluation prompts, which
# instruction-tuned models of this family are trained to follow. Stage-1 models see no text before the caption
# (`Stage1Captioner`), so they caption from the image alone and their prompt is recorded as "".
PROMPT_TEMPLATES = {
    "caption": "Provide a one-sentence caption for the provided image.",
    # Short answers: VQA accuracy compares whole answers, so "yes" scores and "Yes, it is." does not.
    "vqa": "{question}\nAnswer the question using a single word or phrase.",
    "textvqa": "{question}\nAnswer the question using a single word or phrase.",
    # A third of VizWiz questions cannot be answered from the photo; the humans then answered "unanswerable".
    "vizwiz": "{question}\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
    "Answer the question using a single word or phrase.",
}


class Stage1Captioner:
    """`generate` for a stage-1 model: greedy captions from BOS and the image prefix alone.

    Stage 1 trains on captions with no text before them, so prompts are ignored; use it for captioning only.
    """

    uses_prompts = False  # benchmarks then record an empty prompt, and VQA refuses this generator

    def __init__(self, model, tokenizer, image_processor, max_new_tokens: int = 32):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        device = next(self.model.resampler.parameters()).device
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        token_ids = self.model.generate_captions({"pixel_values": pixel_values}, self.max_new_tokens)
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]


class InstructAnswerer:
    """`generate` for an instruction-tuned (stage 2) model: each prompt is a user turn about its image.

    Answers are greedy and end at any of the model's terminators (`AnyMAL.stop_ids`: EOS, the family's end-of-turn
    token and the generation config's), from exactly the training format (`pipeline.data.conversations`):
    the chat template, the optional system prompt, the image where `<image>` stands or at the start of the turn.
    `answer` takes whole conversations (LLaVA turns, the last one a human turn) for multi-turn use.
    """

    uses_prompts = True

    def __init__(self, model, tokenizer, image_processor, max_new_tokens: int = 32, system_prompt: str = ""):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.max_new_tokens, self.system_prompt = max_new_tokens, system_prompt

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        return self.answer(images, [[{"from": "human", "value": prompt}] for prompt in prompts])

    @torch.no_grad()
    def answer(self, images: list[Image.Image], conversations: list[list[dict]], streamer=None) -> list[str]:
        from pipeline.data.conversations import chat_messages, encode_prompt

        device = next(self.model.resampler.parameters()).device
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        prompts, offsets = zip(
            *(encode_prompt(self.tokenizer, chat_messages(turns, self.system_prompt)) for turns in conversations),
            strict=True,
        )
        token_ids = self.model.generate(
            {"pixel_values": pixel_values}, list(prompts), list(offsets), self.max_new_tokens, streamer=streamer
        )
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]
