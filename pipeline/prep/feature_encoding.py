"""The feature-caching job's machinery: decoding input shards in workers, running the tower on CUDA streams, and
writing feature shards from writer threads (`pipeline.prep.feature_cache` runs it; its docstring tells the story).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.common.files import write_json_atomic
from pipeline.data.captions import CAPTION_MEMBER, CaptionDecoder
from pipeline.data.features import FeatureShardWriter, features_header
from pipeline.data.shards import iter_shard_records
from pipeline.data.skips import SKIP_REASONS, SkipLog, SkipSample, describe_error

log = logging.getLogger("pipeline.feature_cache")

MANIFEST_DIR = "manifest"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class InputShard:
    index: int  # position in this rank's list of shards to cache
    url: str
    name: str  # basename, also the feature shard's name


class ImageCheckDecoder(CaptionDecoder):
    """`CaptionDecoder`'s member checks and image path, with the caption checked but not tokenized.

    The cache keeps the caption text; training tokenizes it from the feature shard as it would from the image
    shard, so a cached run skips exactly the samples that a run on images skips.
    """

    def __init__(self, image_processor_path: str):
        super().__init__(image_processor_path, tokenizer_path="", max_caption_tokens=1)

    def load(self) -> None:
        _ = self.image_processor

    def encode_caption(self, data: bytes) -> torch.Tensor:
        if not data.decode("utf-8", errors="replace").strip():
            raise SkipSample("empty_caption")
        return torch.empty(0, dtype=torch.long)


class ShardBatches(IterableDataset):
    """Batches of decoded pixels, never spanning shards; each shard ends with a batch marked "last" (maybe empty)
    that carries its record and skip counts."""

    def __init__(self, shards: list[InputShard], decoder: ImageCheckDecoder, batch_size: int, pixel_dtype):
        self.shards, self.decoder, self.batch_size, self.pixel_dtype = shards, decoder, batch_size, pixel_dtype

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        skips = SkipLog()
        for shard in self.shards[worker::workers]:
            yield from self.shard_batches(shard, skips, shared=info is not None)

    def shard_batches(self, shard: InputShard, skips: SkipLog, shared: bool):
        before = dict(skips.counts)
        records = iter_shard_records(shard.url)
        sequence = records_read = filled = 0
        pixels, rows = None, []
        while True:
            try:
                key, members = next(records)
            except StopIteration:
                break
            except Exception as error:  # truncated or unreadable tar: keep what was read, as training does
                skips.record("bad_tar", shard.name, f"the rest after record {records_read}", describe_error(error))
                break
            records_read += 1
            try:
                pixel_values = self.decoder(members, key)["pixel_values"]
            except SkipSample as skip:
                skips.record(skip.reason, shard.name, f"sample {key}", skip.detail)
                continue
            except Exception as error:  # e.g. an image the processor cannot resize: one bad sample, not a crash
                skips.record("corrupt_image", shard.name, f"sample {key}", describe_error(error))
                continue
            if pixels is None:
                pixels = torch.empty((self.batch_size, *pixel_values.shape), dtype=self.pixel_dtype)
                # Filled in place in shared memory, so handing the batch to the main process copies nothing.
                pixels = pixels.share_memory_() if shared else pixels
            pixels[filled].copy_(pixel_values)
            rows.append((key, members[CAPTION_MEMBER], members.get("json")))
            filled += 1
            if filled == self.batch_size:
                yield _batch(shard, sequence, rows, pixels)
                sequence, filled, pixels, rows = sequence + 1, 0, None, []
        last = _batch(shard, sequence, rows, pixels[:filled] if filled else None)
        last.update(
            last=True,
            records=records_read,
            skipped={reason: skips.counts[reason] - before.get(reason, 0) for reason in SKIP_REASONS},
        )
        yield last


def _batch(shard: InputShard, sequence: int, rows: list, pixels) -> dict:
    return {
        "shard": shard.index,
        "sequence": sequence,
        "keys": [row[0] for row in rows],
        "captions": [row[1] for row in rows],
        "metadata": [row[2] for row in rows],
        "pixel_values": pixels,
        "last": False,
    }


class PendingFeatures:
    """Features of one batch on their way to the host, with a per-sample "all finite" flag; `wait()` gives both,
    `release()` returns the buffer."""

    def __init__(self, features: torch.Tensor, finite: torch.Tensor, ready=None, buffer=None, pool=None):
        self.features, self.finite, self.ready, self.buffer, self.pool = features, finite, ready, buffer, pool

    def wait(self) -> tuple[torch.Tensor, list[bool]]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.features, self.finite.tolist()

    def release(self) -> None:
        if self.pool is not None:
            self.pool.put(self.buffer)


class FeatureEncoder:
    """Runs the tower on pixel batches. On CUDA, copies in and out run on their own streams into pinned buffers, so
    the main thread only enqueues work; the buffer pool bounds how far it runs ahead of the writers."""

    def __init__(self, tower, device: torch.device, storage_dtype: torch.dtype, batch_size: int, buffers: int):
        self.tower, self.device, self.storage_dtype, self.batch_size = tower, device, storage_dtype, batch_size
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.copy_in, self.copy_out = torch.cuda.Stream(device), torch.cuda.Stream(device)
        self._pool: queue.Queue = queue.Queue()
        self._buffers_to_allocate = buffers
        self.wait_for_writers_s = 0.0  # time blocked on a free buffer: the writers are the bottleneck

    def encode(self, pixels: torch.Tensor) -> PendingFeatures:
        if not self.cuda:
            with torch.inference_mode():
                features = self.tower(pixels).to(self.storage_dtype).contiguous()
                return PendingFeatures(features, _all_finite(features))
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_in):
            device_pixels = pixels.to(self.device, non_blocking=True)
        compute.wait_stream(self.copy_in)
        device_pixels.record_stream(compute)
        with torch.inference_mode():
            features = self.tower(device_pixels).to(self.storage_dtype)
            finite = _all_finite(features)  # overflow of a float16 cache shows up here, not in training
            buffer, finite_host = self._buffer(features.shape[1:])
            count = features.shape[0]
            self.copy_out.wait_stream(compute)
            with torch.cuda.stream(self.copy_out):
                buffer[:count].copy_(features, non_blocking=True)
                finite_host[:count].copy_(finite, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.copy_out)
            features.record_stream(self.copy_out)
            finite.record_stream(self.copy_out)
        return PendingFeatures(buffer[:count], finite_host[:count], ready, (buffer, finite_host), self._pool)

    def _buffer(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        if self._buffers_to_allocate and self._pool.empty():
            self._buffers_to_allocate -= 1
            return (
                torch.empty((self.batch_size, *shape), dtype=self.storage_dtype, pin_memory=True),
                torch.empty(self.batch_size, dtype=torch.bool, pin_memory=True),
            )
        start = time.perf_counter()
        buffers = self._pool.get()
        self.wait_for_writers_s += time.perf_counter() - start
        return buffers


def _all_finite(features: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(features).flatten(1).all(dim=1)


class ShardWriters:
    """Threads that write feature shards. Shard i goes to thread i % threads, so each shard's batches stay in order
    while different shards write and hash in parallel (sha256 of ~1 GB/s of features needs more than one core)."""

    def __init__(self, out: Path, shards: list[InputShard], provenance: dict, threads: int):
        self.out, self.shards, self.provenance = out, shards, provenance
        self.error: BaseException | None = None
        self.shards_done = self.images_written = 0
        self.skipped: Counter = Counter()
        self._lock = threading.Lock()
        self._queues = [queue.Queue() for _ in range(threads)]
        self._threads = [
            threading.Thread(target=self._run, args=(q,), name=f"feature-writer-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, batch: dict, features: PendingFeatures | None) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing feature shards failed: {describe_error(self.error)}") from self.error
        self._queues[batch["shard"] % len(self._queues)].put((batch, features))

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            thread.join()
        if self.error is not None:
            raise RuntimeError(f"writing feature shards failed: {describe_error(self.error)}") from self.error

    def _run(self, items: queue.Queue) -> None:
        open_shards: dict[int, _OpenShard] = {}
        while (item := items.get()) is not None:
            batch, features = item
            try:
                if self.error is None:
                    self._write(batch, features, open_shards)
            except BaseException as error:  # reported by the main thread, which stops the job
                self.error = self.error or error
                log.error("writing shard %s failed: %s", self.shards[batch["shard"]].name, describe_error(error))
            finally:
                if features is not None:
                    features.release()
        for state in open_shards.values():
            state.writer.abandon()

    def _write(self, batch: dict, features: PendingFeatures | None, open_shards: dict) -> None:
        shard = self.shards[batch["shard"]]
        state = open_shards.get(shard.index)
        if state is None:
            state = open_shards[shard.index] = _OpenShard(FeatureShardWriter(str(self.out / shard.name)))
        if batch["sequence"] != state.batches:
            raise RuntimeError(f"batch {batch['sequence']} of {shard.name} arrived before batch {state.batches}")
        state.batches += 1
        if features is not None:
            tensors, finite = features.wait()
            state.shape = list(tensors.shape[1:])
            header = features_header(tensors.dtype, tuple(state.shape))
            cache_entry = {**self.provenance, "shape": state.shape, "source_shard": shard.name}
            for row, key in enumerate(batch["keys"]):
                if not finite[row]:  # counted, and reported once the shard is complete
                    state.nonfinite += 1
                    continue
                metadata = sample_metadata(batch["metadata"][row], key, cache_entry)
                state.writer.add_sample(key, header, tensors[row], batch["captions"][row], metadata)
        if not batch["last"]:
            return
        del open_shards[shard.index]
        skipped = {**batch["skipped"], "nonfinite_features": state.nonfinite}
        record = {
            "shard": shard.name,
            "input": shard.url,
            "records_read": batch["records"],
            "skipped": skipped,
            **state.writer.close(),
            **self.provenance,
            "shape": state.shape,
            "format": FORMAT_VERSION,
        }
        write_json_atomic(self.out / MANIFEST_DIR / f"{shard.name}.json", record, indent=1, sort_keys=True)
        with self._lock:
            self.shards_done += 1
            self.images_written += record["samples"]
            self.skipped.update(skipped)
        if state.nonfinite:
            log.warning(
                "%s: %d samples had NaN or infinite features in %s and were left out",
                shard.name,
                state.nonfinite,
                self.provenance["dtype"],
            )
        skipped = {reason: n for reason, n in skipped.items() if n}
        log.info(
            "%s: %d samples cached, %d skipped%s",
            shard.name,
            record["samples"],
            sum(skipped.values()),
            f" {skipped}" if skipped else "",
        )


@dataclass
class _OpenShard:
    writer: FeatureShardWriter
    batches: int = 0
    shape: list[int] | None = None  # [tokens, width]; None while (or if) the shard has no sample
    nonfinite: int = 0  # samples whose features are not all finite (float16 overflow, say), left out


def sample_metadata(source: bytes | None, key: str, cache_entry: dict) -> bytes:
    """The image shard's JSON metadata with a "feature_cache" entry added, serialized deterministically."""
    try:
        metadata = json.loads(source) if source else {}
    except (ValueError, UnicodeDecodeError):
        metadata = {"source_metadata_unreadable": True}
    if not isinstance(metadata, dict):
        metadata = {"source_metadata": metadata}
    metadata.setdefault("key", key)
    metadata["feature_cache"] = cache_entry
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
