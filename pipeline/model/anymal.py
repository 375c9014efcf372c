"""AnyMAL for images: vision features → Perceiver Resampler → image tokens among the LLM's input embeddings.

Stage 1's sequence is BOS, the resampler's tokens, the caption tokens, then EOS; the loss covers only the caption
tokens and EOS. Stage 2's is a chat-templated conversation with the image tokens at the sample's image offset (see
`pipeline.data.conversations`); the loss covers the assistant turns. Both go through the same layouts
(`pack_samples`, `pad_samples`), loss (`supervised_loss`) and generation (`generate`), so training, generation and
evaluation share one format. Model code knows nothing of DeepSpeed: the trainer's stage decides what it wraps.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model.attention import VARLEN, varlen_kwargs
from pipeline.model.llm import load_llm
from pipeline.model.resampler import PerceiverResampler
from pipeline.model.vision import VisionTower, load_vision_tower

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Supervised positions go through the LM head in chunks of this many tokens, so the [tokens, vocab] logits of a
# 128K vocabulary are never materialised for a whole batch at once.
LOGIT_CHUNK_TOKENS = 4096


@dataclass
class TokenLayout:
    """LLM input rows holding several samples' tokens, each with the resampler's embeddings at its image offset.

    Packed (`pack_samples`): one row, `position_ids` restarting at 0 for every sample and no attention mask, so the
    LLM's attention (SDPA, flex or flash varlen in transformers) is block-diagonal causal and no token attends across
    samples. Padded (`pad_samples`): one row per sample with an `attention_mask`. Both give the same summed loss.
    """

    input_ids: torch.Tensor  # [rows, T]; image slots hold a filler id, replaced by embeddings
    labels: torch.Tensor  # [rows, T]; IGNORE_INDEX except at supervised tokens
    prefix_rows: torch.Tensor  # [B * prefix_length] row of each image slot, sample-major
    prefix_positions: torch.Tensor  # [B * prefix_length] column of each image slot, sample-major
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


def _slots(offset: torch.Tensor, image_start: torch.Tensor, prefix_length: int) -> torch.Tensor:
    return (offset >= image_start) & (offset < image_start + prefix_length)


def pack_samples(text_ids: torch.Tensor, text_labels: torch.Tensor, text_lengths: torch.Tensor,
                 image_offsets: torch.Tensor, prefix_length: int, filler_id: int) -> TokenLayout:
    """Pack samples into one row. Sample i is text i with `prefix_length` image slots before its token
    `image_offsets[i]`; `text_ids` and `text_labels` are the samples' texts concatenated."""
    device = text_ids.device
    lengths, image_offsets = text_lengths.to(device), image_offsets.to(device)
    sample_lengths = lengths + prefix_length
    starts = torch.cumsum(sample_lengths, 0) - sample_lengths
    sample_of = torch.repeat_interleave(torch.arange(lengths.shape[0], device=device), sample_lengths)
    offset = torch.arange(int(sample_lengths.sum()), device=device) - starts[sample_of]
    image_slot = _slots(offset, image_offsets[sample_of], prefix_length)
    input_ids = torch.full(offset.shape, filler_id, dtype=torch.long, device=device)
    input_ids[~image_slot] = text_ids
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[~image_slot] = text_labels
    prefix_positions = torch.nonzero(image_slot).flatten()
    return TokenLayout(input_ids[None], labels[None], torch.zeros_like(prefix_positions), prefix_positions,
                       position_ids=offset[None])


