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
# Webdataset metadata members such as "__index__"; they belong to no sample.
_META_MEMBER = re.compile(r"(^|/)__[^/]*__$")


class DataError(ValueError):
    """A user-fixable problem with the data sources or the data state; the message is one line."""


def is_remote(spec: str) -> bool:
    return spec.startswith(REMOTE_PREFIXES)


def expand_shards(spec: str, where: str) -> list[str]:
    """Brace-expand `spec` (and glob it when local) into a sorted list of distinct shard paths or URLs.

    `where` names the config key the spec came from, e.g. "data.sources[0].shards", for the error message.
    Remote URLs are not checked here; a local spec that matches no file raises `DataError`.
    """
    spec = spec.strip()
    if not spec:
        raise DataError(f"'{where}' is empty; give a shard spec like /data/laion/{{00000..00099}}.tar")
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
    if found and missing:
        # A partly downloaded source is usable, but the gap should not go unnoticed.
        logger.warning("'%s': %d of the paths in '%s' do not exist (first: %s)", where, len(missing), spec, missing[0])
    if not found:
        raise DataError(
            f"'{where}' = '{spec}' matches no file; check the path and the brace range "
            "(e.g. /data/laion/{00000..00099}.tar) or run data_prep/img2dataset.sh first"
        )
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
    # Imported here: webdataset imports torch, and spec checks must fail fast without it.
    from webdataset.gopen import gopen, gopen_schemes

    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in gopen_schemes:
        return gopen(url, "rb")
    import fsspec  # only remote stores such as s3:// need it

    return fsspec.open(url, "rb").open()


def iter_shard_records(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield `(key, {extension: bytes})` for each sample of a tar shard, in tar order.

    Consecutive members with the same key form one record; extensions are lower-cased. Any read error
    (missing file, truncated or corrupt tar) propagates to the caller after the records read so far, and
    the record being assembled at that moment is dropped, since it may be missing members.
    """
    stream = open_shard(url)
    completed = False
    try:
        archive = tarfile.open(fileobj=stream, mode="r|*")
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
            members[extension] = archive.extractfile(info).read()
            # Stream mode keeps every TarInfo otherwise; a 10k-sample shard would hold them all.
            archive.members = []
        if members:
            yield key, members
        completed = True
    finally:
        try:
            stream.close()
        except Exception:
            # Closing a pipe that was abandoned part way reports its broken-pipe exit status; that is
            # expected then, and an error already propagating is the one worth reporting.
            if completed:
                raise
