"""The feature-caching job: CLIP features of img2dataset shards, computed once for stage-1 runs that skip the tower.

    python -m pipeline.data.feature_cache run --config configs/stage1_8b.yaml \\
        --shards '/data/laion/shards/{00000..41407}.tar' --out /data/laion/features
    python -m pipeline.data.feature_cache verify /data/laion/features

One process per GPU; the sorted input shards are split by rank (shard i goes to rank i % world). Preprocessing
and the hidden layer are training's: `CaptionDecoder`'s image path and `load_vision_tower` on the run config's
`model.vision`. Within a process:
  - DataLoader workers decode whole input shards in record order (worker w takes shards w, w + W, ...) and
    send batches of pixels already cast to the tower's dtype, which is the tower's own first step;
  - the main thread copies a batch in on one CUDA stream, runs the tower in inference mode, and copies the
    features out into pinned buffers on another, so transfers overlap the next forward pass;
  - writer threads (shard i on thread i % T) write the feature shard, hash it and record it in the manifest.
A batch never spans two shards, so a shard that is redone after a restart meets the same batches and comes
out byte-identical.

Restart: a shard is complete when its file and its manifest record (out/manifest/NAME.json, written after the
file's rename, with samples, bytes, sha256 and skipped counts) agree; complete shards are skipped, and everything
else is redone from a fresh NAME.tmp. Bad samples (corrupt image, empty caption, missing member, unreadable tar, and
features that are not finite in the stored dtype) are skipped and counted in the manifest; they never stop the job.
`verify` checks a finished folder against the manifest. See `pipeline.data.features` for the format.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline.config import ConfigError, VisionConfig, load_config
from pipeline.data.captions import CAPTION_MEMBER, CaptionDecoder
from pipeline.data.features import (
    STORAGE_DTYPES,
    FeatureShardWriter,
    check_feature_shard,
    features_header,
)
from pipeline.data.shards import DataError, expand_shards, iter_shard_records
from pipeline.data.stream import SKIP_REASONS, SkipLog, SkipSample, describe_error, keep_batch
from pipeline.model.vision import load_vision_tower, torch_dtype

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
        write_json_atomically(self.out / MANIFEST_DIR / f"{shard.name}.json", record)
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


def shard_name(url: str) -> str:
    """The input shard's file name, also for "pipe:aws s3 cp s3://bucket/00001.tar -" specs."""
    names = re.findall(r"[^/\s'\"]+\.tar\b", url)
    return names[-1] if names else os.path.basename(url.rstrip("/"))


def write_json_atomically(path: Path, value: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, sort_keys=True, indent=1) + "\n")
    os.replace(temporary, path)


def read_manifest_record(out: Path, name: str) -> dict | None:
    try:
        return json.loads((out / MANIFEST_DIR / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def is_complete(out: Path, name: str) -> bool:
    """A shard is complete when its file exists and has the size its manifest record gives."""
    record = read_manifest_record(out, name)
    path = out / name
    return record is not None and path.is_file() and path.stat().st_size == record.get("bytes")


def rank_and_world(rank: int | None, world: int | None, env=os.environ) -> tuple[int, int]:
    """--rank/--world; else torchrun's RANK/WORLD_SIZE; else SLURM array task x srun task; else rank 0 of 1.

    SLURM's task count is taken from SLURM_STEP_NUM_TASKS, which only srun sets: a script that runs the job once
    in the batch step of a multi-task allocation then counts as one rank, not as rank 0 of several that never run.
    """
    if (rank is None) != (world is None):
        raise DataError("give both --rank and --world, or neither (they are then read from the environment)")
    if rank is None:
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        else:
            rank, world = int(env.get("SLURM_PROCID", 0)), int(env.get("SLURM_STEP_NUM_TASKS", 1))
            if "SLURM_ARRAY_TASK_ID" in env:
                step = int(env.get("SLURM_ARRAY_TASK_STEP", 1))
                index = (int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))) // step
                count = int(env["SLURM_ARRAY_TASK_COUNT"])
                if not 0 <= index < count:
                    raise DataError(
                        f"SLURM array task {env['SLURM_ARRAY_TASK_ID']} is not in a contiguous range; "
                        "submit with --array=0-N or pass --rank and --world"
                    )
                rank, world = index * world + rank, count * world
    if not 0 <= rank < world:
        raise DataError(f"rank {rank} is not in [0, {world}); check --rank and --world")
    return rank, world


def default_device(env=os.environ) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def default_num_workers(env=os.environ) -> int:
    """Five eighths of the cores per GPU (10 of 16): enough decode workers to keep up with the tower, while the
    writer threads (sha256 and page-cache copies) keep about two cores and the main process one; more workers starved
    the writers (docs/performance.md). The job's last log line says which side the tower waited for."""
    cpus = len(os.sched_getaffinity(0)) // max(1, int(env.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, cpus * 5 // 8)


