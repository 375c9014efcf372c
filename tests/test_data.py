"""Tests of the stage-1 data stream: shard specs and splits, exact resume, skipped samples, collate, eval pass.

Shards are tiny tars written into tmp dirs; most stream tests use a key-only decoder so that worker processes
start in milliseconds, and the real `CaptionDecoder` runs with a 32-pixel CLIP processor and a word-level
tokenizer built here.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.data.captions import CaptionDecoder, ImageDecoder, collate_captions, iterate_eval_batches
from pipeline.data.shards import DataError, OversizedMember, expand_shards, iter_shard_records, reader_shards
from pipeline.data.skips import SkipLog, SkipSample, decode_record
from pipeline.data.stream import ShardLoader

EOS = "<|eot_id|>"
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "on", "the", "grass"]


def jpeg_bytes(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 24), color).save(out, format="JPEG")
    return out.getvalue()


JPEG = jpeg_bytes()


def write_shard(path: Path, records: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A webdataset tar: members KEY.EXT in record order, as img2dataset writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in records:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def caption_record(key: str, caption: str = "a photo of a cat") -> tuple[str, dict[str, bytes]]:
    return key, {"jpg": JPEG, "txt": caption.encode(), "json": json.dumps({"key": key}).encode()}


def write_caption_shards(directory: Path, num_shards: int, per_shard: int, prefix: str = "k") -> str:
    """`num_shards` shards of `per_shard` valid samples with keys like k02_007; returns the brace spec."""
    for shard in range(num_shards):
        records = [caption_record(f"{prefix}{shard:02d}_{i:03d}") for i in range(per_shard)]
        write_shard(directory / f"{shard:05d}.tar", records)
    return str(directory / f"{{00000..{num_shards - 1:05d}}}.tar")


def decode_key(sample: dict[str, bytes], key: str) -> dict:
    """A decoder that checks members and caption like the real one but skips the image work."""
    if "jpg" not in sample or "txt" not in sample:
        raise SkipSample("missing_member")
    if not sample["txt"].strip():
        raise SkipSample("empty_caption")
    return {"key": key}


def collate_keys(samples: list[dict]) -> dict:
    return {"keys": [sample["key"] for sample in samples]}


def key_loader(sources, *, num_workers=2, shuffle_buffer=16, micro_batch_size=4, rank=0, world_size=1, state=None):
    return ShardLoader(
        sources,
        decode_key,
        collate_keys,
        micro_batch_size=micro_batch_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        seed=7,
        rank=rank,
        world_size=world_size,
        state=state,
    )


def take_keys(loader: ShardLoader, count: int) -> list[list[str]]:
    batches = iter(loader)
    return [next(batches)["keys"] for _ in range(count)]


@pytest.fixture(scope="module")
def caption_decoder(tmp_path_factory) -> CaptionDecoder:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("hf")
    vocab = {"<unk>": 0, EOS: 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token=EOS, unk_token="<unk>")
    tokenizer.save_pretrained(directory / "tokenizer")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(directory / "processor")
    decoder = CaptionDecoder(str(directory / "processor"), str(directory / "tokenizer"), max_caption_tokens=6)
    decoder.load()
    return decoder


def write_bad_shards(directory: Path) -> tuple[str, set[str]]:
    """Three shards with every kind of bad data; returns the spec and the keys of the valid samples."""
    truncated_jpeg = JPEG[: len(JPEG) // 2]
    write_shard(
        directory / "00000.tar",
        [
            caption_record("a0"),
            ("a1_corrupt", {"jpg": truncated_jpeg, "txt": b"a red dog"}),
            caption_record("a2"),
            ("a3_empty", {"jpg": JPEG, "txt": b"  \n"}),
            caption_record("a4"),
            ("a5_no_caption", {"jpg": JPEG, "json": b"{}"}),
            caption_record("a6"),
            ("a7_no_image", {"txt": b"a cat", "json": b"{}"}),
            caption_record("a8"),
        ],
    )
    path = write_shard(directory / "00001.tar", [caption_record(f"b{i}") for i in range(4)])
    with tarfile.open(path) as tar:
        last_image = next(member for member in tar.getmembers() if member.name == "b3.jpg")
    path.write_bytes(path.read_bytes()[: last_image.offset_data + 100])  # cut inside b3's image
    (directory / "00002.tar").write_bytes(b"this is not a tar file " * 50)
    return str(directory / "{00000..00002}.tar"), {"a0", "a2", "a4", "a6", "a8", "b0", "b1", "b2"}


def test_expand_shards_braces_globs_and_remote(tmp_path):
    for i in range(4):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    where = "data.sources[0].shards"
    assert expand_shards(str(tmp_path / "{00000..00002}.tar"), where) == [
        str(tmp_path / f"{i:05d}.tar") for i in range(3)
    ]
    assert expand_shards(str(tmp_path / "*.tar"), where) == [str(tmp_path / f"{i:05d}.tar") for i in range(4)]
    assert expand_shards(str(tmp_path / "{00003,00001,00003}.tar"), where) == [
        str(tmp_path / "00001.tar"),
        str(tmp_path / "00003.tar"),
    ]
    assert expand_shards("s3://bucket/laion/{00001..00003}.tar", where) == [
        f"s3://bucket/laion/{i:05d}.tar" for i in range(1, 4)
    ]
    assert expand_shards("pipe:curl -s http://x/{0..1}.tar", where) == [
        "pipe:curl -s http://x/0.tar",
        "pipe:curl -s http://x/1.tar",
    ]


def test_spec_matching_nothing_fails_fast_with_one_line(tmp_path):
    spec = str(tmp_path / "missing" / "{00000..41407}.tar")
    start = time.perf_counter()
    with pytest.raises(DataError) as error:
        expand_shards(spec, "data.sources[0].shards")
    assert time.perf_counter() - start < 1.0
    message = str(error.value)
    assert spec in message and "data.sources[0].shards" in message and "\n" not in message

    good = write_caption_shards(tmp_path / "good", 2, 2)
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"data\.sources\[1\]\.shards"):
        key_loader([(good, 1.0), (spec, 1.0)], num_workers=2)
    assert time.perf_counter() - start < 1.0


def test_split_gives_every_shard_to_exactly_one_reader():
    shards = [f"{i:05d}.tar" for i in range(12)]
    for world_size in (1, 2, 3):
        for num_workers in (0, 1, 2, 3):
            readers_per_rank = max(1, num_workers)
            num_readers = world_size * readers_per_rank
            owners = Counter()
            for rank in range(world_size):
                for worker in range(readers_per_rank):
                    reader = rank * readers_per_rank + worker
                    mine = reader_shards(shards, reader, num_readers)
                    assert mine and all(shards.index(shard) % num_readers == reader for shard in mine)
                    owners.update(mine)
            assert owners == Counter(shards), (world_size, num_workers)


def test_split_end_to_end_over_ranks_and_workers(tmp_path):
    spec = write_caption_shards(tmp_path, 12, 1)
    seen = Counter()
    for rank in range(2):
        loader = key_loader([(spec, 1.0)], num_workers=2, shuffle_buffer=0, micro_batch_size=1, rank=rank, world_size=2)
        # Each of the 4 readers owns 3 one-sample shards, so 3 batches per worker are exactly one epoch.
        seen.update(key for batch in take_keys(loader, 6) for key in batch)
        loader.close()
    assert seen == Counter(f"k{i:02d}_000" for i in range(12))


def test_too_few_shards_for_readers(tmp_path):
    spec = write_caption_shards(tmp_path, 3, 2)
    with pytest.raises(DataError, match=r"data\.sources\[0\]\.shards.*3 shards.*num_workers"):
        key_loader([(spec, 1.0)], num_workers=2, world_size=2)


def check_exact_resume(sources, num_workers: int, resume_at: list[int], following: int) -> dict[int, dict]:
    """Resume from the state after each batch count in `resume_at` and compare with the uninterrupted run."""
    reference = key_loader(sources, num_workers=num_workers)
    batches = iter(reference)
    keys, states = [], {}
    for step in range(max(resume_at) + following):
        if step in resume_at:
            states[step] = json.loads(json.dumps(reference.state_dict()))  # checkpoints may store it as JSON
        keys.append(next(batches)["keys"])
    reference.close()
    for step in resume_at:
        resumed = key_loader(sources, num_workers=num_workers, state=states[step])
        assert take_keys(resumed, following) == keys[step : step + following], f"resume after batch {step}"
        resumed.close()
    return states


def buffer_epochs(state: dict) -> set[int]:
    return {ref[0] for reader in state["readers"] for source in reader["sources"] for ref in source["buffer"]}


def test_exact_resume_with_two_workers(tmp_path):
    spec = write_caption_shards(tmp_path, 6, 20)
    # Each reader owns 3 shards = 60 records = 15 batches; its first epoch ends near loader batch 24.
    states = check_exact_resume([(spec, 1.0)], num_workers=2, resume_at=[0, 3, 8, 25, 27], following=6)
    assert buffer_epochs(states[25]) == {0, 1} or buffer_epochs(states[27]) == {0, 1}
    assert max(len(source["buffer"]) for reader in states[8]["readers"] for source in reader["sources"]) == 15


def test_exact_resume_without_workers(tmp_path):
    spec = write_caption_shards(tmp_path, 6, 20)
    states = check_exact_resume([(spec, 1.0)], num_workers=0, resume_at=[0, 5, 27, 29], following=5)
    assert buffer_epochs(states[27]) == {0, 1} or buffer_epochs(states[29]) == {0, 1}


def test_exact_resume_with_two_weighted_sources(tmp_path):
    first = write_caption_shards(tmp_path / "first", 6, 20, prefix="a")
    second = write_caption_shards(tmp_path / "second", 4, 20, prefix="b")
    sources = [(first, 3.0), (second, 1.0)]
    check_exact_resume(sources, num_workers=2, resume_at=[0, 5, 18], following=6)
    loader = key_loader(sources, num_workers=2)
    keys = [key for batch in take_keys(loader, 60) for key in batch]
    loader.close()
    share_of_first = sum(key.startswith("a") for key in keys) / len(keys)
    assert 0.65 < share_of_first < 0.85


def test_unshuffled_epochs_cover_every_sample_once_and_shuffle_changes_order(tmp_path):
    spec = write_caption_shards(tmp_path, 6, 20)
    everything = Counter(f"k{shard:02d}_{i:03d}" for shard in range(6) for i in range(20))
    loader = key_loader([(spec, 1.0)], num_workers=2, shuffle_buffer=0)
    in_order = take_keys(loader, 60)
    loader.close()
    assert Counter(key for batch in in_order[:30] for key in batch) == everything
    assert Counter(key for batch in in_order[30:] for key in batch) == everything
    shuffled = key_loader([(spec, 1.0)], num_workers=2, shuffle_buffer=16)
    assert take_keys(shuffled, 30) != in_order[:30]
    shuffled.close()


def test_state_from_another_split_is_rejected(tmp_path):
    spec = write_caption_shards(tmp_path, 6, 4)
    loader = key_loader([(spec, 1.0)], num_workers=2)
    take_keys(loader, 3)
    state = loader.state_dict()
    loader.close()
    with pytest.raises(DataError, match="shard split differs") as error:
        key_loader([(spec, 1.0)], num_workers=1, state=state)
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="shard split differs"):
        key_loader([(spec, 1.0)], num_workers=2, rank=0, world_size=2, state=state)
    (tmp_path / "00006.tar").write_bytes((tmp_path / "00000.tar").read_bytes())
    with pytest.raises(DataError, match="different shards"):
        key_loader([(str(tmp_path / "*.tar"), 1.0)], num_workers=2, state=state)


def test_skip_counts_sum_latest_states_of_all_workers(tmp_path):
    for shard in range(2):
        records = [(f"bad{shard}", {"jpg": JPEG, "txt": b""})] + [caption_record(f"s{shard}_{i}") for i in range(4)]
        write_shard(tmp_path / f"{shard:05d}.tar", records)
    loader = key_loader([(str(tmp_path / "*.tar"), 1.0)], num_workers=2, shuffle_buffer=0)
    batches = iter(loader)
    # One shard per reader; each batch of 4 is one epoch, and the empty caption opens every epoch.
    expected_after = [1, 2, 3, 4]
    for expected in expected_after:
        assert all(not key.startswith("bad") for key in next(batches)["keys"])
        assert loader.skip_counts()["empty_caption"] == expected
    loader.close()


def test_bad_samples_and_shards_are_skipped_and_counted(tmp_path, caption_decoder, caplog):
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    spec, valid_keys = write_bad_shards(tmp_path)
    loader = ShardLoader(
        [(spec, 1.0)],
        caption_decoder,
        collate_captions,
        micro_batch_size=2,
        num_workers=0,
        shuffle_buffer=0,
        seed=0,
        rank=0,
        world_size=1,
    )
    batches = iter(loader)
    keys = Counter()
    for _ in range(8):  # 16 samples = two epochs of the 8 valid ones
        batch = next(batches)
        assert batch["pixel_values"].shape == (2, 3, 32, 32)
        keys.update(batch["keys"])
    assert keys == Counter({key: 2 for key in valid_keys})
    counts = loader.skip_counts()
    assert (counts["corrupt_image"], counts["empty_caption"], counts["missing_member"]) == (2, 2, 4)
    # Per epoch, the garbage file and the truncated shard; the second epoch's may not have been reached yet.
    assert 2 <= counts["bad_tar"] <= 4
    # Rate-limited: the first skip is logged with its shard, the rest are only counted.
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(tmp_path) in warnings[0] and "skipped" in warnings[0]


def test_caption_decoder_and_collate_format(caption_decoder):
    eos_id = caption_decoder.tokenizer.eos_token_id
    records = [
        caption_record("x0", "a photo of a cat"),
        caption_record("x1", "  red dog\n"),
        caption_record("x2", "a cat on the grass a blue dog"),
    ]
    batch = collate_captions([caption_decoder(members, key) for key, members in records])
    assert batch["keys"] == ["x0", "x1", "x2"]
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["caption_lengths"].tolist() == [6, 3, 6] and batch["caption_lengths"].dtype == torch.long
    assert batch["caption_ids"].dtype == torch.long and len(batch["caption_ids"]) == 15
    ends = batch["caption_lengths"].cumsum(0) - 1
    assert (batch["caption_ids"] == eos_id).nonzero().flatten().tolist() == ends.tolist()
    vocab = caption_decoder.tokenizer.get_vocab()
    words = ["red", "dog"]
    assert batch["caption_ids"][6:9].tolist() == [vocab[word] for word in words] + [eos_id]
    # The long caption keeps max_caption_tokens - 1 = 5 words before its EOS.
    assert batch["caption_ids"][9:14].tolist() == [vocab[word] for word in "a cat on the grass".split()]


def test_caption_decoder_pickles_without_loaded_objects(caption_decoder):
    data = pickle.dumps(caption_decoder)
    assert len(data) < 1000
    copy = pickle.loads(data)
    sample = copy(*reversed(caption_record("p0", "a dog")))
    assert sample["caption_ids"].tolist() == [copy.tokenizer.get_vocab()["a"], copy.tokenizer.get_vocab()["dog"], 1]


def test_eval_batches_cover_every_valid_sample_once_across_ranks(tmp_path, caption_decoder):
    spec, valid_keys = write_bad_shards(tmp_path)
    write_shard(tmp_path / "00003.tar", [caption_record(f"d{i}") for i in range(5)])
    shards = expand_shards(str(tmp_path / "*.tar"), "data.val_shards")
    seen = Counter()
    totals = Counter()
    for rank in range(2):
        skips = SkipLog()
        batches = list(iterate_eval_batches(shards, caption_decoder, collate_captions, 2, rank, 2, skips=skips))
        assert all(len(batch["keys"]) == 2 for batch in batches[:-1])
        seen.update(key for batch in batches for key in batch["keys"])
        totals.update(skips.counts)
    assert seen == Counter(valid_keys | {f"d{i}" for i in range(5)})
    assert (totals["corrupt_image"], totals["empty_caption"], totals["missing_member"]) == (1, 1, 2)
    assert totals["bad_tar"] == 4  # each rank reads every shard, so both see the two bad ones


def test_exact_resume_over_bad_data_keeps_skip_counts(tmp_path):
    spec, valid_keys = write_bad_shards(tmp_path)
    decodable_keys = valid_keys | {"a1_corrupt"}  # decode_key does not look at the image
    sources = [(spec, 1.0)]
    reference = key_loader(sources, num_workers=2, shuffle_buffer=4, micro_batch_size=2)
    batches = iter(reference)
    head = [next(batches)["keys"] for _ in range(5)]
    state, counts = reference.state_dict(), reference.skip_counts()
    tail = [next(batches)["keys"] for _ in range(8)]
    reference.close()
    assert counts["bad_tar"] >= 1 and counts["empty_caption"] + counts["missing_member"] >= 1
    assert {key for batch in head + tail for key in batch} <= decodable_keys
    resumed = key_loader(sources, num_workers=2, shuffle_buffer=4, micro_batch_size=2, state=state)
    assert resumed.skip_counts() == counts
    assert take_keys(resumed, 8) == tail
    resumed.close()


def test_stream_pickles_for_spawned_workers(tmp_path):
    spec = write_caption_shards(tmp_path, 4, 10)
    options = dict(micro_batch_size=4, num_workers=1, shuffle_buffer=8, seed=1, rank=0, world_size=1)
    forked = ShardLoader([(spec, 1.0)], decode_key, collate_keys, **options)
    spawned = ShardLoader([(spec, 1.0)], decode_key, collate_keys, multiprocessing_context="spawn", **options)
    assert take_keys(spawned, 4) == take_keys(forked, 4)
    forked.close()
    spawned.close()


def test_unreadable_source_and_wrong_decoder_raise_instead_of_hanging(tmp_path):
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "00000.tar").write_bytes(b"not a tar " * 100)
    loader = key_loader([(str(tmp_path / "garbage" / "*.tar"), 1.0)], num_workers=0)
    with pytest.raises(DataError, match="read no sample in a whole pass"):
        take_keys(loader, 1)
    write_shard(tmp_path / "empty" / "00000.tar", [(f"e{i}", {"jpg": JPEG, "txt": b" "}) for i in range(10)])
    loader = key_loader([(str(tmp_path / "empty" / "*.tar"), 1.0)], num_workers=0)
    with pytest.raises(DataError, match="skipped 1000 samples in a row"):
        take_keys(loader, 1)


def test_skip_reasons_are_a_fixed_set():
    assert SkipSample("corrupt_image", "bad bytes").reason == "corrupt_image"
    with pytest.raises(ValueError, match="unknown skip reason"):
        SkipSample("blurry")


def test_iterating_after_close_continues_the_stream(tmp_path):
    spec = write_caption_shards(tmp_path, 4, 10)
    uninterrupted = key_loader([(spec, 1.0)], num_workers=2)
    expected = take_keys(uninterrupted, 7)
    uninterrupted.close()
    loader = key_loader([(spec, 1.0)], num_workers=2)
    first = take_keys(loader, 3)
    loader.close()
    assert first + take_keys(loader, 4) == expected
    loader.close()


def damaged_copies(tmp_path: Path) -> dict[str, Path]:
    """A shard of records r0..r5 and copies damaged after r3's members: cut inside r4's first header, cut where that
    header starts (no end-of-archive block), and followed by bytes other than zero padding."""
    whole = write_shard(tmp_path / "whole.tar", [caption_record(f"r{i}") for i in range(6)]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        r4 = next(info.offset for info in tar.getmembers() if info.name.startswith("r4."))
    copies = {"cut_in_header": whole[: r4 + 100], "cut_at_header": whole[:r4], "trailing_garbage": whole + b"x" * 700}
    for name, data in copies.items():
        (tmp_path / f"{name}.tar").write_bytes(data)
    return {name: tmp_path / f"{name}.tar" for name in copies}


def read_until_error(path: Path) -> tuple[list[str], Exception | None]:
    keys = []
    try:
        for key, _ in iter_shard_records(str(path)):
            keys.append(key)
    except Exception as error:
        return keys, error
    return keys, None


def test_damaged_tars_raise_after_their_intact_records(tmp_path):
    """A tar cut inside or at a header, or with garbage after its end, is an error (counted as bad_tar by the
    stream), not a clean end; the records before the damage are read, the record being assembled is dropped."""
    for name, path in damaged_copies(tmp_path).items():
        keys, error = read_until_error(path)
        assert isinstance(error, tarfile.ReadError), (name, error)
        # Cut after r3's members, r3 itself may be incomplete: only the end-of-archive block proves a last record whole.
        expected = [f"r{i}" for i in range(6 if name == "trailing_garbage" else 3)]
        assert keys == expected, name
    keys, error = read_until_error(write_shard(tmp_path / "intact.tar", [caption_record(f"r{i}") for i in range(6)]))
    assert error is None and keys == [f"r{i}" for i in range(6)]


def test_damaged_tars_are_counted_as_bad_tar(tmp_path):
    directory = tmp_path / "shards"
    for path in damaged_copies(tmp_path).values():
        directory.mkdir(exist_ok=True)
        path.rename(directory / path.name)
    loader = key_loader([(str(directory / "*.tar"), 1.0)], num_workers=0, shuffle_buffer=0, micro_batch_size=1)
    # One pass is 3 + 3 + 6 records; the last shard's damage is found when the 13th is asked for.
    keys = [key for batch in take_keys(loader, 13) for key in batch]
    assert sorted(set(keys)) == [f"r{i}" for i in range(6)]
    assert loader.skip_counts()["bad_tar"] == 3


def test_a_member_over_the_size_limit_is_not_read(tmp_path):
    """A member larger than the limit stands in as an empty OversizedMember, and the stream skips its record as
    oversized_member, so no shard can make a reader hold an arbitrarily large member in memory."""
    big = caption_record("big")
    big[1]["jpg"] = b"\xff" * 5000
    path = write_shard(tmp_path / "00000.tar", [caption_record("a"), big, caption_record("b")])
    records = dict(iter_shard_records(str(path), max_member_bytes=1000))
    assert isinstance(records["big"]["jpg"], OversizedMember) and records["big"]["jpg"].size == 5000
    assert records["big"]["txt"] == b"a photo of a cat" and records["a"]["jpg"] == JPEG
    with pytest.raises(SkipSample, match="oversized_member"):
        decode_record(decode_key, records["big"], "big")


def test_image_decoder_keeps_odd_images_and_refuses_oversized_ones(caption_decoder):
    """CMYK, grayscale, alpha, palette and 1-pixel images decode to the processor's RGB tensor; an image over the
    pixel cap is skipped as oversized_image before it is decoded; a large JPEG is decoded at a draft scale."""
    decoder = caption_decoder.images

    def encoded(image: Image.Image, fmt: str) -> bytes:
        out = io.BytesIO()
        image.save(out, fmt)
        return out.getvalue()

    for image, fmt in (
        (Image.new("CMYK", (40, 30), (0, 200, 200, 0)), "JPEG"),
        (Image.new("L", (40, 30), 90), "JPEG"),
        (Image.new("RGBA", (40, 30), (1, 2, 3, 0)), "PNG"),
        (Image.new("LA", (40, 30), (1, 0)), "PNG"),
        (Image.new("P", (40, 30), 7), "PNG"),
        (Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
    ):
        assert decoder(encoded(image, fmt))["pixel_values"].shape == (3, 32, 32), image.mode
    limited = ImageDecoder(decoder.image_processor_path, max_image_pixels=100 * 100)
    with pytest.raises(SkipSample, match="oversized_image"):
        limited(encoded(Image.new("RGB", (101, 100)), "PNG"))
    # 800 x 800 at the smallest draft scale that still covers 32 px (1/8) is 100 x 100: within the cap.
    assert limited(encoded(Image.new("RGB", (800, 800), (5, 5, 5)), "JPEG"))["pixel_values"].shape == (3, 32, 32)


def test_caption_that_is_not_utf8_is_skipped_as_bad_caption(caption_decoder):
    with pytest.raises(SkipSample, match="bad_caption"):
        caption_decoder({"jpg": JPEG, "txt": "caf\xe9".encode("latin-1")}, "k")


def test_partial_checkpoints_are_removed(tmp_path):
    """Checkpoint folders without COMPLETE go: all of them at resume, the older ones after a save."""
    from pipeline.training.checkpoint import COMPLETE_MARKER, remove_partial_checkpoints

    for step, complete in ((2, False), (4, True), (6, False), (8, True), (9, False)):
        path = tmp_path / f"step_{step:08d}"
        path.mkdir()
        if complete:
            (path / COMPLETE_MARKER).write_text(f"{step}\n")
    (tmp_path / "latest").write_text("step_00000008")
    remove_partial_checkpoints(tmp_path, before_step=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004", "step_00000008", "step_00000009"]
    remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004", "step_00000008"]
