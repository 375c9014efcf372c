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
from pipeline.model.llama_layers import FUSED_QKV, fuse_qkv, last_layer_at_rows, packed_layer, supports_packed_layers
from pipeline.model.llm import load_llm
from pipeline.model.resampler import PerceiverResampler
from pipeline.model.vision import VisionTower, load_vision_tower

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# The batch fields that go to the model's device. Token ids, labels, lengths and offsets stay on the host, where the
# token layout is built (`TokenLayout`): there every size is known without waiting for the GPU.
IMAGE_INPUTS = ("pixel_values", "image_features")
# Supervised positions go through the LM head in chunks of this many tokens, so the [tokens, vocab] logits of a
# 128K vocabulary are never materialised for a whole batch at once.
LOGIT_CHUNK_TOKENS = 4096


@dataclass
class LastLayerRows:
    """Where the LLM's last decoder layer must compute outputs in a packed row, and what it must attend to.

    Only the hidden states that predict a supervised token reach the loss, so the last layer computes queries,
    attention output and MLP only from each sample's first such position to its last (`query_positions`), attending
    to its keys and values from the sample's start up to that last position (`key_positions`). Each sample's query
    span ends where its key span ends, which is the bottom-right causal alignment of flash attention's varlen
    kernels. In stage 1 that skips the BOS and image positions: ~78% of the last layer's rows.
    """

    query_positions: torch.Tensor  # [Q] columns of the packed row, sample-major
    key_positions: torch.Tensor  # [K]
    cu_query: torch.Tensor  # int32 [B + 1] sample boundaries within query_positions
    cu_key: torch.Tensor  # int32 [B + 1]
    loss_rows: torch.Tensor  # [S] row of each supervised position within query_positions


@dataclass
class TokenLayout:
    """LLM input rows holding several samples' tokens, each with the resampler's embeddings at its image offset.

    Packed (`pack_samples`): one row, `position_ids` restarting at 0 for every sample and no attention mask, so the
    LLM's attention (SDPA, flex or flash varlen in transformers) is block-diagonal causal and no token attends across
    samples. Padded (`pad_samples`): one row per sample with an `attention_mask`. Both give the same summed loss.

    Layouts are built where the texts are: in training on the host, where every size is known, so that moving the
    layout to the GPU (`to`) and indexing with it never waits for the device.
    """

    input_ids: torch.Tensor  # [rows, T]; image slots hold a filler id, replaced by embeddings
    labels: torch.Tensor  # [rows, T]; IGNORE_INDEX except at supervised tokens
    prefix_rows: torch.Tensor  # [B * prefix_length] row of each image slot, sample-major
    prefix_positions: torch.Tensor  # [B * prefix_length] column of each image slot, sample-major
    loss_positions: torch.Tensor  # [S] flat index (row * T + column) of each position whose next token is supervised
    targets: torch.Tensor  # [S] the supervised token each of those positions predicts
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    cu_seq_lens: torch.Tensor | None = None  # packed: int32 [B + 1] sample boundaries in the row
    last_layer: LastLayerRows | None = None

    def to(self, device: torch.device) -> TokenLayout:
        """The layout on `device`: its tensors travel as one buffer in one asynchronous copy. The buffer (~0.5 MB)
        stays pageable: CUDA stages it at once without waiting for the device, where a page-locked buffer per step
        would wait for an allocation whenever the last one is still in flight."""
        fields = {name: value for name, value in vars(self).items() if value is not None}
        rows = fields.pop("last_layer", None)
        if rows is not None:
            fields.update({f"last_layer.{name}": value for name, value in vars(rows).items()})
        flat = torch.cat([value.reshape(-1).long() for value in fields.values()])
        pieces = flat.to(device, non_blocking=True).split([value.numel() for value in fields.values()])
        fields = {
            name: piece.view(value.shape).to(value.dtype)
            for (name, value), piece in zip(fields.items(), pieces, strict=True)
        }
        rows = {name.partition(".")[2]: fields.pop(name) for name in list(fields) if name.startswith("last_layer.")}
        return TokenLayout(**fields, last_layer=LastLayerRows(**rows) if rows else None)


