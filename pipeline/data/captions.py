"""Image-caption samples: decoding a raw record into tensors, collating micro batches, and the eval pass.

A decoder is split in two halves so that the stream and the collate serve every stage-1 variant:
`CaptionSampleDecoder` turns the caption into token ids ending in EOS, and a subclass turns the image member
into tensors (`CaptionDecoder`: a JPEG through the vision tower's image processor into "pixel_values"; a feature
decoder would read cached tower features into "image_features" instead). `load_image_processor` is the one way every
caller (training, the feature cache, evaluation, chat) gets the processor of a tower. `collate_captions` stacks whatever
image tensors the decoder produced and concatenates the captions, so packing can come later unchanged.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator

import torch
from PIL import Image

from pipeline.data.shards import iter_shard_records
from pipeline.data.skips import Collate, Decoder, SkipLog, SkipSample, decode_record, describe_error

CAPTION_MEMBER = "txt"
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")


class CaptionSampleDecoder:
    """The caption half of a sample decoder; subclasses name their image members and decode them.

    Picklable and cheap to pickle: the tokenizer loads lazily, once per process, and is never pickled.
    """

    # Members that carry the image half, in order of preference; the first one present is decoded.
    image_members: tuple[str, ...] = ()

    def __init__(self, tokenizer_path: str, max_caption_tokens: int, tokenizer=None):
        """`tokenizer`: the one loaded from `tokenizer_path` already, where the caller has it (pickling drops it)."""
        if max_caption_tokens < 1:
            raise ValueError(f"max_caption_tokens must be at least 1 (room for EOS), got {max_caption_tokens}")
        self.tokenizer_path = tokenizer_path
        self.max_caption_tokens = max_caption_tokens
        self._tokenizer = tokenizer

    def __getstate__(self) -> dict:
        # Loaded objects stay behind: each worker loads its own on first use.
        return {name: (None if name.startswith("_") else value) for name, value in self.__dict__.items()}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer  # heavy import, paid only where samples are decoded

            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            if tokenizer.eos_token_id is None:
                raise ValueError(f"tokenizer '{self.tokenizer_path}' has no eos_token; captions must end in one")
            self._tokenizer = tokenizer
        return self._tokenizer

    def load(self) -> None:
        """Load everything now, e.g. in the main process to fail fast on a wrong path."""
        _ = self.tokenizer

    def __call__(self, sample: dict[str, bytes], key: str) -> dict:
        image_member = next((name for name in self.image_members if name in sample), None)
        if image_member is None or CAPTION_MEMBER not in sample:
            raise SkipSample("missing_member", f"members {sorted(sample)}")
        caption_ids = self.encode_caption(sample[CAPTION_MEMBER])
        return {"key": key, **self.decode_image(sample[image_member]), "caption_ids": caption_ids}

    def encode_caption(self, data: bytes) -> torch.Tensor:
        """Token ids of the caption without special tokens, cut to leave room for the EOS that ends them."""
        try:
            caption = data.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise SkipSample("bad_caption", f"not UTF-8 ({error.reason} at byte {error.start})") from None
        if not caption:
            raise SkipSample("empty_caption")
        tokenizer = self.tokenizer
        # A caption is text: "<|end_of_text|>" written in one is tokenized as text, not as a premature EOS.
        ids = tokenizer(caption, add_special_tokens=False, split_special_tokens=True).input_ids
        ids = ids[: self.max_caption_tokens - 1]
        return torch.tensor([*ids, tokenizer.eos_token_id], dtype=torch.long)

    def decode_image(self, data: bytes) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def load_image_processor(model: str):
    """The image processor saved with a vision tower (hub id or directory): CLIP's, SigLIP's or any other family's,
    as its preprocessor_config.json names it, so that resizing, cropping and normalisation are the tower's own."""
    # From its module, not the package root: transformers 5.17 without torchvision puts a placeholder that raises at
    # the root name. The import is heavy, paid only where images are decoded.
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(model)


# Decoded pixels above which an image is skipped (4096 x 4096): far beyond what a 224-384 px tower reads, and it bounds
# a loader worker's memory per image (about 50 MB as RGB) whatever a shard holds.
MAX_IMAGE_PIXELS = 4096 * 4096