def cache_features(
    vision: VisionConfig,
    shards: list[str],
    out_dir: str | Path,
    *,
    dtype: str = "float16",
    batch_size: int = 256,
    num_workers: int = 0,
    writer_threads: int = 4,
    device: torch.device | None = None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Cache this rank's share of `shards` into `out_dir`; returns counts and the rate of this run.

    `on_batch(images)` is called as each batch goes to the tower (benchmarks time the steady state with it).
    """
    if batch_size < 1 or writer_threads < 1 or num_workers < 0:
        raise DataError(
            f"batch size {batch_size} and writer threads {writer_threads} must be positive, "
            f"workers {num_workers} not negative"
        )
    names = [shard_name(url) for url in shards]
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise DataError(
            f"input shards share the name '{repeated[0]}', and feature shards are named after them; "
            "cache each source into its own --out"
        )
    out = Path(out_dir)
    (out / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
    mine = list(zip(shards, names, strict=True))[rank::world]
    pending = [(url, name) for url, name in mine if not is_complete(out, name)]
    todo = [InputShard(index, url, name) for index, (url, name) in enumerate(pending)]
    log.info(
        "rank %d of %d: %d of its %d shards are already cached; caching %d",
        rank,
        world,
        len(mine) - len(todo),
        len(mine),
        len(todo),
    )
    result = {
        "shards_total": len(mine),
        "shards_already_cached": len(mine) - len(todo),
        "shards_cached": 0,
        "images": 0,
        "seconds": 0.0,
        "images_per_s": 0.0,
        "skipped": dict.fromkeys((*SKIP_REASONS, "nonfinite_features"), 0),
    }
    if not todo:
        return result

    device = device or default_device()
    decoder = ImageCheckDecoder(vision.model)
    decoder.load()  # a wrong processor path fails here, not in every worker
    workers = min(num_workers, len(todo))
    loader = DataLoader(
        ShardBatches(todo, decoder, batch_size, torch_dtype(vision.dtype)),
        batch_size=None,
        collate_fn=keep_batch,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None,
        in_order=False,  # each worker's batches still come in order; no worker waits for a slower one
    )
    batches = iter(loader)  # starts the workers before the tower and the writer threads exist
    tower = load_vision_tower(vision).to(device)
    provenance = {
        "model": vision.model,
        "feature_layer": vision.feature_layer,
        "hidden_state_index": tower.index,
        "tower_dtype": vision.dtype,
        "dtype": dtype,
        "batch_size": batch_size,
    }
    encoder = FeatureEncoder(tower, device, STORAGE_DTYPES[dtype], batch_size, buffers=writer_threads + 2)
    writers = ShardWriters(out, todo, provenance, writer_threads)
    started = time.perf_counter()
    wait_for_images_s = 0.0  # time blocked on the decode workers: they are the bottleneck
    with tqdm(
        desc=f"rank {rank}",
        unit="img",
        unit_scale=True,
        disable=not progress,
        smoothing=0.05,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    ) as bar:
        try:
            while True:
                waited = time.perf_counter()
                batch = next(batches, None)
                wait_for_images_s += time.perf_counter() - waited
                if batch is None:
                    break
                pixels = batch["pixel_values"]
                writers.submit(batch, encoder.encode(pixels) if pixels is not None else None)
                bar.update(len(batch["keys"]))
                bar.set_postfix_str(f"{writers.shards_done}/{len(todo)} shards", refresh=False)
                if on_batch is not None:
                    on_batch(len(batch["keys"]))
        finally:
            writers.close()
        bar.set_postfix_str(f"{writers.shards_done}/{len(todo)} shards")
    seconds = time.perf_counter() - started
    result.update(
        shards_cached=writers.shards_done,
        images=writers.images_written,
        seconds=seconds,
        images_per_s=writers.images_written / seconds if seconds else 0.0,
        wait_for_images_s=wait_for_images_s,
        wait_for_writers_s=encoder.wait_for_writers_s,
    )
    result["skipped"].update(writers.skipped)
    log.info(
        "rank %d: cached %d images in %d shards at %.0f images/s; skipped %s",
        rank,
        result["images"],
        result["shards_cached"],
        result["images_per_s"],
        {k: v for k, v in result["skipped"].items() if v},
    )
    # Where the tower waited says what to add: decode workers (--num-workers) or writers (and storage bandwidth).
    log.info(
        "rank %d: the tower waited %.1f s for decoded images and %.1f s for the writers in %.1f s",
        rank,
        wait_for_images_s,
        encoder.wait_for_writers_s,
        seconds,
    )
    return result


def verify(out_dir: str | Path, shard_spec: str | None = None, workers: int = 1) -> list[str]:
    """Problems of a feature-shard folder as "NAME: problem" lines; [] when every shard matches its manifest."""
    out = Path(out_dir)
    if not (out / MANIFEST_DIR).is_dir():
        return [f"{out}: no {MANIFEST_DIR}/ folder; is this the --out of the feature-caching job?"]
    problems, records = [], {}
    for path in sorted((out / MANIFEST_DIR).glob("*.json")):
        name = path.name.removesuffix(".json")
        record = read_manifest_record(out, name)
        if record is None:
            problems.append(f"{name}: manifest record {path} is unreadable; delete it and rerun the job")
        else:
            records[name] = record
    files = sorted(path.name for path in out.iterdir() if path.is_file())
    for name in files:
        if name.endswith(".tmp"):
            problems.append(f"{name}: partial output of an interrupted run; rerun the job")
        elif name not in records:
            problems.append(f"{name}: no manifest record, so it may be incomplete; rerun the job")
    present = [name for name in records if name in files]
    for name in sorted(set(records) - set(present)):
        problems.append(f"{name}: in the manifest but not on disk; rerun the job")
    if shard_spec:
        for url in expand_shards(shard_spec, "--shards"):
            if shard_name(url) not in records:
                problems.append(f"{shard_name(url)}: not cached yet; run the job")
    problems += _provenance_problems({name: records[name] for name in present})
    with ProcessPoolExecutor(workers) if workers > 1 else _Inline() as pool:
        results = pool.map(check_feature_shard, [str(out / name) for name in present], [records[n] for n in present])
        for name, shard_problems in zip(present, results, strict=True):
            problems += [f"{name}: {problem}" for problem in shard_problems]
    return problems


def _provenance_problems(records: dict[str, dict]) -> list[str]:
    """Shards cached with another model, layer or dtype than most: training would mix incompatible features."""
    fields = ("model", "feature_layer", "tower_dtype", "dtype")
    common = Counter(tuple(r.get(f) for f in fields) for r in records.values()).most_common(1)
    if not common:
        return []
    expected = dict(zip(fields, common[0][0], strict=True))
    problems = []
    for name, record in records.items():
        differences = {field: record.get(field) for field in fields if record.get(field) != expected[field]}
        if differences:
            problems.append(f"{name}: cached with {differences}, most shards with {expected}; recache it")
    return problems


class _Inline:
    """A stand-in for a process pool that maps in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, function, *iterables):
        return map(function, *iterables)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.feature_cache", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="cache the features of this rank's shards")
    run.add_argument("--config", required=True, help="the stage-1 run config; its model.vision is used")
    run.add_argument("--shards", required=True, help="img2dataset shards, e.g. '/data/laion/{00000..41407}.tar'")
    run.add_argument("--out", required=True, help="folder for the feature shards and manifest/")
    run.add_argument(
        "--dtype",
        choices=sorted(STORAGE_DTYPES),
        default="float16",
        help="stored dtype: float16 (default; holds a bfloat16 tower's output exactly in its range), "
        "bfloat16, or float32 (test precision, 2x the storage)",
    )
    run.add_argument("--batch-size", type=int, default=256, help="images per forward pass [256]")
    run.add_argument("--num-workers", type=int, default=None, help="decode processes [5/8 of the cores per GPU]")
    run.add_argument("--writer-threads", type=int, default=4, help="threads writing and hashing shards [4]")
    run.add_argument("--device", default=None, help="e.g. cuda:0 or cpu [cuda:LOCAL_RANK, else cpu]")
    run.add_argument("--rank", type=int, default=None, help="this process's rank [from RANK or SLURM_* or 0]")
    run.add_argument("--world", type=int, default=None, help="number of processes [from WORLD_SIZE or SLURM_* or 1]")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("overrides", nargs="*", help="config overrides, e.g. model.vision.model=/models/clip")
    check = commands.add_parser("verify", help="check feature shards against the manifest")
    check.add_argument("out", help="the --out folder of the caching job")
    check.add_argument("--shards", default=None, help="also report input shards that are not cached yet")
    check.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))), help="processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "verify":
            problems = verify(args.out, args.shards, args.workers)
            for line in problems:
                print(line)
            print(f"verify: {len(problems)} problems" if problems else f"verify: {args.out} is sound")
            return 1 if problems else 0
        config = load_config(args.config, args.overrides)
        rank, world = rank_and_world(args.rank, args.world)
        shards = expand_shards(args.shards, "--shards")
        workers = default_num_workers() if args.num_workers is None else args.num_workers
        device = torch.device(args.device) if args.device else None
        cache_features(
            config.model.vision,
            shards,
            args.out,
            dtype=args.dtype,
            batch_size=args.batch_size,
            num_workers=workers,
            writer_threads=args.writer_threads,
            device=device,
            rank=rank,
            world=world,
            progress=not args.no_progress,
        )
    except (ConfigError, DataError) as error:
        print(f"feature_cache: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
