"""LAION metadata → one filtered parquet for `data_prep/img2dataset.sh --url-col URL --caption-col TEXT`.

    python -m pipeline.prep.laion --out-dir /data/laion/meta --parts 0-3 --max-samples 20000000 \\
        [--shards /data/laion/shards [-- img2dataset.sh options]]

Fetches the chosen metadata parquets into OUT_DIR/raw/ (resumable, verified; see `pipeline.prep.download`), keeps
the rows worth downloading, stops once --max-samples rows are kept (parts after that are not fetched), and writes
OUT_DIR/laion_filtered.parquet with a stats file beside it. With --shards it then runs img2dataset on the result.

Columns, by release (matched case-insensitively; a filter whose column is absent is switched off, with a warning):
  LAION-400M (32 parts, part-000{00..31}-5b54c5d5-bbcf-484d-a2ce-0d6f73df1a36-c000.snappy.parquet):
      SAMPLE_ID, URL, TEXT, HEIGHT, WIDTH, LICENSE, NSFW ("UNLIKELY", "UNSURE" or "NSFW", a CLIP-based tag) and
      similarity (CLIP ViT-B/32 image-text cosine; the release already dropped pairs below 0.3).
  LAION-2B-en / LAION-5B "joined" parts: URL, TEXT, WIDTH, HEIGHT, similarity, hash, punsafe (probability that
      the image is unsafe), pwatermark (probability that it carries a watermark), in some releases LANGUAGE and
      AESTHETIC_SCORE.
  LAION-style lists that call them url / caption / width / height work too; url and caption are renamed to URL
      and TEXT in the output.

Filters; a row is kept only if it passes every filter that applies, and a missing value fails:
  url          starts with http:// or https://
  caption      --min-caption-chars to --max-caption-chars characters after trimming whitespace
  image_size   shorter side >= --min-image-side and longer / shorter <= --max-aspect-ratio (WIDTH, HEIGHT)
  nsfw         NSFW is one of --nsfw-keep (LAION-400M)
  punsafe      punsafe <= --max-punsafe (LAION-5B)
  pwatermark   pwatermark <= --max-pwatermark (LAION-5B)
  similarity   similarity >= --min-similarity (only when given)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.prep.download import DownloadError, Manifest, RemoteFile, fetch

log = logging.getLogger("pipeline.prep.laion")
ROOT = Path(__file__).resolve().parents[2]

# LAION-400M's metadata as the LAION team published it (img2dataset's LAION-400M guide uses the same files).
# LAION withdrew its datasets in December 2023; point --base-url at wherever your copy now lives.
LAION400M_BASE_URL = "https://the-eye.eu/public/AI/cah/laion400m-met-release/laion400m-meta"
LAION400M_PART = "part-{index:05d}-5b54c5d5-bbcf-484d-a2ce-0d6f73df1a36-c000.snappy.parquet"
LAION400M_PARTS = 32

# Canonical column → accepted spellings (compared in lower case), in order of preference.
COLUMN_ALIASES = {
    "URL": ("url",),
    "TEXT": ("text", "caption"),
    "WIDTH": ("width",),
    "HEIGHT": ("height",),
    "NSFW": ("nsfw",),
    "punsafe": ("punsafe",),
    "pwatermark": ("pwatermark",),
    "similarity": ("similarity",),
}
# Copied into each sample's .json by img2dataset, where present: provenance for later audits.
PROVENANCE_COLUMNS = ("SAMPLE_ID", "hash", "similarity", "punsafe", "pwatermark", "NSFW", "LICENSE")
ROWS_PER_BATCH = 65536


class LaionError(RuntimeError):
    """A user-fixable problem with the inputs or options; the message is one line."""


@dataclass
class FilterSettings:
    min_caption_chars: int = 5
    max_caption_chars: int = 512
    # CLIP ViT-L/14 reads 224 px; smaller images would be upsampled.
    min_image_side: int = 224
    max_aspect_ratio: float = 3.0
    nsfw_keep: tuple[str, ...] = ("UNLIKELY",)
    max_punsafe: float = 0.1
    max_pwatermark: float = 0.5
    min_similarity: float | None = None


def resolve_columns(names: list[str]) -> dict[str, str]:
    """Canonical column name → the name this parquet uses, for the columns it has."""
    by_lower = {name.lower(): name for name in names}
    found = {}
    for canonical, aliases in COLUMN_ALIASES.items():
        for alias in aliases:
            if alias in by_lower:
                found[canonical] = by_lower[alias]
                break
    return found


def row_filters(table: pa.Table, columns: dict[str, str], settings: FilterSettings) -> dict[str, pa.ChunkedArray]:
    """One boolean mask per filter that applies to this table (True = keep); nulls count as failures."""
    column = {canonical: table[actual] for canonical, actual in columns.items()}
    masks = {
        "url": pc.match_substring_regex(column["URL"], "^https?://", ignore_case=True),
    }
    caption_chars = pc.utf8_length(pc.utf8_trim_whitespace(column["TEXT"]))
    masks["caption"] = pc.and_(
        pc.greater_equal(caption_chars, settings.min_caption_chars),
        pc.less_equal(caption_chars, settings.max_caption_chars),
    )
    if "WIDTH" in column and "HEIGHT" in column:
        width, height = pc.cast(column["WIDTH"], pa.float64()), pc.cast(column["HEIGHT"], pa.float64())
        shorter = pc.min_element_wise(width, height, skip_nulls=False)
        longer = pc.max_element_wise(width, height, skip_nulls=False)
        masks["image_size"] = pc.and_(
            pc.greater_equal(shorter, settings.min_image_side),
            pc.less_equal(longer, pc.multiply(shorter, settings.max_aspect_ratio)),
        )
    if "NSFW" in column:
        keep = pa.array([value.upper() for value in settings.nsfw_keep])
        masks["nsfw"] = pc.is_in(pc.utf8_upper(pc.cast(column["NSFW"], pa.string())), value_set=keep)
    if "punsafe" in column:
        masks["punsafe"] = pc.less_equal(column["punsafe"], settings.max_punsafe)
    if "pwatermark" in column:
        masks["pwatermark"] = pc.less_equal(column["pwatermark"], settings.max_pwatermark)
    if "similarity" in column and settings.min_similarity is not None:
        masks["similarity"] = pc.greater_equal(column["similarity"], settings.min_similarity)
    return {name: pc.fill_null(mask, False) for name, mask in masks.items()}


class FilteredWriter:
    """Streams kept rows of one or more parts into one parquet (via a .tmp file renamed at the end)."""

    def __init__(self, path: Path, settings: FilterSettings, max_samples: int | None):
        self.path, self.settings, self.max_samples = path, settings, max_samples
        self.temporary = path.with_name(path.name + ".tmp")
        self.writer: pq.ParquetWriter | None = None
        self.stats = {"parts": [], "rows_read": 0, "rows_kept": 0, "failed": {}, "filters_off": {}}

    @property
    def full(self) -> bool:
        return self.max_samples is not None and self.stats["rows_kept"] >= self.max_samples

    def add_part(self, parquet: Path) -> None:
        source = pq.ParquetFile(parquet)
        columns = resolve_columns(source.schema_arrow.names)
        for required in ("URL", "TEXT"):
            if required not in columns:
                raise LaionError(
                    f"{parquet} has no {required} column (it has {', '.join(source.schema_arrow.names)})"
                    f"; pass LAION-style metadata parquets"
                )
        off = [
            name
            for name, needs in (
                ("image_size", "WIDTH"),
                ("nsfw", "NSFW"),
                ("punsafe", "punsafe"),
                ("pwatermark", "pwatermark"),
            )
            if needs not in columns
        ]
        if off:
            log.warning(
                "%s: no column for filter(s) %s; those filters are off for this part", parquet.name, ", ".join(off)
            )
        self.stats["filters_off"][parquet.name] = off
        self.stats["parts"].append(parquet.name)
        renames = {columns["URL"]: "URL", columns["TEXT"]: "TEXT"}
        for batch in source.iter_batches(batch_size=ROWS_PER_BATCH):
            table = pa.Table.from_batches([batch])
            masks = row_filters(table, columns, self.settings)
            keep = masks["url"]
            for name, mask in masks.items():
                failed = len(mask) - (pc.sum(mask).as_py() or 0)
                self.stats["failed"][name] = self.stats["failed"].get(name, 0) + failed
                keep = pc.and_(keep, mask)
            kept = table.filter(keep).rename_columns([renames.get(name, name) for name in table.column_names])
            self.stats["rows_read"] += table.num_rows
            if self.max_samples is not None:
                kept = kept.slice(0, self.max_samples - self.stats["rows_kept"])
            self._write(kept, parquet)
            if self.full:
                return

    def _write(self, kept: pa.Table, parquet: Path) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.temporary, kept.schema)
        elif kept.schema.names != self.writer.schema.names:
            raise LaionError(
                f"{parquet.name} has columns {kept.schema.names}, unlike the parts before it "
                f"({self.writer.schema.names}); filter one release at a time"
            )
        self.writer.write_table(kept.cast(self.writer.schema))
        self.stats["rows_kept"] += kept.num_rows

    def close(self) -> dict:
        if self.writer is None:
            raise LaionError("no parquet part was read; choose parts with --parts, --files or --local")
        self.writer.close()
        os.replace(self.temporary, self.path)
        self.stats["settings"] = asdict(self.settings)
        self.stats["provenance_columns"] = [c for c in PROVENANCE_COLUMNS if c in self.writer.schema.names]
        stats_path = self.path.with_name(self.path.stem + ".stats.json")
        stats_path.write_text(json.dumps(self.stats, indent=2) + "\n")
        return self.stats


def part_names(spec: str, count: int) -> list[str]:
    """'0-3,7' → the LAION-400M part file names 0, 1, 2, 3 and 7."""
    indices: list[int] = []
    for piece in spec.split(","):
        first, _, last = piece.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise LaionError(f"--parts '{spec}': use indices and ranges such as 0-3,7")
        indices.extend(range(int(first), int(last or first) + 1))
    bad = [i for i in indices if i >= count]
    if bad:
        raise LaionError(f"--parts '{spec}': LAION-400M has parts 0-{count - 1}; use --files for other releases")
    return [LAION400M_PART.format(index=index) for index in indices]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    img2dataset_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, img2dataset_args = argv[:cut], argv[cut + 1 :]
    defaults = FilterSettings()
    parser = argparse.ArgumentParser(
        prog="data_prep/fetch_laion.sh",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Anything after -- goes to data_prep/img2dataset.sh (with --shards).",
    )
    parser.add_argument(
        "--out-dir", type=Path, required=True, help="raw/ parts, laion_filtered.parquet and its stats go here"
    )
    source = parser.add_argument_group("which parquets (default: LAION-400M part 0)")
    source.add_argument("--base-url", default=LAION400M_BASE_URL, help="where the parts are served [%(default)s]")
    source.add_argument("--parts", default="0", help="LAION-400M part indices, e.g. 0-3,7 [%(default)s]")
    source.add_argument("--files", nargs="+", metavar="NAME", help="part file names under --base-url instead")
    source.add_argument(
        "--local",
        nargs="+",
        type=Path,
        metavar="PARQUET",
        help="already-downloaded parquets (or folders of them); nothing is fetched",
    )
    parser.add_argument("--max-samples", type=int, help="stop once this many rows are kept [all]")
    filters = parser.add_argument_group("filters")
    filters.add_argument("--min-caption-chars", type=int, default=defaults.min_caption_chars)
    filters.add_argument("--max-caption-chars", type=int, default=defaults.max_caption_chars)
    filters.add_argument("--min-image-side", type=int, default=defaults.min_image_side, help="pixels")
    filters.add_argument("--max-aspect-ratio", type=float, default=defaults.max_aspect_ratio)
    filters.add_argument(
        "--nsfw-keep",
        default=",".join(defaults.nsfw_keep),
        help="comma-separated NSFW tags to keep (LAION-400M) [%(default)s]",
    )
    filters.add_argument("--max-punsafe", type=float, default=defaults.max_punsafe, help="LAION-5B")
    filters.add_argument("--max-pwatermark", type=float, default=defaults.max_pwatermark, help="LAION-5B")
    filters.add_argument("--min-similarity", type=float, help="CLIP image-text similarity [no filter]")
    parser.add_argument("--shards", type=Path, help="then run data_prep/img2dataset.sh into this folder")
    parser.add_argument("--attempts", type=int, default=5, help="tries per file before giving up [%(default)s]")
    args = parser.parse_args(argv)
    if args.max_samples is not None and args.max_samples <= 0:
        parser.error("--max-samples must be positive")
    return args, img2dataset_args


def local_parquets(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(path.glob("*.parquet")))
        elif path.is_file():
            found.append(path)
        else:
            raise LaionError(f"--local {path}: no such file or folder")
    return found


def run_img2dataset(filtered: Path, shards: Path, provenance: list[str], extra: list[str]) -> None:
    command = [
        "bash",
        str(ROOT / "data_prep" / "img2dataset.sh"),
        "--input",
        str(filtered),
        "--output",
        str(shards),
        "--url-col",
        "URL",
        "--caption-col",
        "TEXT",
    ]
    if provenance:
        command += ["--extra-columns", ",".join(provenance)]
    command += extra
    log.info("running %s", " ".join(command))
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, img2dataset_args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = FilterSettings(
        min_caption_chars=args.min_caption_chars,
        max_caption_chars=args.max_caption_chars,
        min_image_side=args.min_image_side,
        max_aspect_ratio=args.max_aspect_ratio,
        nsfw_keep=tuple(tag.strip() for tag in args.nsfw_keep.split(",") if tag.strip()),
        max_punsafe=args.max_punsafe,
        max_pwatermark=args.max_pwatermark,
        min_similarity=args.min_similarity,
    )
    filtered = args.out_dir / "laion_filtered.parquet"
    writer = FilteredWriter(filtered, settings, args.max_samples)
    try:
        if args.local:
            for parquet in local_parquets(args.local):
                writer.add_part(parquet)
                if writer.full:
                    break
        else:
            raw = args.out_dir / "raw"
            manifest = Manifest(raw / "manifest.json")
            for name in args.files or part_names(args.parts, LAION400M_PARTS):
                url = f"{args.base_url.rstrip('/')}/{name}"
                part = fetch(
                    RemoteFile(url),
                    raw / name,
                    manifest=manifest,
                    attempts=args.attempts,
                    hint="check it, or pass --base-url for a mirror or --local for parquets on disk",
                )
                writer.add_part(part)
                if writer.full:
                    break
        stats = writer.close()
    except (DownloadError, LaionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (pa.ArrowException, OSError) as err:
        print(
            f"error: cannot read the parquet parts ({' '.join(str(err).split())}); delete the broken part "
            f"under {args.out_dir / 'raw'} and re-run",
            file=sys.stderr,
        )
        return 1
    log.info(
        "kept %d of %d rows in %s (failed per filter: %s)",
        stats["rows_kept"],
        stats["rows_read"],
        filtered,
        stats["failed"],
    )
    if args.shards is None:
        extra = f" --extra-columns {','.join(stats['provenance_columns'])}" if stats["provenance_columns"] else ""
        print(
            f"next: data_prep/img2dataset.sh --input {filtered} --output SHARD_DIR --url-col URL --caption-col "
            f"TEXT{extra}"
        )
        return 0
    try:
        run_img2dataset(filtered, args.shards, stats["provenance_columns"], img2dataset_args)
    except subprocess.CalledProcessError as err:
        print(
            f"error: data_prep/img2dataset.sh failed (exit {err.returncode}); see its output above, fix it and "
            f"re-run the same command (finished shards are kept)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
