"""Resumable, verified HTTP(S) downloads for the data-prep commands (model weights go through huggingface_hub).

`fetch(RemoteFile(url, size=..., sha256=..., md5=...), dest)`:
  - writes to `<dest>.part`; an interrupted transfer continues with a Range request on the next attempt or the
    next run, guarded by If-Range so that a file changed upstream is fetched whole rather than spliced;
  - retries connection errors, timeouts, truncated bodies, HTTP 408/425/429 and 5xx with exponential backoff;
  - checks the result against the published size and checksums when known; a file that fails is discarded and
    fetched again once from the start;
  - renames `.part` to `dest` only once verified, so an existing `dest` is always a complete file;
  - records url, size and sha256 in a `Manifest` (`manifest.json` in the download directory), which later runs
    use to re-verify files that have no published checksum.
Every failure raises `DownloadError` with one line that names the URL and what to do.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from pipeline.common.files import write_json_atomic

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
MAX_BACKOFF_S = 60.0
# Statuses worth another attempt: the server, or the path to it, may recover.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
USER_AGENT = "anymal-pipeline-prep/1"
DEFAULT_HINT = "check the URL, or point the base URL at a mirror"


class DownloadError(RuntimeError):
    """A download that cannot complete; the message is one line naming the URL and what to do."""


class _TransientError(Exception):
    """A failure worth retrying; the next attempt resumes from what is on disk."""


@dataclass(frozen=True)
class RemoteFile:
    url: str
    size: int | None = None  # bytes, when published
    sha256: str | None = None  # hex digest, when published
    md5: str | None = None  # hex digest, when published (COCO publishes md5)


class Manifest:
    """url, size and sha256 of every file fetched into a directory, kept as JSON beside the files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def key(self, file: Path) -> str:
        try:
            return file.resolve().relative_to(self.path.parent.resolve()).as_posix()
        except ValueError:
            return str(file.resolve())

    def get(self, file: Path) -> dict | None:
        return self.entries.get(self.key(file))

    def record(self, file: Path, **fields) -> None:
        self.entries[self.key(file)] = fields
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.entries, sort_keys=True)


