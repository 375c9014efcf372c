"""LLaVA-format instruction data (a conversation JSON plus an image folder) → webdataset shards for stage 2.

    python -m pipeline.prep.instruct_shards --json /data/anymal/llava/llava_instruct_150k.json \\
        --images /data/anymal/coco/train2017 --out /data/anymal/llava/shards [--shard-size 5000] [--workers 16]

The JSON is a list of records {"id", "image" (a path relative to --images), "conversations": [{"from": "human" |
"gpt", "value": ...}, ...]}, as LLaVA-Instruct-150K ships it. Each usable record becomes one sample:
    KEY.jpg (or .png/.webp: the image file's bytes, unchanged)   KEY.json ({"id", "image", "conversations"})
with KEY the record's index (ids may hold dots or slashes, which webdataset keys cannot). Shards are
OUT/{00000..N}.tar, each written to a temporary name and renamed when complete.

A record whose image is missing or unreadable (fully decoded with PIL to find truncated files), that has no image,
or that is malformed is skipped: never a crash. Each skip is logged in OUT/skipped.jsonl (index, id, reason,
detail) and counted in OUT/stats.json, which the command also prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

from PIL import Image

log = logging.getLogger("pipeline.prep.instruct_shards")
IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
SKIP_REASONS = ("missing_image", "unreadable_image", "no_image", "bad_record")


def check_record(index: int, record, images_dir: Path) -> tuple[str, bytes | str]:
    """("ok", image bytes) for a usable record, else (skip reason, detail)."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list) or not record["conversations"]:
        return "bad_record", "not a record with a non-empty 'conversations' list"
    if not record.get("image"):
        return "no_image", "text-only record"
    path = images_dir / record["image"]
    if Path(record["image"]).suffix.lower() not in IMAGE_EXTENSIONS:
        return "unreadable_image", f"{path}: not a .jpg, .png or .webp file"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing_image", str(path)
    except OSError as error:
        return "unreadable_image", f"{path}: {error}"
    try:
        with Image.open(BytesIO(data)) as image:
            image.load()
    except Exception as error:  # PIL raises many types for bad bytes; all mean the same here
        return "unreadable_image", f"{path}: {type(error).__name__}: {str(error)[:200]}"
    return "ok", data


class ShardWriter:
    """Tar shards of `shard_size` samples, each renamed into place once complete."""

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.shards = 0
        self._tar = None
        self._count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self._tar is None:
            self._tmp = self.out_dir / f".{self.shards:05d}.tar.tmp"
            self._tar = tarfile.open(self._tmp, "w")
        for extension, payload in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(payload)
            info.mtime = 0
            self._tar.addfile(info, BytesIO(payload))
        self._count += 1
        if self._count == self.shard_size:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self._tmp, self.out_dir / f"{self.shards:05d}.tar")
        self.shards += 1
        self._tar, self._count = None, 0


def _checked(records: list, images_dir: Path, pool: ThreadPoolExecutor, chunk: int):
    """(index, record, check result) in record order. PIL decodes with the GIL released, so threads check images in
    parallel; a chunk at a time, so that only that many images are held in memory."""
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        results = pool.map(check_record, range(start, start + len(part)), part, [images_dir] * len(part))
        for offset, (record, result) in enumerate(zip(part, results, strict=True)):
            yield start + offset, record, result


def convert(
    json_path: str | Path, images_dir: str | Path, out_dir: str | Path, shard_size: int = 5000, workers: int = 8
) -> dict:
    """Write the shards, skipped.jsonl and stats.json; returns the stats."""
    json_path, images_dir, out_dir = Path(json_path), Path(images_dir), Path(out_dir)
    if not json_path.is_file():
        raise FileNotFoundError(f"--json {json_path} does not exist")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"--images {images_dir} is not a directory")
    records = json.loads(json_path.read_text())
    if not isinstance(records, list):
        raise ValueError(f"{json_path} must hold a list of LLaVA records")
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, shard_size)
    skipped: Counter = Counter()
    with open(out_dir / "skipped.jsonl", "w") as skip_log, ThreadPoolExecutor(workers) as pool:
        for index, record, (status, payload) in _checked(records, images_dir, pool, chunk=workers * 64):
            if status != "ok":
                skipped[status] += 1
                record_id = record.get("id") if isinstance(record, dict) else None
                skip_log.write(
                    json.dumps({"index": index, "id": record_id, "reason": status, "detail": payload}) + "\n"
                )
                if sum(skipped.values()) <= 10:
                    log.warning("skipped record %d (%s): %s: %s", index, record_id, status, payload)
                continue
            sample = {"id": record.get("id", index), "image": record["image"], "conversations": record["conversations"]}
            extension = IMAGE_EXTENSIONS[Path(record["image"]).suffix.lower()]
            writer.add(f"{index:09d}", {extension: payload, "json": json.dumps(sample).encode()})
    writer.close()
    stats = {
        "records": len(records),
        "written": len(records) - sum(skipped.values()),
        "shards": writer.shards,
        "skipped": {reason: skipped[reason] for reason in SKIP_REASONS},
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="LLaVA-format conversation JSON (a list of records)")
    parser.add_argument("--images", required=True, help="folder the records' 'image' paths are relative to")
    parser.add_argument("--out", required=True, help="output folder for {00000..N}.tar, stats.json, skipped.jsonl")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    parser.add_argument("--workers", type=int, default=8, help="threads that read and check images")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    if args.shard_size < 1 or args.workers < 1:
        parser.error("--shard-size and --workers must be positive")
    try:
        stats = convert(args.json, args.images, args.out, args.shard_size, args.workers)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