class ImageDecoder:
    """JPEG/PNG/WebP bytes -> {"pixel_values": [3, S, S]} through the tower's image processor.

    A JPEG is decoded at the smallest of the decoder's draft scales (1/2, 1/4, 1/8) that still covers the processor's
    input size, so a large photo costs little; an image with more than `max_image_pixels` pixels even then is skipped
    as "oversized_image" before it is decoded. Picklable and cheap to pickle: the processor loads lazily, once per
    process, and is never pickled.
    """

    def __init__(self, image_processor_path: str, max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.image_processor_path = image_processor_path
        self.max_image_pixels = max_image_pixels
        self._image_processor = None
        self._draft_side = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_image_processor": None, "_draft_side": None}

    @property
    def image_processor(self):
        if self._image_processor is None:
            self._image_processor = load_image_processor(self.image_processor_path)
            self._draft_side = input_side(self._image_processor)
        return self._image_processor

    def load(self) -> None:
        _ = self.image_processor

    def __call__(self, data: bytes) -> dict[str, torch.Tensor]:
        processor = self.image_processor
        try:
            with warnings.catch_warnings():
                # PIL warns above its own limit; the limit that applies here is max_image_pixels, checked below.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as image:
                    image.draft("RGB", (self._draft_side, self._draft_side))  # JPEG only; a no-op otherwise
                    if image.width * image.height > self.max_image_pixels:
                        raise SkipSample(
                            "oversized_image",
                            f"{image.width}x{image.height} pixels to decode, data.max_image_pixels is "
                            f"{self.max_image_pixels}",
                        )
                    rgb = image.convert("RGB")
        except SkipSample:
            raise
        except Image.DecompressionBombError as error:
            raise SkipSample("oversized_image", describe_error(error)) from None
        except Exception as error:  # PIL raises many types for bad bytes; all mean the same here
            raise SkipSample("corrupt_image", describe_error(error)) from None
        pixel_values = processor(images=rgb, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixel_values.float()}


_SIDE_NAMES = ("height", "width", "shortest_edge", "longest_edge")


def input_side(processor) -> int:
    """The longest side an image processor resizes or crops to (224 for CLIP ViT-L/14, 384 for SigLIP so400m-384)."""
    sides = []
    for setting in (getattr(processor, "size", None), getattr(processor, "crop_size", None)):
        # A plain dict in older transformers, a SizeDict dataclass in newer ones.
        items = setting.items() if isinstance(setting, dict) else vars(setting).items() if setting else ()
        sides += [value for name, value in items if name in _SIDE_NAMES and isinstance(value, int)]
    return max(sides, default=224)


class CaptionDecoder(CaptionSampleDecoder):
    """JPEG/PNG/WebP + caption -> {"key", "pixel_values": [3, S, S], "caption_ids": [n]}."""

    image_members = IMAGE_MEMBERS

    def __init__(
        self,
        image_processor_path: str,
        tokenizer_path: str,
        max_caption_tokens: int,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ):
        super().__init__(tokenizer_path, max_caption_tokens)
        self.images = ImageDecoder(image_processor_path, max_image_pixels)

    @property
    def image_processor_path(self) -> str:
        return self.images.image_processor_path

    @property
    def image_processor(self):
        return self.images.image_processor

    def load(self) -> None:
        super().load()
        self.images.load()

    def decode_image(self, data: bytes) -> dict[str, torch.Tensor]:
        return self.images(data)


def collate_captions(samples: list[dict]) -> dict:
    """Stack the image tensors and concatenate the captions (each ending in EOS) into one flat sequence.

    Returns {"keys": [B], <image field>: [B, ...] (e.g. "pixel_values": [B, 3, S, S]),
    "caption_ids": LongTensor[sum of lengths], "caption_lengths": LongTensor[B]}.
    """
    batch: dict = {"keys": [sample["key"] for sample in samples]}
    for name in samples[0]:
        if name not in ("key", "caption_ids"):
            batch[name] = torch.stack([sample[name] for sample in samples])
    batch["caption_ids"] = torch.cat([sample["caption_ids"] for sample in samples])
    batch["caption_lengths"] = torch.tensor([len(sample["caption_ids"]) for sample in samples], dtype=torch.long)
    return batch


def iterate_eval_batches(
    shards: list[str],
    decoder: Decoder,
    collate: Collate,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    skips: SkipLog | None = None,
) -> Iterator[dict]:
    """One unshuffled pass over `shards` in this process: record i (counted over all shards) goes to rank
    i % world_size. Bad samples and shards are skipped and counted in `skips` as in training. The last batch
    may be short, and ranks may get different numbers of batches: reduce metrics after the loop, not per batch.
    """
    skips = skips if skips is not None else SkipLog()
    samples: list[dict] = []
    record_index = 0
    for shard in shards:
        records = iter_shard_records(shard)
        records_read = 0
        while True:
            try:
                key, members = next(records)
            except StopIteration:
                break
            except Exception as error:  # unreadable or truncated shard: keep what was read, go on
                skips.record("bad_tar", shard, f"the rest after record {records_read}", describe_error(error))
                break
            records_read += 1
            record_index += 1
            if (record_index - 1) % world_size != rank:
                continue
            try:
                samples.append(decode_record(decoder, members, key))
            except SkipSample as skip:
                skips.record(skip.reason, shard, f"sample {key}", skip.detail)
                continue
            if len(samples) == micro_batch_size:
                yield collate(samples)
                samples = []
    if samples:
        yield collate(samples)