def _slots(offset: torch.Tensor, image_start: torch.Tensor, prefix_length: int) -> torch.Tensor:
    return (offset >= image_start) & (offset < image_start + prefix_length)


def _loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions whose next token is supervised, and those tokens (the shifted next-token targets)."""
    following = labels[:, 1:]
    rows, columns = torch.nonzero(following != IGNORE_INDEX, as_tuple=True)
    return rows * labels.shape[1] + columns, following[rows, columns]


def _spans(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The concatenated ranges [starts[i], starts[i] + lengths[i])."""
    total = int(lengths.sum())
    begin = torch.cumsum(lengths, 0) - lengths
    return torch.arange(total, device=lengths.device) + torch.repeat_interleave(
        starts - begin, lengths, output_size=total
    )


def _boundaries(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def last_layer_rows(loss_positions: torch.Tensor, starts: torch.Tensor) -> LastLayerRows:
    """`LastLayerRows` of a packed row whose samples begin at `starts`, from its (ascending) loss positions."""
    count = starts.shape[0]
    sample = torch.bucketize(loss_positions, starts, right=True) - 1
    first = torch.full((count,), torch.iinfo(torch.long).max, dtype=torch.long, device=starts.device)
    first = first.scatter_reduce(0, sample, loss_positions, "amin")
    last = torch.full((count,), -1, dtype=torch.long, device=starts.device)
    last = last.scatter_reduce(0, sample, loss_positions, "amax")
    supervised = last >= 0  # a sample with nothing to predict gets empty spans
    first = torch.where(supervised, first, starts)
    query_lengths = torch.where(supervised, last - first + 1, 0)
    key_lengths = torch.where(supervised, last - starts + 1, 0)
    cu_query = _boundaries(query_lengths)
    return LastLayerRows(
        query_positions=_spans(first, query_lengths),
        key_positions=_spans(starts, key_lengths),
        cu_query=cu_query,
        cu_key=_boundaries(key_lengths),
        loss_rows=cu_query.long()[sample] + loss_positions - first[sample],
    )


def pack_samples(
    text_ids: torch.Tensor,
    text_labels: torch.Tensor,
    text_lengths: torch.Tensor,
    image_offsets: torch.Tensor,
    prefix_length: int,
    filler_id: int,
) -> TokenLayout:
    """Pack samples into one row. Sample i is text i with `prefix_length` image slots before its token
    `image_offsets[i]`; `text_ids` and `text_labels` are the samples' texts concatenated."""
    device = text_ids.device
    lengths, image_offsets = text_lengths.to(device), image_offsets.to(device)
    sample_lengths = lengths + prefix_length
    starts = torch.cumsum(sample_lengths, 0) - sample_lengths
    total = int(sample_lengths.sum())
    sample_of = torch.repeat_interleave(
        torch.arange(lengths.shape[0], device=device), sample_lengths, output_size=total
    )
    offset = torch.arange(total, device=device) - starts[sample_of]
    image_slot = _slots(offset, image_offsets[sample_of], prefix_length)
    input_ids = torch.full(offset.shape, filler_id, dtype=torch.long, device=device)
    input_ids[~image_slot] = text_ids
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[~image_slot] = text_labels
    prefix_positions = _spans(starts + image_offsets, torch.full_like(starts, prefix_length))
    return TokenLayout(
        input_ids[None],
        labels[None],
        torch.zeros_like(prefix_positions),
        prefix_positions,
        *_loss_positions(labels[None]),
        position_ids=offset[None],
        cu_seq_lens=_boundaries(sample_lengths),
    )


def pad_samples(
    text_ids: torch.Tensor,
    text_labels: torch.Tensor,
    text_lengths: torch.Tensor,
    image_offsets: torch.Tensor,
    prefix_length: int,
    pad_id: int,
    left: bool = False,
) -> TokenLayout:
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
    return TokenLayout(input_ids, labels, rows, positions, *_loss_positions(labels), attention_mask=present.long())


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


def caption_sequence(
    caption_ids: torch.Tensor, caption_lengths: torch.Tensor, prefix_length: int, bos_id: int, pad_id: int
) -> TokenLayout:
    """Concatenated captions (each ending in EOS) as right-padded rows of BOS, image prefix, caption."""
    return pad_samples(*caption_text(caption_ids, caption_lengths, bos_id), prefix_length, pad_id)


def packed_caption_sequence(
    caption_ids: torch.Tensor, caption_lengths: torch.Tensor, prefix_length: int, bos_id: int
) -> TokenLayout:
    """A micro batch's captions packed into one row of [BOS, prefix, caption] per sample (prefix slots hold BOS)."""
    return pack_samples(*caption_text(caption_ids, caption_lengths, bos_id), prefix_length, bos_id)


class AnyMAL(nn.Module):
    """The composed model. `vision` is None when training reads cached features instead of images."""

    def __init__(
        self,
        vision: VisionTower | None,
        resampler: PerceiverResampler,
        llm,
        bos_id: int,
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
        # Packed varlen rows run a frozen LLaMA's layers spelled out (`pipeline.model.llama_layers`), q/k/v as one
        # GEMM; the last layer computes only the rows the loss reads. False runs HF's layers (benchmarks compare).
        self.packed_layers = True
        self.fuse_qkv = True
        self.prune_last_layer = True
        self._layer_fns = None
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
        return self.text_image_loss(
            prefix,
            *caption_text(batch["caption_ids"], batch["caption_lengths"], self.bos_id),
            max_length=1 + prefix.shape[1] + self.max_caption_tokens,
        )

    def conversation_loss(self, batch: dict, resampler=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2: summed cross-entropy over the assistant turns (`text_labels`) and their count."""
        prefix = self.image_prefix(batch, resampler)
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
            layout = pack_samples(text_ids, text_labels, text_lengths, image_offsets, prefix_length, self.bos_id)
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
            if self.prune_last_layer and supports_packed_layers(decoder.layers[-1]):
                layout.last_layer = last_layer_rows(layout.loss_positions, layout.cu_seq_lens[:-1].long())
        layout = layout.to(prefix.device)
        embeddings = self.embed(layout, prefix)
        if varlen:
            hidden = self._packed_hidden(decoder, embeddings, layout, bound)
        else:
            hidden = decoder(
                inputs_embeds=embeddings,
                position_ids=layout.position_ids,
                attention_mask=layout.attention_mask,
                use_cache=False,
            ).last_hidden_state
        rows = layout.loss_positions if layout.last_layer is None else layout.last_layer.loss_rows
        return self.supervised_loss(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), layout.targets)

    def _packed_hidden(self, decoder, embeddings: torch.Tensor, layout: TokenLayout, bound: int) -> torch.Tensor:
        """The decoder over a packed row, each layer's varlen attention bounded by the samples' boundaries. With
        `layout.last_layer`, the last layer computes only the rows the loss reads: [1, Q, width] comes back."""
        layers = decoder.layers
        if not self._spelled_out_layers(layers):
            return self._hf_packed_hidden(decoder, embeddings, layout, bound)
        layer_fn, last_layer_fn = self._layer_functions(layers[-1])
        cos, sin = (table[0] for table in decoder.rotary_emb(embeddings, layout.position_ids))
        hidden = embeddings[0]
        pruned = layout.last_layer is not None
        for layer in layers[:-1] if pruned else layers:
            hidden = layer_fn(layer, hidden, cos, sin, layout.cu_seq_lens, bound)
        if pruned:
            hidden = last_layer_fn(layers[-1], hidden, cos, sin, layout.last_layer, bound)
        return decoder.norm(hidden)[None]

    def _spelled_out_layers(self, layers) -> bool:
        """Whether the packed forward runs `packed_layer`: for LLaMA layers whose q/k/v all fuse (stage 1's frozen
        LLM). With adapters or 4-bit weights (stage 2) q/k/v stay three projections, and there the spelled-out layer
        measured no faster than HF's (12,069 vs 12,355 tokens/s on an H200), so HF's runs. `fuse_qkv = False` runs
        the spelled-out layer unfused (benchmarks compare)."""
        if not self.packed_layers or not all(supports_packed_layers(layer) for layer in layers):
            return False
        if self.fuse_qkv:
            return all([fuse_qkv(layer.self_attn) for layer in layers])  # a list: every layer is fused or checked
        for layer in layers:
            if hasattr(layer.self_attn, FUSED_QKV):
                delattr(layer.self_attn, FUSED_QKV)  # the weights stay views of its storage, which they keep
        return True

    def _layer_functions(self, layer):
        """`packed_layer` and `last_layer_at_rows`, compiled when the LLM's layers are (model.llm.compile_layers):
        one graph serves every layer, since dynamo treats a layer's weights as inputs."""
        if self._layer_fns is None:
            compiled = getattr(layer, "_compiled_call_impl", None) is not None
            functions = (packed_layer, last_layer_at_rows)
            self._layer_fns = tuple(torch.compile(fn, dynamic=True) for fn in functions) if compiled else functions
        return self._layer_fns

    def _hf_packed_hidden(self, decoder, embeddings: torch.Tensor, layout: TokenLayout, bound: int) -> torch.Tensor:
        """HF's decoder layers over the packed row, the boundaries passed to their varlen attention as kwargs; the
        last layer at the loss rows if `layout.last_layer` (LLaMA layers only)."""
        boundaries = varlen_kwargs(layout.cu_seq_lens, bound)
        if layout.last_layer is None:
            return decoder(
                inputs_embeds=embeddings, position_ids=layout.position_ids, use_cache=False, **boundaries
            ).last_hidden_state
        layers = decoder.layers
        position_embeddings = decoder.rotary_emb(embeddings, layout.position_ids)
        hidden = embeddings
        for layer in layers[:-1]:
            hidden = layer(
                hidden, position_embeddings=position_embeddings, position_ids=layout.position_ids, **boundaries
            )
        _, last_layer_fn = self._layer_functions(layers[-1])
        cos, sin = (table[0] for table in position_embeddings)
        hidden = last_layer_fn(layers[-1], hidden[0], cos, sin, layout.last_layer, bound)
        return decoder.norm(hidden)[None]

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
        """Greedy captions, from exactly the training format: BOS, the image prefix, then generated tokens."""
        size = batch["pixel_values" if "pixel_values" in batch else "image_features"].shape[0]
        return self.generate(batch, [[self.bos_id]] * size, [1] * size, max_new_tokens)


def terminator_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token id that ends a generation: the tokenizer's EOS, <|eot_id|> when the vocabulary has it, and the
    EOS id or ids of the model's generation config. LLaMA-3-8B-Instruct lists <|end_of_text|> and <|eot_id|> there,
    and depending on its tokenizer's release, EOS is one or the other."""
    ids = {tokenizer.eos_token_id}
    if "<|eot_id|>" in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids("<|eot_id|>"))
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
        vision_width = vision.width if vision is not None else _vision_width(config.vision.model)
        resampler = build_resampler(config, vision_width, llm.config.hidden_size)
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if bos_id is None or eos_id is None:
        raise ValueError(f"tokenizer of {config.llm.model} lacks a bos or eos token; stage 1 needs both")
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


def _vision_width(model: str) -> int:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig.from_pretrained(model).hidden_size
