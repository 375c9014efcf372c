"""Webdataset tar shards: spec expansion, the split of shards over readers, and reading raw records.

A shard spec such as "/data/laion/{00000..41407}.tar" is brace-expanded (and globbed when local) once, in
the main process, so a wrong path fails before any worker or process group starts. Each reader (one per
DataLoader worker per rank) then owns a fixed subset of every source's shards, and reads them as raw
records: one record per sample key, as `{extension: bytes}`, numbered in tar order before any decoding so
that "record i of shard s" names the same sample on every re-read.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tarfile
from collections.abc import Iterator
from urllib.parse import urlparse

import braceexpand

logger = logging.getLogger(__name__)

REMOTE_PREFIXES = ("s3://", "gs://", "http://", "https://", "pipe:")

# Same split as webdataset's `base_plus_ext`: the key is the path up to the first dot of the file name.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# A member larger than this is not read: no image, caption or feature tensor of a sample comes near it, and
# reading whatever a hostile or broken shard holds would let one member exhaust a loader worker's memory.
MAX_MEMBER_BYTES = 64 * 2**20
# Webdataset metadata members such as "__index__"; they belong to no sample.
_META_MEMBER = re.compile(r"(^|/)__[^/]*__$")


class DataError(ValueError):
    """A user-fixable problem with the data sources or the data state; the message is one line."""


def is_remote(spec: str) -> bool:
    return spec.startswith(REMOTE_PREFIXES)


# A numeric brace range such as {00000..41407}; its ends are compared to catch a range written backwards.
_NUMERIC_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.-?\d+)?\}")


def expand_shards(spec: str, where: str, allow_missing: bool = False) -> list[str]:
    """Brace-expand `spec` (and glob it when local) into a sorted list of distinct shard paths or URLs.

    `where` names the config key the spec came from, e.g. "data.sources[0].shards", for the error message.
    Remote URLs are not checked here. A local spec raises `DataError` when it matches no file, when a brace range
    runs backwards, or when any path it names is missing, unless `allow_missing` (a partly downloaded source).
    """
    spec = spec.strip()
    if not spec:
        raise DataError(f"'{where}' is empty; give a shard spec like /data/laion/{{00000..00099}}.tar")
    for match in _NUMERIC_RANGE.finditer(spec):
        first, last = int(match.group(1)), int(match.group(2))
        if first > last:
            raise DataError(
                f"'{where}' = '{spec}': the brace range {match.group(0)} runs backwards; "
                f"write {{{match.group(2)}..{match.group(1)}}}"
            )
    patterns = list(braceexpand.braceexpand(spec))
    if is_remote(spec):
        return sorted(set(patterns))
    found: set[str] = set()
    missing: list[str] = []
    # One directory listing instead of one stat per path: 41k stats on a network file system take minutes.
    listings: dict[str, set[str]] = {}
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            found.update(glob.glob(pattern))
            continue
        directory, name = os.path.split(pattern)
        if directory not in listings:
            listings[directory] = set(os.listdir(directory or ".")) if os.path.isdir(directory or ".") else set()
        if name in listings[directory]:
            found.add(pattern)
        else:
            missing.append(pattern)
    if not found:
        raise DataError(
            f"'{where}' = '{spec}' matches no file; check the path and the brace range "
            "(e.g. /data/laion/{00000..00099}.tar) or run data_prep/img2dataset.sh first"
        )
    if missing:
        if not allow_missing:
            raise DataError(
                f"'{where}': {len(missing)} of the {len(patterns)} paths in '{spec}' do not exist (first: "
                f"{missing[0]}); finish the download, narrow the range, or set data.allow_missing_shards=true"
            )
        # The user opted in to a partly downloaded source; the gap should still not go unnoticed.
        logger.warning("'%s': %d of the paths in '%s' do not exist (first: %s)", where, len(missing), spec, missing[0])
    return sorted(found)


def shard_fingerprint(shards: list[str]) -> str:
    """A short hash of the shard list, stored with the data state to detect a changed source on resume."""
    return hashlib.sha1("\n".join(shards).encode()).hexdigest()[:16]


def check_enough_shards(shards: list[str], num_readers: int, where: str, world_size: int, readers_per_rank: int):
    """Every reader needs at least one shard of every source, or it would have nothing to read."""
    if len(shards) < num_readers:
        raise DataError(
            f"'{where}' has {len(shards)} shards but {num_readers} readers need one each "
            f"(world size {world_size} x {readers_per_rank} readers per rank); "
            "lower data.num_workers or split the data into more shards"
        )


def reader_shards(shards: list[str], reader_index: int, num_readers: int) -> list[str]:
    """The shards of reader `reader_index` (= rank * readers_per_rank + worker): every num_readers-th one."""
    return shards[reader_index::num_readers]


def open_shard(url: str):
    """A binary stream for a local path or URL: webdataset's gopen where it has a handler, else fsspec."""
    scheme = urlparse(url).scheme
    if scheme == "":
        return open(url, "rb")  # noqa: SIM115 - the caller closes it
    # Imported here: webdataset imports torch, and local shards (and the checks made before training) do without it.
    from webdataset.gopen import gopen, gopen_schemes

    if scheme == "file" or scheme in gopen_schemes:
        return gopen(url, "rb")
    import fsspec  # only remote stores such as s3:// need it

    return fsspec.open(url, "rb").open()


