"""LLaVA-Instruct-150K and COCO train2017 for stage 2; COCO val2014, the Karpathy split and VQAv2 for evaluation.

    python -m pipeline.prep.llava_coco --root /data/anymal [--only llava_instruct,coco_train2017] \\
        [--base-url coco=http://mirror.example/coco/zips] [--keep-archives]

Layout under ROOT, which stage-2 and evaluation configs point at:
    llava/llava_instruct_150k.json                    LLaVA-Instruct-150K; each "image" is a file in coco/train2017
    coco/train2017/000000000009.jpg ...               118,287 images
    coco/val2014/COCO_val2014_000000000042.jpg ...    40,504 images (VQAv2 val and Karpathy val/test images)
    coco/karpathy/dataset_coco.json                   Karpathy's train/val/test split of COCO 2014, with captions
    vqav2/v2_OpenEnded_mscoco_val2014_questions.json  VQAv2 val questions
    vqav2/v2_mscoco_val2014_annotations.json          VQAv2 val answers
    manifest.json                                     url, size and sha256 of everything downloaded
    downloads/                                        archives in flight (kept afterwards with --keep-archives)

Every download resumes and is verified (see `pipeline.prep.download`): against the published size and checksums
where they are known (below), otherwise against the server's length, the zip's own CRCs, and on later runs the
sha256 recorded in manifest.json. A folder or file appears under ROOT only once complete, so an interrupted run is
resumed by running the same command again; outputs already there are skipped.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pipeline.prep.download import DownloadError, Manifest, RemoteFile, fetch

log = logging.getLogger("pipeline.prep.llava_coco")

BASE_URLS = {
    "llava": "https://huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K/resolve/main",
    "coco": "http://images.cocodataset.org/zips",
    "karpathy": "https://cs.stanford.edu/people/karpathy/deepimagesent",
    "vqa": "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa",
}


@dataclass(frozen=True)
class Asset:
    """One published file and what it becomes under ROOT."""

    source: str  # key of the base URL that serves it
    filename: str
    # (member, destination under ROOT). A member ending in "/" is a folder extracted whole; a file that is not
    # an archive has the single pair ("", destination).
    outputs: tuple[tuple[str, str], ...]
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None
    files_in_folder: int | None = None  # images in a folder output, checked after extraction

    @property
    def is_archive(self) -> bool:
        return self.outputs[0][0] != ""


# Sizes and checksums only where published and agreed on by independent sources (COCO's md5 sums are quoted by
# many download scripts; the sha256 sums are those of Hugging Face's COCO loader). The rest are checked against
# the server's length and zip CRCs, and their sha256 is recorded in manifest.json.
DATASETS: dict[str, tuple[Asset, ...]] = {
    "llava_instruct": (
        Asset("llava", "llava_instruct_150k.json", (("", "llava/llava_instruct_150k.json"),), size=228_941_895),
    ),
    "coco_train2017": (
        Asset(
            "coco",
            "train2017.zip",
            (("train2017/", "coco/train2017"),),
            size=19_336_861_798,
            md5="cced6f7f71b7629ddf16f17bbcfab6b2",
            sha256="69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
            files_in_folder=118_287,
        ),
    ),
    "coco_val2014": (
        Asset(
            "coco",
            "val2014.zip",
            (("val2014/", "coco/val2014"),),
            size=6_645_013_297,
            md5="a3d79f5ed8d289b7a7554ce06a5782b3",
            sha256="fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0",
            files_in_folder=40_504,
        ),
    ),
    "karpathy": (
        Asset("karpathy", "caption_datasets.zip", (("dataset_coco.json", "coco/karpathy/dataset_coco.json"),)),
    ),
    "vqav2": (
        Asset(
            "vqa",
            "v2_Questions_Val_mscoco.zip",
            (("v2_OpenEnded_mscoco_val2014_questions.json", "vqav2/v2_OpenEnded_mscoco_val2014_questions.json"),),
        ),
        Asset(
            "vqa",
            "v2_Annotations_Val_mscoco.zip",
            (("v2_mscoco_val2014_annotations.json", "vqav2/v2_mscoco_val2014_annotations.json"),),
        ),
    ),
}


class PrepError(RuntimeError):
    """A problem with an archive or the options; the message is one line."""


def prepare(
    root: Path,
    names: list[str],
    base_urls: dict[str, str],
    *,
    keep_archives: bool = False,
    attempts: int = 5,
    backoff_s: float = 2.0,
    datasets: dict[str, tuple[Asset, ...]] = DATASETS,
) -> None:
    """Download and lay out the named datasets under `root`, skipping outputs that are already complete."""
    manifest = Manifest(root / "manifest.json")
    for name in names:
        for asset in datasets[name]:
            url = f"{base_urls[asset.source].rstrip('/')}/{asset.filename}"
            remote = RemoteFile(url, size=asset.size, sha256=asset.sha256, md5=asset.md5)
            hint = f"check it, or pass --base-url {asset.source}=URL to use a mirror"
            if not asset.is_archive:
                fetch(
                    remote,
                    root / asset.outputs[0][1],
                    manifest=manifest,
                    attempts=attempts,
                    backoff_s=backoff_s,
                    hint=hint,
                )
                continue
            missing = [(member, root / dest) for member, dest in asset.outputs if not (root / dest).exists()]
            if not missing:
                log.info("%s: %s already in place", name, ", ".join(dest for _, dest in asset.outputs))
                continue
            archive = root / "downloads" / asset.filename
            for last_try in (False, True):
                fetch(remote, archive, manifest=manifest, attempts=attempts, backoff_s=backoff_s, hint=hint)
                try:
                    extract(archive, missing, asset.files_in_folder)
                    break
                except zipfile.BadZipFile as err:
                    # Only possible for archives without a published checksum: download it once more.
                    archive.unlink()
                    if last_try:
                        raise PrepError(
                            f"{url} is not a valid zip archive even after a fresh download ({err}); {hint}"
                        ) from None
                    log.warning("%s is corrupt (%s); downloading it again", archive, err)
            if not keep_archives:
                archive.unlink()


def extract(archive: Path, outputs: list[tuple[str, Path]], files_in_folder: int | None) -> None:
    """Extract each (member, destination) through a temporary name, so a destination only appears complete."""
    with zipfile.ZipFile(archive) as bundle:
        for member, dest in outputs:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if member.endswith("/"):
                _extract_folder(bundle, member, dest, files_in_folder)
                continue
            try:
                info = bundle.getinfo(member)
            except KeyError:
                raise PrepError(
                    f"{archive.name} has no {member}; the server sent a different archive: delete "
                    f"{archive} and check the URL"
                ) from None
            temporary = dest.with_name(dest.name + ".partial")
            with bundle.open(info) as source, temporary.open("wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
            os.replace(temporary, dest)
            log.info("extracted %s", dest)


def _extract_folder(bundle: zipfile.ZipFile, prefix: str, dest: Path, files_in_folder: int | None) -> None:
    members = [info for info in bundle.infolist() if info.filename.startswith(prefix) and not info.is_dir()]
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for info in tqdm(members, desc=f"extract {dest.name}", unit="file", mininterval=1.0):
        relative = PurePosixPath(info.filename[len(prefix) :])
        if relative.is_absolute() or ".." in relative.parts:
            raise PrepError(f"{bundle.filename}: member {info.filename} would land outside {dest}; not extracting")
        target = staging.joinpath(*relative.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with bundle.open(info) as source, target.open("wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    if files_in_folder is not None and len(members) != files_in_folder:
        shutil.rmtree(staging)
        raise PrepError(
            f"{bundle.filename} holds {len(members)} files under {prefix}, {files_in_folder} expected; "
            f"delete it and re-run"
        )
    os.replace(staging, dest)
    log.info("extracted %d files into %s", len(members), dest)


def parse_base_urls(pairs: list[str]) -> dict[str, str]:
    base_urls = dict(BASE_URLS)
    for pair in pairs:
        key, sep, url = pair.partition("=")
        if not sep or key not in BASE_URLS:
            raise PrepError(f"--base-url '{pair}': use KEY=URL with KEY one of {', '.join(BASE_URLS)}")
        base_urls[key] = url
    return base_urls


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="data_prep/fetch_llava_coco.sh",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", type=Path, required=True, help="where the layout below is built")
    parser.add_argument(
        "--only", default=",".join(DATASETS), help=f"comma-separated subset of {', '.join(DATASETS)} [all]"
    )
    parser.add_argument(
        "--base-url",
        action="append",
        default=[],
        metavar="KEY=URL",
        help="serve KEY (" + ", ".join(f"{k}: {v}" for k, v in BASE_URLS.items()) + ") from URL",
    )
    parser.add_argument("--keep-archives", action="store_true", help="keep the zips in ROOT/downloads")
    parser.add_argument("--attempts", type=int, default=5, help="tries per file before giving up [%(default)s]")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in names if name not in DATASETS]
    if unknown:
        parser.error(f"--only: unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    try:
        prepare(
            args.root, names, parse_base_urls(args.base_url), keep_archives=args.keep_archives, attempts=args.attempts
        )
    except (DownloadError, PrepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    outputs = [dest for name in names for asset in DATASETS[name] for _, dest in asset.outputs]
    print(f"ready under {args.root}: " + ", ".join(outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