def pad_samples(text_ids: torch.Tensor, text_labels: torch.Tensor, text_lengths: torch.Tensor,
                image_offsets: torch.Tensor, prefix_length: int, pad_id: int, left: bool = False) -> TokenLayout:
    """One row per sample, padded to the longest: on the right for training, on the left for generation."""
    device = text_ids.device
    lengths, image_offsets = text_lengths.to(device), image_offsets.to(device)
    sample_lengths = lengths + prefix_length
    width = int(sample_lengths.max())
    columns = torch.arange(width, device=device)[None]
    shift = (width - sample_lengths)[:, None] if left else torch.zeros_like(sample_lengths)[:, None]
    offset = columns - shift  # position within the sample; negative or past its end on padding
    present = (offset >= 0) & (offset < sample_lengths[:, None])
    image_slot = present & _slots(offset, image_offsets[:, None], prefix_length)
    text_slot = present & ~image_slot  # row-major order is the order of the concatenated texts
    input_ids = torch.full((lengths.shape[0], width), pad_id, dtype=torch.long, device=device)
    input_ids[text_slot] = text_ids
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[text_slot] = text_labels
    rows, positions = torch.nonzero(image_slot, as_tuple=True)
    return TokenLayout(input_ids, labels, rows, positions, attention_mask=present.long())


def caption_text(caption_ids: torch.Tensor, caption_lengths: torch.Tensor, bos_id: int):
    """Stage 1's texts: BOS then the caption (its tokens and EOS supervised), the image right after BOS.

    Returns (text_ids, text_labels, text_lengths, image_offsets) as `pack_samples` and `pad_samples` take them.
    """
    lengths = caption_lengths.to(caption_ids.device) + 1
    starts = torch.cumsum(lengths, 0) - lengths
    text_ids = torch.full((int(lengths.sum()),), bos_id, dtype=torch.long, device=caption_ids.device)
    caption_slot = torch.ones_like(text_ids, dtype=torch.bool)
    caption_slot[starts] = False
    text_ids[caption_slot] = caption_ids
    text_labels = text_ids.masked_fill(~caption_slot, IGNORE_INDEX)
    return text_ids, text_labels, lengths, torch.ones_like(lengths)


def caption_sequence(caption_ids: torch.Tensor, caption_lengths: torch.Tensor, prefix_length: int, bos_id: int,
                     pad_id: int) -> TokenLayout:
    """Concatenated captions (each ending in EOS) as right-padded rows of BOS, image prefix, caption."""
    return pad_samples(*caption_text(caption_ids, caption_lengths, bos_id), prefix_length, pad_id)


def packed_caption_sequence(caption_ids: torch.Tensor, caption_lengths: torch.Tensor, prefix_length: int,
                            bos_id: int) -> TokenLayout:
    """A micro batch's captions packed into one row of [BOS, prefix, caption] per sample (prefix slots hold BOS)."""
    return pack_samples(*caption_text(caption_ids, caption_lengths, bos_id), prefix_length, bos_id)


