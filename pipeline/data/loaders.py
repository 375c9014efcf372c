"""Builds the training and validation loaders of a run from its config (the only place data meets the config)."""

from __future__ import annotations

from pipeline.config import RunConfig
from pipeline.data.captions import CaptionDecoder, collate_captions, iterate_eval_batches
from pipeline.data.shards import expand_shards
from pipeline.data.stream import ShardLoader


def sample_codec(config: RunConfig):
    """(decoder, collate) of the run's shards: conversations for stage 2, captions for stage 1."""
    if config.stage == 2:
        from pipeline.data.conversations import ConversationDecoder, collate_conversations

        model = config.model
        decoder = ConversationDecoder(
            model.vision.model,
            model.llm.model,
            model.resampler.num_latents,
            model.max_sequence_tokens,
            model.system_prompt,
            max_image_pixels=config.data.max_image_pixels,
        )
        return decoder, collate_conversations
    return caption_decoder(config), collate_captions


def caption_decoder(config: RunConfig):
    """Decodes image shards through the CLIP processor, or feature shards as they were cached."""
    if config.data.input == "features":
        from pipeline.data.features import FeatureDecoder

        return FeatureDecoder(config.model.llm.model, config.model.max_caption_tokens)
    return CaptionDecoder(
        config.model.vision.model,
        config.model.llm.model,
        config.model.max_caption_tokens,
        max_image_pixels=config.data.max_image_pixels,
    )


def build_train_loader(config: RunConfig, dist_env, state: dict | None) -> ShardLoader:
    data = config.data
    decoder, collate = sample_codec(config)
    return ShardLoader(
        [(source.shards, source.weight) for source in data.sources],
        decoder,
        collate,
        micro_batch_size=config.train.micro_batch_size,
        num_workers=data.num_workers,
        shuffle_buffer=data.shuffle_buffer,
        seed=data.seed,
        rank=dist_env.rank,
        world_size=dist_env.world_size,
        state=state,
        # Page-locked batches copy to the GPU asynchronously (the trainer's non_blocking copies).
        pin_memory=config.train.distributed_backend == "nccl",
        allow_missing_shards=data.allow_missing_shards,
    )


def build_val_batches(config: RunConfig, dist_env):
    """A callable giving a fresh pass over the held-out shards, or None when the config names none."""
    if not config.data.val_shards:
        return None
    shards = expand_shards(config.data.val_shards, "data.val_shards", config.data.allow_missing_shards)
    decoder, collate = sample_codec(config)

    def batches():
        return iterate_eval_batches(
            shards, decoder, collate, config.train.micro_batch_size, dist_env.rank, dist_env.world_size
        )

    return batches