def fetch(
    remote: RemoteFile,
    dest: str | Path,
    *,
    manifest: Manifest | None = None,
    attempts: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
    hint: str = DEFAULT_HINT,
) -> Path:
    """Download `remote` to `dest` (resuming, verifying, retrying) unless a verified copy is already there."""
    dest = Path(dest)
    recorded = manifest.get(dest) if manifest else None
    if dest.exists():
        problem, _ = _verify(dest, remote, recorded_sha256=(recorded or {}).get("sha256"))
        if problem is None:
            log.info("%s: already downloaded and verified", dest)
            return dest
        log.warning("%s: %s; downloading it again", dest, problem)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _check_free_space(remote, part)

    failures, fetched_again = 0, False
    while True:
        try:
            _transfer(remote, part, timeout_s, hint)
        except _TransientError as err:
            failures += 1
            if failures >= attempts:
                have = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f"cannot download {remote.url}: {err} ({attempts} attempts); re-run the same command to "
                    f"resume from byte {have}, or {hint}"
                ) from None
            delay_s = min(backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S)
            log.warning(
                "%s: %s; retrying in %.1f s (attempt %d of %d)", remote.url, err, delay_s, failures + 1, attempts
            )
            time.sleep(delay_s)
            continue
        problem, sha256 = _verify(part, remote, new_download=True)
        if problem is None:
            break
        _discard(part)
        if fetched_again:
            raise DownloadError(
                f"cannot download {remote.url}: {problem}, again after a fresh download; the server does not "
                f"serve the expected file: {hint}"
            )
        log.warning("%s: %s; discarding it and downloading again from the start", remote.url, problem)
        fetched_again = True

    os.replace(part, dest)
    _sidecar(part).unlink(missing_ok=True)
    if manifest:
        manifest.record(
            dest,
            url=remote.url,
            size=dest.stat().st_size,
            sha256=sha256,
            fetched_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
    return dest


def _transfer(remote: RemoteFile, part: Path, timeout_s: float, hint: str) -> None:
    """One attempt: continue `part` from its current length (or start it) until the server's body ends."""
    sidecar = _sidecar(part)
    state = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    offset = _resumable_offset(remote, part, state)
    if offset is None:
        return  # complete; verification decides whether it is right
    response = _open(remote, part, offset, state, timeout_s, hint)
    if response is None:
        return  # the part already holds the whole file
    with response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                _discard(part)
                raise _TransientError(f"server resumed at byte {start} instead of {offset}")
            mode = "ab"
        else:
            if offset:
                log.info(
                    "%s: server sent the whole file (changed upstream, or no range support); starting over", remote.url
                )
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
            etag, modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
            # Weak ETags are not allowed in If-Range.
            validator = etag if etag and not etag.startswith("W/") else modified
            sidecar.write_text(json.dumps({"url": remote.url, "validator": validator}))
        if remote.size is not None and total is not None and total != remote.size:
            raise DownloadError(
                f"cannot download {remote.url}: the server reports {total} bytes but {remote.size} are expected; {hint}"
            )
        received = _receive(response, part, mode, offset, total)
    if total is not None and received < total:
        raise _TransientError(f"connection closed after {received} of {total} bytes")


def _resumable_offset(remote: RemoteFile, part: Path, state: dict) -> int | None:
    """Where to continue `part`: its length, 0 when its bytes cannot be continued, None when it is complete."""
    offset = part.stat().st_size if part.exists() else 0
    if offset and state.get("url") != remote.url:
        # Bytes from another URL (a changed base URL or mirror) must not be continued.
        _discard(part)
        offset = 0
    if remote.size is not None and offset >= remote.size:
        if offset == remote.size:
            return None
        _discard(part)
        offset = 0
    return offset


def _open(remote: RemoteFile, part: Path, offset: int, state: dict, timeout_s: float, hint: str):
    """The server's response from byte `offset`, or None when it says the part is already whole."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if state.get("validator"):
            # The server sends the whole file instead of a range if it changed since the part was started.
            headers["If-Range"] = state["validator"]
    try:
        return urllib.request.urlopen(urllib.request.Request(remote.url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            if _content_range(err.headers.get("Content-Range"))[1] == offset:
                return None
            _discard(part)
            raise _TransientError(f"server refused to resume at byte {offset}") from None
        if err.code in RETRYABLE_STATUS:
            raise _TransientError(f"HTTP {err.code} {err.reason}") from None
        raise DownloadError(
            f"cannot download {remote.url}: HTTP {err.code} {err.reason}; {_advice(err.code, hint)}"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise _TransientError(_reason(err)) from None


def _receive(response, part: Path, mode: str, offset: int, total: int | None) -> int:
    """Append (or write) the response body to `part`; returns the bytes the part holds then."""
    received = offset
    with (
        part.open(mode) as out,
        tqdm(
            total=total,
            initial=offset,
            desc=part.name[: -len(".part")],
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            mininterval=1.0,
        ) as bar,
    ):
        try:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            raise _TransientError(f"connection lost after {received} bytes ({_reason(err)})") from None
    return received


def _verify(
    path: Path, remote: RemoteFile, recorded_sha256: str | None = None, new_download: bool = False
) -> tuple[str | None, str | None]:
    """(problem or None, sha256 or None): size first, then the published checksums or the recorded sha256."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"{size} bytes, expected {remote.size}", None
    expected = {"sha256": remote.sha256 or recorded_sha256, "md5": remote.md5}
    if not new_download and not any(expected.values()):
        return None, None
    digests = _digests(path, with_md5=remote.md5 is not None)
    for name, want in expected.items():
        if want and digests[name] != want.lower():
            return f"{name} {digests[name]}, expected {want}", digests["sha256"]
    return None, digests["sha256"]


def _digests(path: Path, with_md5: bool) -> dict[str, str]:
    hashes = {"sha256": hashlib.sha256()}
    if with_md5:
        hashes["md5"] = hashlib.md5(usedforsecurity=False)
    with (
        path.open("rb") as source,
        tqdm(
            total=path.stat().st_size,
            desc=f"verify {path.name}",
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            mininterval=1.0,
            leave=False,
        ) as bar,
    ):
        while chunk := source.read(CHUNK_BYTES):
            for digest in hashes.values():
                digest.update(chunk)
            bar.update(len(chunk))
    return {name: digest.hexdigest() for name, digest in hashes.items()}


def _check_free_space(remote: RemoteFile, part: Path) -> None:
    if remote.size is None:
        return
    needed = remote.size - (part.stat().st_size if part.exists() else 0)
    free = shutil.disk_usage(part.parent).free
    if needed > free:
        raise DownloadError(
            f"cannot download {remote.url}: it needs {needed / 1e9:.1f} GB more in {part.parent} but only "
            f"{free / 1e9:.1f} GB are free; free some space or choose another directory"
        )


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(start, total) from 'bytes START-END/TOTAL' or 'bytes */TOTAL'; None where absent or '*'."""
    if not header or not header.startswith("bytes "):
        return None, None
    span, _, total = header[len("bytes ") :].partition("/")
    start = span.split("-", 1)[0]
    return (int(start) if start.isdigit() else None), (int(total) if total.isdigit() else None)


def _advice(status: int, hint: str) -> str:
    if status in (404, 410):
        return f"the file is not at that address: {hint}"
    if status in (401, 403):
        return f"the server refused access: {hint}"
    return hint


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    return " ".join(str(reason).split()) or type(err).__name__


def _sidecar(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _sidecar(part).unlink(missing_ok=True)