class OversizedMember(bytes):
    """Stands in (as empty bytes) for a member too large to read; `size` is its size in the tar."""

    size: int

    def __new__(cls, size: int):
        member = super().__new__(cls)
        member.size = size
        return member


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Remembers on the archive why its last header could not be read.

    `tarfile` ends iteration quietly at a header that is truncated, garbled or missing altogether, exactly as at
    the zero block that properly ends an archive; only that last case is a clean end of a shard."""

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as error:
            archive.end_error = error
            raise


def iter_shard_records(url: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield `(key, {extension: bytes})` for each sample of a tar shard, in tar order.

    Consecutive members with the same key form one record; extensions are lower-cased. A member larger than
    `max_member_bytes` is not read: an `OversizedMember` stands in for it, so memory stays bounded whatever the
    shard holds. Any read error (missing file, corrupt tar, a tar cut inside a member or a header, a missing
    end-of-archive block, bytes after it other than zero padding) propagates to the caller after the records read
    so far, and the record being assembled at that moment is dropped, since it may be missing members.
    """
    stream = open_shard(url)
    completed = False
    try:
        archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndCheckingTarInfo)
        key, members = None, {}
        for info in archive:
            if not info.isreg() or _META_MEMBER.search(info.name):
                continue
            match = _KEY_AND_EXTENSION.match(info.name)
            if match is None:
                continue
            member_key, extension = match.group(1), match.group(2).lower()
            # A repeated extension under the same key can only be a second sample that reuses the key.
            if member_key != key or extension in members:
                if members:
                    yield key, members
                key, members = member_key, {}
            if info.size > max_member_bytes:
                members[extension] = OversizedMember(info.size)
            else:
                members[extension] = archive.extractfile(info).read()
            # Stream mode keeps every TarInfo otherwise; a 10k-sample shard would hold them all.
            archive.members = []
        _check_end_block(archive)
        if members:  # complete: the end-of-archive block follows it
            yield key, members
        _check_padding(archive)
        completed = True
    finally:
        try:
            stream.close()
        except Exception:
            # Closing a pipe that was abandoned part way reports its broken-pipe exit status; that is
            # expected then, and an error already propagating is the one worth reporting.
            if completed:
                raise


def _check_end_block(archive: tarfile.TarFile) -> None:
    """Raise `tarfile.ReadError` unless the archive's members ended at its end-of-archive (zero) block."""
    error = getattr(archive, "end_error", None)
    if not isinstance(error, tarfile.EOFHeaderError):
        what = "no end-of-archive block" if error is None else str(error)
        raise tarfile.ReadError(f"cut short at byte {archive.offset} ({what})")


def _check_padding(archive: tarfile.TarFile) -> None:
    """Raise `tarfile.ReadError` if anything but zero padding follows the end-of-archive block."""
    while chunk := archive.fileobj.read(1 << 16):
        if chunk.count(0) != len(chunk):
            raise tarfile.ReadError(f"bytes other than zero padding after the end-of-archive block at {archive.offset}")