class AnyMAL(nn.Module):
    """The composed model. `vision` is None when training reads cached features instead of images."""

    def __init__(self, vision: VisionTower | None, resampler: PerceiverResampler, llm, bos_id: int, eos_id: int,
                 pad_id: int, packing: bool = True, max_caption_tokens: int = 64, max_sequence_tokens: int = 2048):
        super().__init__()
        self.vision = vision
        self.resampler = resampler
        self.llm = llm
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.packing = packing
        # Bounds on a sample's length (the data pipeline truncates to them); varlen attention is sized by them.
        self.max_caption_tokens, self.max_sequence_tokens = max_caption_tokens, max_sequence_tokens

    def freeze_for_stage1(self) -> int:
        """Only the resampler trains; returns its trainable parameter count after checking nothing else does."""
        self.requires_grad_(False)
        self.resampler.requires_grad_(True)
        return self._check_and_log_trainable("stage 1", lambda name: name.startswith("resampler."))

    def freeze_for_stage2(self) -> int:
        """The resampler and the LoRA adapters train; the LLM's base weights and the vision tower stay frozen.

        The LLM goes to training mode so that LoRA's dropout is active (LLaMA itself has no dropout).
        """
        self.requires_grad_(False)
        self.resampler.requires_grad_(True)
        for name, param in self.llm.named_parameters():
            param.requires_grad_("lora_" in name)
        self.llm.train()
        return self._check_and_log_trainable(
            "stage 2", lambda name: name.startswith("resampler.") or (name.startswith("llm.") and "lora_" in name)
        )

    def _check_and_log_trainable(self, stage: str, allowed) -> int:
        trainable = {name: p.numel() for name, p in self.named_parameters() if p.requires_grad}
        stray = [name for name in trainable if not allowed(name)]
        if stray:
            raise RuntimeError(f"{stage} must not train these parameters: {stray[:5]}")
        resampler = sum(n for name, n in trainable.items() if name.startswith("resampler."))
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        log.info("%s trains %s parameters (resampler %s, LLM adapters %s); %s frozen", stage,
                 f"{sum(trainable.values()):,}", f"{resampler:,}", f"{sum(trainable.values()) - resampler:,}",
                 f"{frozen:,}")
        return sum(trainable.values())

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode for a while (no adapter dropout), then every submodule back in the mode it was in."""
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            yield self
        finally:
            for module, training in modes:
                module.training = training

    def image_prefix(self, batch: dict, resampler=None) -> torch.Tensor:
        """Resampler tokens for a batch holding `pixel_values` (through the frozen tower) or `image_features`."""
        resampler = resampler or self.resampler
        if "image_features" in batch:
            features = batch["image_features"]
        else:
            if self.vision is None:
                raise RuntimeError("batch has pixel_values but the vision tower was not loaded (data.input=features?)")
            features = self.vision(batch["pixel_values"])
        resampler_dtype = next(resampler.parameters()).dtype
        return resampler(features.to(resampler_dtype))

    def embed(self, layout: TokenLayout, prefix: torch.Tensor) -> torch.Tensor:
        """Token embeddings of the layout with the image slots replaced by the resampler's tokens."""
        embeddings = self.llm.get_input_embeddings()(layout.input_ids)
        return embeddings.index_put(
            (layout.prefix_rows, layout.prefix_positions), prefix.reshape(-1, prefix.shape[-1]).to(embeddings.dtype)
        )

    def caption_loss(self, batch: dict, resampler=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: summed token cross-entropy over caption tokens and EOS, and the number of those tokens.

        The sum, not the mean, is returned so that the trainer can divide by the supervised-token count of the
        whole global batch: every token then weighs the same whatever the micro-batch split or world size.
        """
        prefix = self.image_prefix(batch, resampler)
        return self.text_image_loss(prefix, *caption_text(batch["caption_ids"], batch["caption_lengths"], self.bos_id),
                                    max_length=1 + prefix.shape[1] + self.max_caption_tokens)

    def conversation_loss(self, batch: dict, resampler=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2: summed cross-entropy over the assistant turns (`text_labels`) and their count."""
        prefix = self.image_prefix(batch, resampler)
        return self.text_image_loss(prefix, batch["text_ids"], batch["text_labels"], batch["text_lengths"],
                                    batch["image_offsets"], max_length=self.max_sequence_tokens)

    def text_image_loss(self, prefix: torch.Tensor, text_ids: torch.Tensor, text_labels: torch.Tensor,
                        text_lengths: torch.Tensor, image_offsets: torch.Tensor, max_length: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss and supervised-token count of texts with the image tokens inserted at their offsets.

        `max_length` bounds a sample's length (image tokens included); varlen attention is sized by it."""
        boundaries = {}
        if self.packing:
            layout = pack_samples(text_ids, text_labels, text_lengths, image_offsets, prefix.shape[1], self.bos_id)
            if self.llm.config._attn_implementation == VARLEN:
                lengths = text_lengths.to(prefix.device) + prefix.shape[1]
                bound = max_length or int(lengths.max())
                # Checked on the device, without a sync: a longer sample would be cut short by the kernel.
                torch._assert_async(lengths.max() <= bound, "a packed sample is longer than the configured maximum")
                boundaries = varlen_kwargs(lengths, bound)
        else:
            layout = pad_samples(text_ids, text_labels, text_lengths, image_offsets, prefix.shape[1], self.pad_id)
        hidden = self.llm.get_decoder()(
            inputs_embeds=self.embed(layout, prefix), position_ids=layout.position_ids,
            attention_mask=layout.attention_mask, use_cache=False, **boundaries,
        ).last_hidden_state
        return self.supervised_loss(hidden, layout.labels)

    def supervised_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token loss computed at supervised positions only, chunked through the LM head."""
        targets = labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        states = hidden[:, :-1][supervised]
        targets = targets[supervised]
        head = self.llm.get_output_embeddings()
        total = hidden.new_zeros((), dtype=torch.float32)
        for begin in range(0, targets.shape[0], LOGIT_CHUNK_TOKENS):
            logits = head(states[begin : begin + LOGIT_CHUNK_TOKENS]).float()
            total = total + F.cross_entropy(logits, targets[begin : begin + LOGIT_CHUNK_TOKENS], reduction="sum")
        return total, torch.tensor(targets.shape[0], device=hidden.device)

    @torch.no_grad()
    def generate(self, batch: dict, prompts: list[list[int]], image_offsets: list[int], max_new_tokens: int,
                 stop_ids: list[int], streamer=None) -> list[list[int]]:
        """Greedy continuations of token prompts, each with the batch's image inserted before token
        `image_offsets[i]`; rows are left-padded. Returns each row's new tokens up to (without) the first stop id."""
        prefix = self.image_prefix(batch)
        device = prefix.device
        text_ids = torch.tensor([t for prompt in prompts for t in prompt], dtype=torch.long, device=device)
        lengths = torch.tensor([len(prompt) for prompt in prompts], device=device)
        layout = pad_samples(text_ids, text_ids, lengths, torch.tensor(image_offsets, device=device), prefix.shape[1],
                             self.pad_id, left=True)
        output = self.llm.generate(
            inputs_embeds=self.embed(layout, prefix), attention_mask=layout.attention_mask,
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=self.pad_id,
            streamer=streamer,
        )
        stops = set(stop_ids)
        continuations = []
        for row in output.tolist():
            end = next((index for index, token in enumerate(row) if token in stops), len(row))
            continuations.append(row[:end])
        return continuations

    def generate_captions(self, batch: dict, max_new_tokens: int = 32) -> list[list[int]]:
        """Greedy captions, from exactly the training format: BOS, the image prefix, then generated tokens."""
        size = batch["pixel_values" if "pixel_values" in batch else "image_features"].shape[0]
        return self.generate(batch, [[self.bos_id]] * size, [1] * size, max_new_tokens, [self.eos_id])


def build_anymal(config: ModelConfig, tokenizer, *, load_vision: bool = True, llm=None, device=None,
                 resampler: PerceiverResampler | None = None) -> AnyMAL:
    """Load the frozen towers (by hub id or path) and build a fresh resampler sized between them (unless given).

    `device` is where a quantized LLM is loaded (see `load_llm`); everything else is built on the CPU."""
    llm = llm if llm is not None else load_llm(config.llm, device)
    vision = load_vision_tower(config.vision) if load_vision else None
    if resampler is None:
        vision_width = vision.width if vision is not None else _vision_width(config.vision.model)
        resampler = build_resampler(config, vision_width, llm.config.hidden_size)
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if bos_id is None or eos_id is None:
        raise ValueError(f"tokenizer of {config.llm.model} lacks a bos or eos token; stage 1 needs both")
    return AnyMAL(vision, resampler, llm, bos_id, eos_id, pad_id, packing=config.packing,
                  max_caption_tokens=config.max_caption_tokens, max_sequence_tokens=config.max_sequence_tokens)


def build_resampler(config: ModelConfig, vision_width: int, llm_width: int) -> PerceiverResampler:
    r = config.resampler
    return PerceiverResampler(
        vision_width, llm_width, num_latents=r.num_latents, depth=r.depth, heads=r.heads, head_dim=r.head_dim,
        width=r.width, ff_mult=r.ff_mult,
    )


def _vision_width(model: str) -> int:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig.from_pretrained(model).hidden_size
