"""Where each sample's tokens and image slots go in the LLM's input rows, and which positions the loss reads.

Packed (`pack_samples`): a micro batch in one row, positions restarting at every sample, the samples' boundaries for
varlen attention. Padded (`pad_samples`): one row per sample with an attention mask, on the right for training and on
the left for generation. Both give the same summed loss; stage 1's texts are BOS (where the model has one) then the
caption (`caption_text`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.common.labels import IGNORE_INDEX


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

    def to(self, device: torch.device) -> TokenLayout:
        """The layout on `device`: its tensors travel as one buffer in one asynchronous copy. The buffer (~0.5 MB)
        stays pageable: CUDA stages it at once without waiting for the device, where a page-locked buffer per step
        would wait for an allocation whenever the last one is still in flight."""
        fields = {name: value for name, value in vars(self).items() if value is not None}
        flat = torch.cat([value.reshape(-1).long() for value in fields.values()])
        pieces = flat.to(device, non_blocking=True).split([value.numel() for value in fields.values()])
        fields = {
            name: piece.view(value.shape).to(value.dtype)
            for (name, value), piece in zip(fields.items(), pieces, strict=True)
        }
        return TokenLayout(**fields)


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


def caption_text(caption_ids: torch.Tensor, caption_lengths: torch.Tensor, bos_id: int | None):
    """Stage 1's texts: BOS then the caption (its tokens and EOS supervised), the image right after BOS.

    A model without a BOS token (Qwen's tokenizers have none, and Qwen was never trained with one) starts each row
    with the image instead: no substitute token is invented, and the last image token predicts the first caption
    token. Returns (text_ids, text_labels, text_lengths, image_offsets) as `pack_samples` and `pad_samples` take them.
    """
    if bos_id is None:
        lengths = caption_lengths.to(caption_ids.device)
        return caption_ids, caption_ids, lengths, torch.zeros_like(lengths)
    lengths = caption_lengths.to(caption_ids.device) + 1
    starts = torch.cumsum(lengths, 0) - lengths
    text_ids = torch.full((int(lengths.sum()),), bos_id, dtype=torch.long, device=caption_ids.device)
    caption_slot = torch.ones_like(text_ids, dtype=torch.bool)
    caption_slot[starts] = False
    text_ids[caption_slot] = caption_ids
    text_labels = text_ids.masked_fill(~caption_slot, IGNORE_INDEX)
    return text_ids, text_labels, lengths, torch.ones_like(lengths)


def caption_sequence(
    caption_ids: torch.Tensor, caption_lengths: torch.Tensor, prefix_length: int, bos_id: int | None, pad_id: int
) -> TokenLayout:
    """Concatenated captions (each ending in EOS) as right-padded rows of BOS (if any), image prefix, caption."""
    return pad_samples(*caption_text(caption_ids, caption_lengths, bos_id), prefix_length, pad_id)


def packed_caption_sequence(
    caption_ids: torch.Tensor,
    caption_lengths: torch.Tensor,
    prefix_length: int,
    bos_id: int | None,
    filler_id: int | None = None,
) -> TokenLayout:
    """A micro batch's captions packed into one row of [BOS (if any), prefix, caption] per sample; prefix slots hold
    `filler_id` (default BOS), which the image's embeddings replace."""
    filler = filler_id if filler_id is not None else bos_id
    return pack_samples(*caption_text(caption_ids, caption_lengths, bos_id), prefix_length, filler)
