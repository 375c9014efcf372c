"""The feature-caching job: tower features of img2dataset shards, computed once for stage-1 runs that skip the tower.

    python -m pipeline.prep.feature_cache run --config configs/stage1_8b.yaml \\
        --shards '/data/laion/shards/{00000..41407}.tar' --out /data/laion/features
    python -m pipeline.prep.feature_cache verify /data/laion/features

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
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.common.dist_env import job_rank_and_world
from pipeline.common.dtypes import torch_dtype
from pipeline.config import ConfigError, VisionConfig, load_config
from pipeline.data.features import (
    STORAGE_DTYPES,
    check_feature_shard,
)
from pipeline.data.shards import DataError, expand_shards
from pipeline.data.skips import SKIP_REASONS
from pipeline.data.stream import keep_batch
from pipeline.model.vision import load_vision_tower
from pipeline.prep.feature_encoding import (
    MANIFEST_DIR,
    FeatureEncoder,
    ImageCheckDecoder,
    InputShard,
    ShardBatches,
    ShardWriters,
)

log = logging.getLogger("pipeline.feature_cache")


def shard_name(url: str) -> str:
    """The input shard's file name, also for "pipe:aws s3 cp s3://bucket/00001.tar -" specs."""
    names = re.findall(r"[^/\s'\"]+\.tar\b", url)
    return names[-1] if names else os.path.basename(url.rstrip("/"))


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
    """--rank/--world, else what the environment says (`pipeline.common.dist_env.job_rank_and_world`)."""
    if (rank is None) != (world is None):
        raise DataError("give both --rank and --world, or neither (they are then read from the environment)")
    if rank is None:
        try:
            rank, world = job_rank_and_world(env)
        except ValueError as error:
            raise DataError(f"{error}; submit with --array=0-N or pass --rank and --world") from None
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
    out = Path(out_dir)
    mine, todo = _shards_to_cache(shards, out, rank, world)
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
        "tower": tower.signature,
        "feature_layer": vision.feature_layer,
        "hidden_state_index": tower.index,
        "tower_dtype": vision.dtype,
        "dtype": dtype,
        "batch_size": batch_size,
    }
    encoder = FeatureEncoder(tower, device, STORAGE_DTYPES[dtype], batch_size, buffers=writer_threads + 2)
    writers = ShardWriters(out, todo, provenance, writer_threads)
    started = time.perf_counter()
    wait_for_images_s = _encode_and_write(batches, encoder, writers, len(todo), rank, progress, on_batch)
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
    _log_run(rank, result)
    return result


def _log_run(rank: int, result: dict) -> None:
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
        result["wait_for_images_s"],
        result["wait_for_writers_s"],
        result["seconds"],
    )


def _shards_to_cache(shards: list[str], out: Path, rank: int, world: int) -> tuple[list, list[InputShard]]:
    """This rank's (url, name) pairs, and those of them not yet complete in `out` as `InputShard`s."""
    names = [shard_name(url) for url in shards]
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise DataError(
            f"input shards share the name '{repeated[0]}', and feature shards are named after them; "
            "cache each source into its own --out"
        )
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
    return mine, todo


def _encode_and_write(batches, encoder, writers, shards: int, rank: int, progress: bool, on_batch) -> float:
    """Every batch through the tower and to its writer; returns the seconds spent waiting for decoded images."""
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
                bar.set_postfix_str(f"{writers.shards_done}/{shards} shards", refresh=False)
                if on_batch is not None:
                    on_batch(len(batch["keys"]))
        finally:
            writers.close()
        bar.set_postfix_str(f"{writers.shards_done}/{shards} shards")
    return wait_for_images_s


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
    fields = ("model", "tower", "feature_layer", "tower_dtype", "dtype")
    common = Counter(json.dumps([r.get(f) for f in fields]) for r in records.values()).most_common(1)
    if not common:
        return []
    expected = dict(zip(fields, json.loads(common[0][0]), strict=True))
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
    parser = argparse.ArgumentParser(prog="python -m pipeline.prep.feature_cache", description=__doc__.split("\n")[0])
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
