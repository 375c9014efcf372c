"""AnyMAL for images: vision features → Perceiver Resampler → a prefix of LLM input embeddings.

The caption sequence is always BOS, the resampler's tokens, the caption tokens, then EOS; the loss covers only the
caption tokens and EOS. Training, generation and evaluation all build their sequences here, so the three share one
format. Model code knows nothing of DeepSpeed: the trainer wraps `resampler` and calls `caption_loss`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model.llm import load_llm
from pipeline.model.resampler import PerceiverResampler
from pipeline.model.vision import VisionTower, load_vision_tower

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Supervised positions go through the LM head in chunks of this many tokens, so the [tokens, vocab] logits of a
# 128K vocabulary are never materialised for a whole batch at once.
LOGIT_CHUNK_TOKENS = 4096


@dataclass
class CaptionSequence:
    """A padded batch of BOS + prefix + caption rows; `labels` is IGNORE_INDEX except on caption tokens and EOS."""

    input_ids: torch.Tensor  # [B, T]; prefix positions hold a placeholder id, replaced by embeddings
    labels: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    prefix_start: int  # column of the first image embedding (1, after BOS)
    prefix_length: int


def caption_sequence(
    caption_ids: torch.Tensor, caption_lengths: torch.Tensor, prefix_length: int, bos_id: int, pad_id: int
) -> CaptionSequence:
    """Lay out concatenated captions (each ending in EOS) as right-padded rows behind BOS and the image prefix."""
    batch = caption_lengths.shape[0]
    longest = int(caption_lengths.max())
    start = 1 + prefix_length
    columns = torch.arange(longest, device=caption_lengths.device)
    present = columns.unsqueeze(0) < caption_lengths.unsqueeze(1)  # row-major order matches the concatenation
    input_ids = torch.full((batch, start + longest), pad_id, dtype=torch.long, device=caption_ids.device)
    input_ids[:, 0] = bos_id
    input_ids[:, start:][present] = caption_ids
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, start:][present] = caption_ids
    attention_mask = torch.zeros_like(input_ids)
    attention_mask[:, :start] = 1
    attention_mask[:, start:][present] = 1
    return CaptionSequence(input_ids, labels, attention_mask, 1, prefix_length)


@dataclass
class PackedCaptionSequence:
    """All samples of a micro batch packed into one row: [BOS, prefix, caption] per sample, back to back.

    `position_ids` restart at 0 for every sample and no attention mask is passed, so the LLM's attention (SDPA,
    flex or flash varlen in transformers) is block-diagonal causal: no token attends across samples. The summed
    loss equals that of the padded layout, token for token.
    """

    input_ids: torch.Tensor  # [1, T]
    labels: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    prefix_positions: torch.Tensor  # [B * prefix_length] columns that take the image embeddings, sample-major


def packed_caption_sequence(
    caption_ids: torch.Tensor, caption_lengths: torch.Tensor, prefix_length: int, bos_id: int
) -> PackedCaptionSequence:
    device = caption_ids.device
    lengths = caption_lengths.to(device)
    sample_lengths = 1 + prefix_length + lengths
    starts = torch.cumsum(sample_lengths, 0) - sample_lengths
    total = int(sample_lengths.sum())
    sample_of = torch.repeat_interleave(torch.arange(lengths.shape[0], device=device), sample_lengths)
    offset = torch.arange(total, device=device) - starts[sample_of]
    caption_slot = offset > prefix_length  # offset 0 is BOS, 1..prefix_length the image
    input_ids = torch.full((total,), bos_id, dtype=torch.long, device=device)
    input_ids[caption_slot] = caption_ids
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[caption_slot] = caption_ids
    prefix_positions = torch.nonzero((offset >= 1) & (offset <= prefix_length)).flatten()
    return PackedCaptionSequence(input_ids[None], labels[None], offset[None], prefix_positions)


class AnyMAL(nn.Module):
    """The composed model. `vision` is None when training reads cached features instead of images."""

    def __init__(self, vision: VisionTower | None, resampler: PerceiverResampler, llm, bos_id: int, eos_id: int,
                 pad_id: int, packing: bool = True):
        super().__init__()
        self.vision = vision
        self.resampler = resampler
        self.llm = llm
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.packing = packing

    def freeze_for_stage1(self) -> int:
        """Only the resampler trains; returns its trainable parameter count after checking nothing else does."""
        if self.vision is not None:
            self.vision.requires_grad_(False)
        self.llm.requires_grad_(False)
        self.resampler.requires_grad_(True)
        stray = [name for name, p in self.named_parameters() if p.requires_grad and not name.startswith("resampler.")]
        if stray:
            raise RuntimeError(f"stage 1 must train only the resampler, but these also train: {stray[:5]}")
        trainable = sum(p.numel() for p in self.resampler.parameters())
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        log.info("stage 1 trains the resampler only: %s trainable, %s frozen parameters", f"{trainable:,}",
                 f"{frozen:,}")
        return trainable

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

    def embed_sequence(self, sequence: CaptionSequence, prefix: torch.Tensor) -> torch.Tensor:
        embeddings = self.llm.get_input_embeddings()(sequence.input_ids)
        start, end = sequence.prefix_start, sequence.prefix_start + sequence.prefix_length
        return torch.cat([embeddings[:, :start], prefix.to(embeddings.dtype), embeddings[:, end:]], dim=1)

    def caption_loss(self, batch: dict, resampler=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed token cross-entropy over caption tokens and EOS, and the number of those tokens.

        The sum, not the mean, is returned so that the trainer can divide by the supervised-token count of the
        whole global batch: every token then weighs the same whatever the micro-batch split or world size.
        """
        prefix = self.image_prefix(batch, resampler)
        if self.packing:
            packed = packed_caption_sequence(batch["caption_ids"], batch["caption_lengths"], prefix.shape[1],
                                             self.bos_id)
            embeddings = self.llm.get_input_embeddings()(packed.input_ids)
            rows = torch.zeros_like(packed.prefix_positions)
            embeddings = embeddings.index_put(
                (rows, packed.prefix_positions), prefix.reshape(-1, prefix.shape[-1]).to(embeddings.dtype)
            )
            hidden = self.llm.get_decoder()(
                inputs_embeds=embeddings, position_ids=packed.position_ids, attention_mask=None, use_cache=False
            ).last_hidden_state
            return self.supervised_loss(hidden, packed.labels)
        sequence = caption_sequence(
            batch["caption_ids"], batch["caption_lengths"], prefix.shape[1], self.bos_id, self.pad_id
        )
        hidden = self.llm.get_decoder()(
            inputs_embeds=self.embed_sequence(sequence, prefix), attention_mask=sequence.attention_mask,
            use_cache=False,
        ).last_hidden_state
        return self.supervised_loss(hidden, sequence.labels)

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
    def generate_captions(self, batch: dict, max_new_tokens: int = 32) -> list[list[int]]:
        """Greedy captions, from exactly the training format: BOS, the image prefix, then generated tokens."""
        prefix = self.image_prefix(batch)
        batch_size = prefix.shape[0]
        empty = torch.zeros(0, dtype=torch.long, device=prefix.device)
        sequence = caption_sequence(
            empty, torch.zeros(batch_size, dtype=torch.long, device=prefix.device), prefix.shape[1], self.bos_id,
            self.pad_id,
        )
        embeds = self.embed_sequence(sequence, prefix)
        output = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=sequence.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )
        captions = []
        for row in output.tolist():
            tokens = []
            for token in row:
                if token == self.eos_id:
                    break
                tokens.append(token)
            captions.append(tokens)
        return captions


def build_anymal(config: ModelConfig, tokenizer, *, load_vision: bool = True, llm=None) -> AnyMAL:
    """Load the frozen towers (by hub id or path) and build a fresh resampler sized between them."""
    llm = llm if llm is not None else load_llm(config.llm)
    vision = load_vision_tower(config.vision) if load_vision else None
    vision_width = vision.width if vision is not None else _vision_width(config.vision.model)
    resampler = build_resampler(config, vision_width, llm.config.hidden_size)
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if bos_id is None or eos_id is None:
        raise ValueError(f"tokenizer of {config.llm.model} lacks a bos or eos token; stage 1 needs both")
    return AnyMAL(vision, resampler, llm, bos_id, eos_id, pad_id, packing=config.packing)


def build_resampler(config: ModelConfig, vision_width: int, llm_width: int) -> PerceiverResampler:
    r = config.resampler
    return PerceiverResampler(
        vision_width, llm_width, num_latents=r.num_latents, depth=r.depth, heads=r.heads, head_dim=r.head_dim,
        width=r.width, ff_mult=r.ff_mult,
    )


def _vision_width(model: str) -> int:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig.from_pretrained(model).hidden_size
