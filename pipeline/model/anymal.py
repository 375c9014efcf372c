"""AnyMAL for images: vision features → Perceiver Resampler → image tokens among the LLM's input embeddings.

Stage 1's sequence is BOS (for a model that has one; Qwen has none and starts with the image), the resampler's
tokens, the caption tokens, then the tokenizer's EOS; the loss covers only the caption tokens and EOS. Stage 2's is
a chat-templated conversation with the image tokens at the sample's image offset (see `pipeline.data.conversations`);
the loss covers the assistant turns. Both go through the same layouts
(`pack_samples`, `pad_samples`), loss (`supervised_loss`) and generation (`generate`), so training, generation and
evaluation share one format. Model code knows nothing of DeepSpeed: the trainer's stage decides what it wraps.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model.attention import VARLEN, varlen_kwargs
from pipeline.model.layout import TokenLayout, caption_text, pack_samples, pad_samples
from pipeline.model.llm import end_of_turn_tokens, load_llm
from pipeline.model.resampler import PerceiverResampler
from pipeline.model.vision import VisionTower, load_vision_tower, tower_width

log = logging.getLogger(__name__)

# The batch fields that go to the model's device. Token ids, labels, lengths and offsets stay on the host, where the
# token layout is built (`TokenLayout`): there every size is known without waiting for the GPU.
IMAGE_INPUTS = ("pixel_values", "image_features")
# Supervised positions go through the LM head in chunks of this many tokens, so the [tokens, vocab] logits of a
# 128K vocabulary are never materialised for a whole batch at once.
LOGIT_CHUNK_TOKENS = 4096


class AnyMAL(nn.Module):
    """The composed model. `vision` is None when training reads cached features instead of images."""

    def __init__(
        self,
        vision: VisionTower | None,
        resampler: PerceiverResampler,
        llm,
        bos_id: int | None,
        eos_id: int,
        pad_id: int,
        packing: bool = True,
        max_caption_tokens: int = 64,
        max_sequence_tokens: int = 2048,
        stop_ids: list[int] | None = None,
    ):
        super().__init__()
        self.vision = vision
        self.resampler = resampler
        self.llm = llm
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        # Every token that ends a generation (`terminator_ids`); build_anymal passes the model's full set.
        self.stop_ids = sorted(set(stop_ids or ()) | {eos_id})
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
        log.info(
            "%s trains %s parameters (resampler %s, LLM adapters %s); %s frozen",
            stage,
            f"{sum(trainable.values()):,}",
            f"{resampler:,}",
            f"{sum(trainable.values()) - resampler:,}",
            f"{frozen:,}",
        )
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

    def image_prefix(self, batch: dict) -> torch.Tensor:
        """Resampler tokens for a batch holding `pixel_values` (through the frozen tower) or `image_features`."""
        resampler = self.resampler
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

    def caption_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: summed token cross-entropy over caption tokens and EOS, and the number of those tokens.

        The sum, not the mean, is returned so that the trainer can divide by the supervised-token count of the
        whole global batch: every token then weighs the same whatever the micro-batch split or world size.
        """
        prefix = self.image_prefix(batch)
        return self.text_image_loss(
            prefix,
            *caption_text(batch["caption_ids"], batch["caption_lengths"], self.bos_id),
            max_length=(0 if self.bos_id is None else 1) + prefix.shape[1] + self.max_caption_tokens,
        )

    def conversation_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2: summed cross-entropy over the assistant turns (`text_labels`) and their count."""
        prefix = self.image_prefix(batch)
        return self.text_image_loss(
            prefix,
            batch["text_ids"],
            batch["text_labels"],
            batch["text_lengths"],
            batch["image_offsets"],
            max_length=self.max_sequence_tokens,
        )

    def text_image_loss(
        self,
        prefix: torch.Tensor,
        text_ids: torch.Tensor,
        text_labels: torch.Tensor,
        text_lengths: torch.Tensor,
        image_offsets: torch.Tensor,
        max_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss and supervised-token count of texts with the image tokens inserted at their offsets.

        The layout is built where the texts are (the trainer leaves them on the host) and then moved to the
        prefix's device, so no step of it waits for the GPU. `max_length` bounds a sample's length (image tokens
        included); varlen attention is sized by it."""
        prefix_length = prefix.shape[1]
        decoder = self.llm.get_decoder()
        varlen = self.packing and self.llm.config._attn_implementation == VARLEN
        if self.packing:
            layout = pack_samples(text_ids, text_labels, text_lengths, image_offsets, prefix_length, self.pad_id)
        else:
            layout = pad_samples(text_ids, text_labels, text_lengths, image_offsets, prefix_length, self.pad_id)
        if varlen:
            longest = int(text_lengths.max()) + prefix_length
            bound = max_length or longest
            if longest > bound:  # the kernel would silently cut it short
                raise RuntimeError(
                    f"a packed sample of {longest} tokens is longer than the configured maximum "
                    f"({bound}: 1 + image tokens + model.max_caption_tokens, or max_sequence_tokens)"
                )
        layout = layout.to(prefix.device)
        embeddings = self.embed(layout, prefix)
        if varlen:
            states = self._packed_states(decoder, embeddings, layout, bound)
        else:
            hidden = decoder(
                inputs_embeds=embeddings,
                position_ids=layout.position_ids,
                attention_mask=layout.attention_mask,
                use_cache=False,
            ).last_hidden_state
            states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, layout.loss_positions)
        return self.supervised_loss(states, layout.targets)

    def _packed_states(self, decoder, embeddings: torch.Tensor, layout: TokenLayout, bound: int) -> torch.Tensor:
        """Hidden states [S, width] at the loss positions of a packed row, through HF's decoder layers, each attending
        within the samples' boundaries (passed to the attention as kwargs, `varlen_kwargs`)."""
        hidden = decoder(
            inputs_embeds=embeddings,
            position_ids=layout.position_ids,
            use_cache=False,
            **varlen_kwargs(layout.cu_seq_lens, bound),
        ).last_hidden_state
        return hidden[0].index_select(0, layout.loss_positions)

    def supervised_loss(self, states: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token loss of the hidden `states` [S, width] that predict `targets` [S], chunked through the
        LM head; and S, as a host tensor (known without asking the device)."""
        head = self.llm.get_output_embeddings()
        total = states.new_zeros((), dtype=torch.float32)
        for begin in range(0, targets.shape[0], LOGIT_CHUNK_TOKENS):
            logits = head(states[begin : begin + LOGIT_CHUNK_TOKENS]).float()
            total = total + F.cross_entropy(logits, targets[begin : begin + LOGIT_CHUNK_TOKENS], reduction="sum")
        return total, torch.tensor(targets.shape[0])

    @torch.no_grad()
    def generate(
        self,
        batch: dict,
        prompts: list[list[int]],
        image_offsets: list[int],
        max_new_tokens: int,
        streamer=None,
    ) -> list[list[int]]:
        """Greedy continuations of token prompts, each with the batch's image inserted before token
        `image_offsets[i]`; rows are left-padded. Returns each row's new tokens up to (without) the first of
        `stop_ids`, the model's terminators."""
        prefix = self.image_prefix(batch)
        device = prefix.device
        text_ids = torch.tensor([t for prompt in prompts for t in prompt], dtype=torch.long, device=device)
        lengths = torch.tensor([len(prompt) for prompt in prompts], device=device)
        layout = pad_samples(
            text_ids,
            text_ids,
            lengths,
            torch.tensor(image_offsets, device=device),
            prefix.shape[1],
            self.pad_id,
            left=True,
        )
        output = self.llm.generate(
            inputs_embeds=self.embed(layout, prefix),
            attention_mask=layout.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            # Replaces generation_config's EOS ids for this call; stop_ids includes them.
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            streamer=streamer,
        )
        stops = set(self.stop_ids)
        continuations = []
        for row in output.tolist():
            end = next((index for index, token in enumerate(row) if token in stops), len(row))
            continuations.append(row[:end])
        return continuations

    def generate_captions(self, batch: dict, max_new_tokens: int = 32) -> list[list[int]]:
        """Greedy captions, from exactly the training format: BOS (if the model has one), the image prefix, then
        generated tokens."""
        size = batch["pixel_values" if "pixel_values" in batch else "image_features"].shape[0]
        prompt = [] if self.bos_id is None else [self.bos_id]
        return self.generate(batch, [prompt] * size, [len(prompt)] * size, max_new_tokens)


def terminator_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token id that ends a generation: the tokenizer's EOS, the end-of-turn token of the families in
    `LLM_FAMILIES` that the vocabulary has (<|eot_id|>, <|im_end|>), and the EOS id or ids of the model's generation
    config. LLaMA-3-8B-Instruct lists <|end_of_text|> and <|eot_id|> there, and depending on its tokenizer's release,
    EOS is one or the other; Qwen3's lists <|im_end|> and <|endoftext|>; Mistral's turns end with EOS."""
    ids = {tokenizer.eos_token_id}
    vocabulary = tokenizer.get_vocab()
    ids.update(vocabulary[token] for token in end_of_turn_tokens() if token in vocabulary)
    configured = getattr(generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(int(token) for token in ids if token is not None)


def build_anymal(
    config: ModelConfig,
    tokenizer,
    *,
    load_vision: bool = True,
    llm=None,
    device=None,
    resampler: PerceiverResampler | None = None,
) -> AnyMAL:
    """Load the frozen towers (by hub id or path) and build a fresh resampler sized between them (unless given).

    `device` is where a quantized LLM is loaded (see `load_llm`); everything else is built on the CPU."""
    llm = llm if llm is not None else load_llm(config.llm, device)
    vision = load_vision_tower(config.vision) if load_vision else None
    if resampler is None:
        vision_width = vision.width if vision is not None else tower_width(config.vision.model)
        resampler = build_resampler(config, vision_width, llm.config.hidden_size)
    # BOS may be absent (Qwen): stage-1 rows then start with the image (`caption_text`).
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if eos_id is None:
        raise ValueError(f"tokenizer of {config.llm.model} lacks an eos token; captions and turns must end in one")
    return AnyMAL(
        vision,
        resampler,
        llm,
        bos_id,
        eos_id,
        pad_id,
        packing=config.packing,
        max_caption_tokens=config.max_caption_tokens,
        max_sequence_tokens=config.max_sequence_tokens,
        stop_ids=terminator_ids(tokenizer, getattr(llm, "generation_config", None)),
    )


def build_resampler(config: ModelConfig, vision_width: int, llm_width: int) -> PerceiverResampler:
    r = config.resampler
    return PerceiverResampler(
        vision_width,
        llm_width,
        num_latents=r.num_latents,
        depth=r.depth,
        heads=r.heads,
        head_dim=r.head_dim,
        width=r.width,
        ff_mult=r.ff_mult,
    )
