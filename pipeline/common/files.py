"""Files that readers never see half-written, and content hashes.

A run's outputs are read while they are written (a requeued job resumes, a rerun skips finished parts, a shell script
polls for a URL): each is written to a temporary file in the same directory and renamed over the target, which is
atomic on POSIX file systems.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` through a temporary file in `path`'s directory, then rename it to `path`."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    # A unique temporary name: ranks on different nodes of a shared file system may have the same process id.
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, value, *, indent: int = 2, sort_keys: bool = False) -> None:
    write_text_atomic(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n")


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
