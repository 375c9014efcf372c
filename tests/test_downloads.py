"""Each downloader resumes, verifies and fails with one line, against a loopback server that injects faults.

The server honours Range / If-Range like a real one and, on request, drops a connection mid-body, corrupts the
body, or answers 404 / 500; a fake Hub stands in for huggingface.co. Every test runs under the network guard
(tests/network_guard), which refuses and records any non-loopback connection, so no test can reach a real host.
"""

import functools
import hashlib
import importlib.util
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import zipfile
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.prep import laion, llava_coco, weights
from pipeline.prep.download import DownloadError, Manifest, RemoteFile, fetch

ROOT = Path(__file__).resolve().parents[1]
GUARD_DIR = Path(__file__).parent / "network_guard"


def load_guard():
    spec = importlib.util.spec_from_file_location("network_guard", GUARD_DIR / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """No test here may reach anything but 127.0.0.1: the guard refuses it, and the test fails on the record."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    guard = load_guard()
    guard.install()
    yield
    refused = list(guard.attempts)
    guard.uninstall()
    assert refused == [], f"non-loopback network attempts: {refused}"


class Loopback:
    """A threaded HTTP server on 127.0.0.1 whose handler gets this object as `state`; records every request."""

    def __init__(self, handler_class):
        self.requests: list[dict] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler_class, self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    def __init__(self, state, *args):
        self.state = state
        super().__init__(*args)

    def log_message(self, *args):
        pass


class FileServer(Loopback):
    """Serves `files` by path with Range / If-Range; `faults[path]` is a queue of faults for the next requests:
    "404", "500", "corrupt" (one byte of the body flipped) or "drop:N" (the connection closes after N body bytes).
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = defaultdict(list)
        super().__init__(_FileHandler)

    def url(self, path: str) -> str:
        return self.base_url + path

    def body_bytes(self, path: str) -> int:
        return sum(r["body_bytes"] for r in self.requests if r["path"] == path)


class _FileHandler(_Handler):
    def do_GET(self):
        path = urlsplit(self.path).path
        record = {
            "path": path,
            "range": self.headers.get("Range"),
            "if_range": self.headers.get("If-Range"),
            "status": None,
            "body_bytes": 0,
        }
        self.state.requests.append(record)
        fault = self.state.faults[path].pop(0) if self.state.faults[path] else None
        data = self.state.files.get(path)
        if fault in ("404", "500") or data is None:
            record["status"] = int(fault or 404)
            self.send_error(record["status"])
            return
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        start, status = 0, 200
        if record["range"] and record["if_range"] in (None, etag):
            start = int(record["range"].removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                record["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        if fault == "corrupt":
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        record["status"] = status
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if fault and fault.startswith("drop:"):
            body = body[: int(fault.split(":")[1])]
            self.close_connection = True
        self.wfile.write(body)
        self.wfile.flush()
        record["body_bytes"] = len(body)


@pytest.fixture
def server():
    files = FileServer()
    yield files
    files.close()


def payload(n_bytes: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n_bytes)


def one_line(message: str) -> bool:
    return "\n" not in message.strip()


# --- the shared downloader -------------------------------------------------------------------------------------


def test_interrupted_transfer_resumes_on_the_next_run(server, tmp_path):
    data = payload(3_000_000)
    server.files["/big.bin"] = data
    server.faults["/big.bin"] = ["drop:1000000"]
    remote = RemoteFile(server.url("/big.bin"), size=len(data), sha256=hashlib.sha256(data).hexdigest())
    dest = tmp_path / "big.bin"

    with pytest.raises(DownloadError) as failure:
        fetch(remote, dest, attempts=1)
    message = str(failure.value)
    assert one_line(message) and remote.url in message
    assert "re-run the same command to resume from byte 1000000" in message
    assert not dest.exists() and (tmp_path / "big.bin.part").stat().st_size == 1_000_000

    manifest = Manifest(tmp_path / "manifest.json")
    fetch(remote, dest, attempts=1, manifest=manifest)
    second = server.requests[1]
    assert second["range"] == "bytes=1000000-" and second["if_range"] and second["status"] == 206
    assert second["body_bytes"] == len(data) - 1_000_000
    assert dest.read_bytes() == data and not (tmp_path / "big.bin.part").exists()
    assert manifest.get(dest)["sha256"] == remote.sha256
    assert Manifest(tmp_path / "manifest.json").get(dest)["size"] == len(data)


def test_retries_resume_within_one_run_and_no_byte_is_sent_twice(server, tmp_path):
    data = payload(2_000_000, seed=1)
    server.files["/f.bin"] = data
    server.faults["/f.bin"] = ["drop:500000", "500"]
    dest = fetch(RemoteFile(server.url("/f.bin"), size=len(data)), tmp_path / "f.bin", attempts=3, backoff_s=0)
    assert [r["status"] for r in server.requests] == [200, 500, 206]
    assert [r["range"] for r in server.requests] == [None, "bytes=500000-", "bytes=500000-"]
    assert server.body_bytes("/f.bin") == len(data)
    assert dest.read_bytes() == data


def test_a_file_changed_upstream_is_fetched_whole_not_spliced(server, tmp_path):
    server.files["/f.bin"] = payload(1_000_000, seed=2)
    server.faults["/f.bin"] = ["drop:400000"]
    remote = RemoteFile(server.url("/f.bin"))  # nothing published: only If-Range can tell
    with pytest.raises(DownloadError):
        fetch(remote, tmp_path / "f.bin", attempts=1)
    server.files["/f.bin"] = new = payload(1_000_000, seed=3)
    fetch(remote, tmp_path / "f.bin", attempts=1)
    assert server.requests[1]["if_range"] and server.requests[1]["status"] == 200
    assert (tmp_path / "f.bin").read_bytes() == new


@pytest.mark.parametrize("checksum", ["sha256", "md5"])
def test_a_corrupted_download_is_detected_and_fetched_again(server, tmp_path, checksum):
    data = payload(300_000, seed=4)
    server.files["/f.bin"] = data
    server.faults["/f.bin"] = ["corrupt"]
    digest = getattr(hashlib, checksum)(data).hexdigest()
    remote = RemoteFile(server.url("/f.bin"), size=len(data), **{checksum: digest})
    fetch(remote, tmp_path / "f.bin", attempts=1)
    assert [(r["range"], r["status"]) for r in server.requests] == [(None, 200), (None, 200)]
    assert (tmp_path / "f.bin").read_bytes() == data


def test_a_file_corrupted_on_disk_is_caught_by_the_recorded_sha256(server, tmp_path):
    data = payload(200_000, seed=5)
    server.files["/f.bin"] = data
    remote = RemoteFile(server.url("/f.bin"))  # no published checksum: the manifest's is used
    dest = fetch(remote, tmp_path / "f.bin", manifest=Manifest(tmp_path / "manifest.json"))
    fetch(remote, dest, manifest=Manifest(tmp_path / "manifest.json"))
    assert len(server.requests) == 1, "a verified file is not fetched again"
    damaged = bytearray(data)
    damaged[100] ^= 1
    dest.write_bytes(damaged)
    fetch(remote, dest, manifest=Manifest(tmp_path / "manifest.json"))
    assert len(server.requests) == 2 and dest.read_bytes() == data


def test_persistent_corruption_gives_one_line_error(server, tmp_path):
    data = payload(100_000, seed=6)
    server.files["/f.bin"] = data
    server.faults["/f.bin"] = ["corrupt", "corrupt"]
    remote = RemoteFile(server.url("/f.bin"), sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(DownloadError) as failure:
        fetch(remote, tmp_path / "f.bin", hint="pass --base-url for a mirror")
    message = str(failure.value)
    assert one_line(message) and remote.url in message and "sha256" in message and "--base-url" in message
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


@pytest.mark.parametrize("status, requests", [(404, 1), (500, 3)])
def test_http_errors_give_one_line_naming_the_url(server, tmp_path, status, requests):
    server.files["/f.bin"] = b"x" * 10
    server.faults["/f.bin"] = [str(status)] * 5
    url = server.url("/f.bin")
    with pytest.raises(DownloadError) as failure:
        fetch(RemoteFile(url), tmp_path / "f.bin", attempts=3, backoff_s=0, hint="check --base-url")
    message = str(failure.value)
    assert one_line(message) and url in message and f"HTTP {status}" in message and "check --base-url" in message
    assert len(server.requests) == requests  # 404 is final; 500 is retried


def test_unreachable_server_gives_one_line_error(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before the request: nothing listens there
    url = f"http://127.0.0.1:{port}/f.bin"
    with pytest.raises(DownloadError) as failure:
        fetch(RemoteFile(url), tmp_path / "f.bin", attempts=2, backoff_s=0)
    assert one_line(str(failure.value)) and url in str(failure.value) and "refused" in str(failure.value)


# --- LAION ---------------------------------------------------------------------------------------------------------


def laion400m_part() -> tuple[pa.Table, set[int]]:
    rows = [  # (SAMPLE_ID, URL, TEXT, WIDTH, HEIGHT, NSFW), kept?
        ((1, "https://a.example/1.jpg", "a dog on a beach", 640, 480, "UNLIKELY"), True),
        ((2, "https://a.example/2.jpg", "hi", 640, 480, "UNLIKELY"), False),  # caption too short
        ((3, "https://a.example/3.jpg", "   ok    ", 640, 480, "UNLIKELY"), False),  # short once trimmed
        ((4, "https://a.example/4.jpg", "a small picture", 100, 300, "UNLIKELY"), False),  # shorter side < 224
        ((5, "https://a.example/5.jpg", "a wide banner", 1200, 300, "UNLIKELY"), False),  # aspect 4 > 3
        ((6, "https://a.example/6.jpg", "a tagged picture", 640, 480, "NSFW"), False),
        ((7, "https://a.example/7.jpg", "an unsure picture", 640, 480, "UNSURE"), False),
        ((8, "https://a.example/8.jpg", "no size known", None, 480, "UNLIKELY"), False),  # missing value fails
        ((9, "ftp://a.example/9.jpg", "not over http", 640, 480, "UNLIKELY"), False),
        ((10, "HTTP://a.example/10.jpg", "lower-case tag", 640, 480, "unlikely"), True),
        ((11, "https://a.example/11.jpg", "x" * 600, 640, 480, "UNLIKELY"), False),  # caption too long
        ((12, "https://a.example/12.jpg", "a cat", 224, 672, "UNLIKELY"), True),  # every limit exactly met
        ((13, "https://a.example/13.jpg", "no tag", 640, 480, None), False),
    ]
    columns = list(zip(*[row for row, _ in rows], strict=True))
    table = pa.table(
        {
            "SAMPLE_ID": pa.array(columns[0], pa.int64()),
            "URL": columns[1],
            "TEXT": columns[2],
            "WIDTH": pa.array(columns[3], pa.int32()),
            "HEIGHT": pa.array(columns[4], pa.int32()),
            "LICENSE": ["?"] * len(rows),
            "NSFW": columns[5],
            "similarity": [0.35] * len(rows),
        }
    )
    return table, {row[0] for row, kept in rows if kept}


def laion5b_part(first_id: int) -> pa.Table:
    """LAION-5B-style columns under other spellings; per part: kept, kept, punsafe null, unsafe, watermark, kept."""
    punsafe = [0.01, 0.05, None, 0.6, 0.02, 0.0]
    pwatermark = [0.1, 0.2, 0.1, 0.1, 0.9, 0.5]
    ids = list(range(first_id, first_id + 6))
    return pa.table(
        {
            "url": [f"https://b.example/{i}.jpg" for i in ids],
            "caption": [f"picture number {i}" for i in ids],
            "width": pa.array([512.0] * 6),
            "height": pa.array([512.0] * 6),
            "hash": pa.array(ids, pa.int64()),
            "punsafe": pa.array(punsafe, pa.float32()),
            "pwatermark": pa.array(pwatermark, pa.float32()),
        }
    )


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=4)  # several batches per part
    return buffer.getvalue()


def test_laion_filter_keeps_exactly_the_right_rows(server, tmp_path, capsys):
    table, expected = laion400m_part()
    name = laion.LAION400M_PART.format(index=0)
    server.files[f"/meta/{name}"] = parquet_bytes(table)
    server.faults[f"/meta/{name}"] = ["drop:700"]  # the part download resumes too
    code = laion.main(
        ["--out-dir", str(tmp_path), "--base-url", server.url("/meta"), "--parts", "0", "--attempts", "2"]
    )
    assert code == 0
    kept = pq.read_table(tmp_path / "laion_filtered.parquet")
    assert set(kept["SAMPLE_ID"].to_pylist()) == expected
    assert kept.column_names[:3] == ["SAMPLE_ID", "URL", "TEXT"]
    stats = json.loads((tmp_path / "laion_filtered.stats.json").read_text())
    assert stats["rows_read"] == 13 and stats["rows_kept"] == 3
    assert stats["failed"] == {"url": 1, "caption": 3, "image_size": 3, "nsfw": 3}
    assert stats["filters_off"][name] == ["punsafe", "pwatermark"]
    assert server.requests[1]["range"] == "bytes=700-"
    printed = capsys.readouterr().out
    assert "--url-col URL --caption-col TEXT --extra-columns SAMPLE_ID,similarity,NSFW,LICENSE" in printed


def test_laion_max_samples_spans_parts_and_stops_fetching(server, tmp_path):
    names = [f"part-{i}.parquet" for i in range(3)]
    for i, name in enumerate(names):
        server.files[f"/5b/{name}"] = parquet_bytes(laion5b_part(first_id=100 * (i + 1)))
    code = laion.main(
        ["--out-dir", str(tmp_path), "--base-url", server.url("/5b"), "--files", *names, "--max-samples", "4"]
    )
    assert code == 0
    kept = pq.read_table(tmp_path / "laion_filtered.parquet")
    # per part rows 0, 1 and 5 pass (null punsafe, punsafe 0.6 and pwatermark 0.9 fail): 100, 101, 105, then 200.
    assert kept["hash"].to_pylist() == [100, 101, 105, 200]
    assert kept["URL"].to_pylist()[0] == "https://b.example/100.jpg" and "TEXT" in kept.column_names
    assert {r["path"] for r in server.requests} == {"/5b/part-0.parquet", "/5b/part-1.parquet"}


def test_laion_missing_part_gives_one_line_error(server, tmp_path, capsys):
    code = laion.main(["--out-dir", str(tmp_path), "--base-url", server.url("/nowhere"), "--parts", "3"])
    error = capsys.readouterr().err.strip()
    assert code == 1 and one_line(error) and server.url("/nowhere/part-00003-") in error and "HTTP 404" in error


# --- LLaVA-Instruct and COCO ----------------------------------------------------------------------------------------


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as bundle:  # stored: a flipped byte breaks a CRC
        for name, data in members.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def coco_standins(server):
    """Stand-ins for every published file, and a catalogue whose sizes and checksums are theirs."""
    served = {
        "/llava/llava_instruct_150k.json": json.dumps([{"id": "1", "image": "000000000009.jpg"}]).encode(),
        "/coco/train2017.zip": zip_bytes({f"train2017/{i:012d}.jpg": payload(50_000, i) for i in (9, 25, 30)}),
        "/coco/val2014.zip": zip_bytes({"val2014/COCO_val2014_000000000042.jpg": payload(40_000, 42)}),
        "/karpathy/caption_datasets.zip": zip_bytes(
            {"dataset_coco.json": b'{"images": []}' + b" " * 20_000, "dataset_flickr8k.json": b"{}"}
        ),
        "/vqa/v2_Questions_Val_mscoco.zip": zip_bytes({"v2_OpenEnded_mscoco_val2014_questions.json": b"{}"}),
        "/vqa/v2_Annotations_Val_mscoco.zip": zip_bytes({"v2_mscoco_val2014_annotations.json": b"{}"}),
    }
    server.files.update(served)
    catalogue = {}
    for name, assets in llava_coco.DATASETS.items():
        standins = []
        for asset in assets:
            data = served[f"/{asset.source}/{asset.filename}"]
            standins.append(
                llava_coco.Asset(
                    asset.source,
                    asset.filename,
                    asset.outputs,
                    size=len(data) if asset.size else None,
                    md5=hashlib.md5(data).hexdigest() if asset.md5 else None,
                    sha256=hashlib.sha256(data).hexdigest() if asset.sha256 else None,
                    files_in_folder={"train2017.zip": 3, "val2014.zip": 1}.get(asset.filename),
                )
            )
        catalogue[name] = tuple(standins)
    base_urls = {key: server.url(f"/{key}") for key in llava_coco.BASE_URLS}
    return catalogue, base_urls


def test_llava_coco_builds_the_layout_through_faults_and_resumes(server, coco_standins, tmp_path):
    catalogue, base_urls = coco_standins
    server.faults["/coco/train2017.zip"] = ["drop:60000"]
    server.faults["/coco/val2014.zip"] = ["corrupt"]
    server.faults["/karpathy/caption_datasets.zip"] = ["corrupt"]  # no checksum: the zip CRC catches it
    llava_coco.prepare(tmp_path, list(catalogue), base_urls, attempts=2, backoff_s=0, datasets=catalogue)

    assert sorted(p.name for p in (tmp_path / "coco/train2017").iterdir()) == [
        "000000000009.jpg",
        "000000000025.jpg",
        "000000000030.jpg",
    ]
    assert (tmp_path / "coco/train2017/000000000025.jpg").read_bytes() == payload(50_000, 25)
    assert (tmp_path / "coco/val2014/COCO_val2014_000000000042.jpg").read_bytes() == payload(40_000, 42)
    assert (tmp_path / "coco/karpathy/dataset_coco.json").read_bytes().startswith(b'{"images": []}')
    assert not (tmp_path / "coco/karpathy/dataset_flickr8k.json").exists()
    for path in (
        "llava/llava_instruct_150k.json",
        "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
        "vqav2/v2_mscoco_val2014_annotations.json",
    ):
        assert (tmp_path / path).is_file(), path
    assert list((tmp_path / "downloads").iterdir()) == [], "archives are deleted once extracted"
    train = [r for r in server.requests if r["path"] == "/coco/train2017.zip"]
    assert [r["range"] for r in train] == [None, "bytes=60000-"]
    assert len([r for r in server.requests if r["path"] == "/coco/val2014.zip"]) == 2
    assert len([r for r in server.requests if r["path"] == "/karpathy/caption_datasets.zip"]) == 2
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["downloads/train2017.zip"]["sha256"] == catalogue["coco_train2017"][0].sha256
    assert len(manifest["llava/llava_instruct_150k.json"]["sha256"]) == 64

    before = len(server.requests)
    llava_coco.prepare(tmp_path, list(catalogue), base_urls, datasets=catalogue)
    assert len(server.requests) == before, "a complete layout is not downloaded again"


def test_llava_coco_cli_errors_are_one_line(server, coco_standins, tmp_path, capsys):
    _, base_urls = coco_standins
    # The real catalogue knows LLaVA-Instruct-150K's size; the stand-in has another.
    code = llava_coco.main(
        ["--root", str(tmp_path), "--only", "llava_instruct", "--base-url", f"llava={base_urls['llava']}"]
    )
    error = capsys.readouterr().err.strip()
    assert code == 1 and one_line(error) and "llava_instruct_150k.json" in error and "228941895" in error
    code = llava_coco.main(
        ["--root", str(tmp_path), "--only", "vqav2", "--base-url", f"vqa={server.url('/gone')}", "--attempts", "1"]
    )
    error = capsys.readouterr().err.strip()
    assert code == 1 and one_line(error) and server.url("/gone/v2_Questions_Val_mscoco.zip") in error
    assert "HTTP 404" in error and "--base-url vqa=URL" in error


# --- model weights through a fake Hub ------------------------------------------------------------------------------


class FakeHub(Loopback):
    """The few Hub routes snapshot_download uses, with gated repos: `tokens` maps a token to the repos it may read.

    A repo is {"sha", "gated", "files": {name: bytes}} with optionally "sizes": {name: bytes the Hub reports instead
    of the body's length} and "sizes_reported": False for a server whose model_info omits sizes.
    """

    def __init__(self, repos: dict[str, dict], tokens: dict[str, set[str]]):
        self.repos, self.tokens = repos, tokens
        super().__init__(_HubHandler)


class _HubHandler(_Handler):
    def do_HEAD(self):
        self.do_GET(body=False)

    def do_GET(self, body=True):
        hub = self.state
        path = unquote(urlsplit(self.path).path)
        auth = self.headers.get("Authorization")
        token = auth.removeprefix("Bearer ") if auth else None
        query = parse_qs(urlsplit(self.path).query)
        hub.requests.append({"method": self.command, "path": path, "token": token})
        if token is not None and token not in hub.tokens:
            return self.reply(
                401,
                {"error": "Invalid credentials in Authorization header"},
                message="Invalid credentials in Authorization header",
            )
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(/revision/.+)?", path):
            repo = hub.repos.get(match[1])
            if repo is None:
                return self.reply(404, {"error": "Repository not found"}, code="RepoNotFound")
            with_sizes = query.get("blobs", [""])[0].lower() == "true" and repo.get("sizes_reported", True)
            return self.reply(
                200,
                {
                    "id": match[1],
                    "modelId": match[1],
                    "sha": repo["sha"],
                    "private": False,
                    "gated": "manual" if repo["gated"] else False,
                    "siblings": [
                        hub_sibling(repo, name) if with_sizes else {"rfilename": name} for name in repo["files"]
                    ],
                },
            )
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            files = hub.repos[match[1]]["files"]
            return self.reply(
                200,
                [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in files.items()
                ],
            )
        if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo = hub.repos[match[1]]
            if repo["gated"] and match[1] not in hub.tokens.get(token, set()):
                return self.reply(
                    401 if token is None else 403, {"error": "Access to this model is restricted"}, code="GatedRepo"
                )
            data = repo["files"][match[3]]
            self.send_response(200)
            self.send_header("X-Repo-Commit", repo["sha"])
            self.send_header("ETag", '"' + hashlib.sha1(data).hexdigest() + '"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)
            return None
        return self.reply(404, {"error": "not found"})

    def reply(self, status, document, code=None, message=None):
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code:
            self.send_header("X-Error-Code", code)
        if message:
            self.send_header("X-Error-Message", message)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def hub_sibling(repo: dict, name: str) -> dict:
    """A file as model_info(files_metadata=True) lists it: size and blob id, and lfs.size for LFS files."""
    data = repo["files"][name]
    size = repo.get("sizes", {}).get(name, len(data))
    sibling = {"rfilename": name, "size": size, "blobId": hashlib.sha1(data).hexdigest()}
    if name.endswith((".safetensors", ".bin", ".pth")):  # stored in LFS by the Hub's default .gitattributes
        sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": size, "pointerSize": 134}
    return sibling


CLIP_ID, LLAMA_ID, OTHER_GATED_ID = "openai/clip-vit-large-patch14", "meta-llama/Meta-Llama-3-8B-Instruct", "acme/x"
LLAMA_70B_ID, UNSIZED_ID = "meta-llama/Meta-Llama-3-70B-Instruct", "acme/unsized"
SHARDS_70B = [f"model-{index:05d}-of-00030.safetensors" for index in range(1, 31)]
SHARD_70B_BYTES = 4_703_000_000  # 30 of them make 131.4 GiB, close to the real repository's safetensors


@pytest.fixture(scope="module")
def fake_hub(tiny_models):
    def repo(folder: Path, gated: bool, extra: dict[str, bytes]) -> dict:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return {"sha": hashlib.sha1(str(folder).encode()).hexdigest(), "gated": gated, "files": {**files, **extra}}

    duplicates = {"pytorch_model.bin": b"same weights, other format", "original/consolidated.00.pth": b"meta"}
    # The 70B reports its real shard sizes (and Meta's 8 x 17.6 GB original/ checkpoint, which is not fetched) but
    # serves empty bodies: its tests must stop before any download.
    llama_70b = repo(tiny_models / "llm", True, {name: b"" for name in SHARDS_70B})
    del llama_70b["files"]["model.safetensors"]
    originals = {f"original/consolidated.{index:02d}.pth": 17_600_000_000 for index in range(8)}
    llama_70b["files"].update(dict.fromkeys(originals, b""))
    llama_70b["sizes"] = {**dict.fromkeys(SHARDS_70B, SHARD_70B_BYTES), **originals}
    hub = FakeHub(
        repos={
            CLIP_ID: repo(tiny_models / "clip", False, {"pytorch_model.bin": b"duplicate"}),
            LLAMA_ID: repo(tiny_models / "llm", True, duplicates),
            OTHER_GATED_ID: repo(tiny_models / "clip", True, {}),
            LLAMA_70B_ID: llama_70b,
            UNSIZED_ID: {**repo(tiny_models / "clip", False, {}), "sizes_reported": False},
        },
        tokens={"hf_approved": {LLAMA_ID, OTHER_GATED_ID, LLAMA_70B_ID}, "hf_not_approved": set()},
    )
    yield hub
    hub.close()


# The prefetcher's module run as __main__ in an interpreter where every filesystem reports {free} bytes free.
WITH_FREE_BYTES = """
import collections, runpy, shutil
Usage = collections.namedtuple("Usage", "total used free")
shutil.disk_usage = lambda path: Usage({free}, 0, {free})
runpy.run_module("pipeline.prep.weights", run_name="__main__", alter_sys=True)
"""


def run_weights(
    args: list[str],
    tmp_path: Path,
    endpoint: str,
    token: str | None = None,
    free_bytes: int | None = None,
    **extra_env: str,
):
    """`python -m pipeline.prep.weights` in a fresh interpreter, network-guarded, with no saved token; `free_bytes`
    makes the disks look that full."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE")
    }
    guard_log = tmp_path / "guard.jsonl"
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf_home"),
        NETWORK_GUARD_LOG=str(guard_log),
        PYTHONPATH=os.pathsep.join([str(GUARD_DIR), str(ROOT)]),
        no_proxy="127.0.0.1,localhost",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    if token:
        env["HF_TOKEN"] = token
    env.update(extra_env)
    module = ["-m", "pipeline.prep.weights"] if free_bytes is None else ["-c", WITH_FREE_BYTES.format(free=free_bytes)]
    proc = subprocess.run(
        [sys.executable, *module, "--out-dir", str(tmp_path / "weights"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert not guard_log.exists(), guard_log.read_text()
    assert Path(f"{guard_log}.installed").is_file(), "the guard ran in the prefetcher"
    return proc


def test_weights_prefetch_from_a_config_then_offline(fake_hub, tmp_path):
    from pipeline.prep.offline import enforce_offline

    proc = run_weights(["--config", "configs/stage1_8b.yaml"], tmp_path, fake_hub.base_url, token="hf_approved")
    assert proc.returncode == 0, proc.stderr[-3000:]
    clip, llm = tmp_path / "weights" / CLIP_ID, tmp_path / "weights" / LLAMA_ID
    assert (clip / "config.json").is_file() and (llm / "model.safetensors").is_file()
    assert (llm / "model.safetensors").read_bytes() == fake_hub.repos[LLAMA_ID]["files"]["model.safetensors"]
    assert (
        not (llm / "original").exists()
        and not (llm / "pytorch_model.bin").exists()
        and not (clip / "pytorch_model.bin").exists()
    ), "duplicate formats are skipped"
    assert json.loads((llm / "prefetch.json").read_text())["commit"] == fake_hub.repos[LLAMA_ID]["sha"]
    assert f"{LLAMA_ID}: 6 files, 0.0 GiB to fetch; " in proc.stderr, "the Hub's sizes went through the space check"
    assert f"model.vision.model={clip} model.llm.model={llm}" in proc.stdout
    saved = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    try:
        assert enforce_offline([str(clip), str(llm)])
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


@pytest.mark.parametrize(
    "repo_id, token, expected, requests",
    [
        (LLAMA_ID, None, "is gated and no Hugging Face token is set: accept its licence at", 0),
        (OTHER_GATED_ID, None, "is gated and no Hugging Face token is set: accept its licence at", 1),
        (LLAMA_ID, "hf_revoked", "rejected the token from HF_TOKEN: it is invalid or expired", 1),
        (LLAMA_ID, "hf_not_approved", "has no access yet: accept the licence at", None),
    ],
)
def test_weights_access_errors_are_one_line(fake_hub, tmp_path, repo_id, token, expected, requests):
    start = len(fake_hub.requests)
    proc = run_weights([repo_id], tmp_path, fake_hub.base_url, token=token)
    error = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and error.startswith("error: ") and expected in error, proc.stderr[-2000:]
    assert f"{fake_hub.base_url}/{repo_id}" in error or "settings/tokens" in error
    if requests is not None:
        assert len(fake_hub.requests) - start == requests
    assert not (tmp_path / "weights" / repo_id / "config.json").exists()


def test_weights_unreachable_hub_and_offline_env_are_one_line(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    proc = run_weights([CLIP_ID], tmp_path, closed)
    error = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and f"error: cannot reach {closed} to fetch {CLIP_ID}" in error, proc.stderr[-2000:]
    proc = run_weights([CLIP_ID], tmp_path, closed, HF_HUB_OFFLINE="1")
    assert proc.returncode == 2 and "HF_HUB_OFFLINE is set" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("complete_shards, needed, free_gib", [(0, "131.4 GiB", 100), (20, "43.8 GiB", 40)])
def test_weights_that_do_not_fit_fail_before_downloading(fake_hub, tmp_path, complete_shards, needed, free_gib):
    target = tmp_path / "weights" / LLAMA_70B_ID
    target.mkdir(parents=True)
    for name in SHARDS_70B[:complete_shards]:  # a resumed fetch: these are kept, the next one is partial
        with open(target / name, "wb") as sparse:
            sparse.truncate(SHARD_70B_BYTES)
    (target / SHARDS_70B[complete_shards]).write_bytes(b"partial")
    small = [name for name in fake_hub.repos[LLAMA_70B_ID]["files"] if name.endswith((".json", ".jinja"))]
    start = len(fake_hub.requests)
    proc = run_weights([LLAMA_70B_ID], tmp_path, fake_hub.base_url, token="hf_approved", free_bytes=free_gib * 2**30)
    error = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert error == (
        f"error: {LLAMA_70B_ID} needs {needed} (+1 GiB spare) for {30 - complete_shards + len(small)} files in "
        f"{target}, but its filesystem has {free_gib:.1f} GiB free: free space there or choose another --out-dir"
    )
    assert [r["path"] for r in fake_hub.requests[start:]] == [f"/api/models/{LLAMA_70B_ID}"], "nothing downloaded"
    assert sorted(p.name for p in target.iterdir()) == SHARDS_70B[: complete_shards + 1]


def test_weights_space_check_counts_only_files_still_missing(fake_hub, tmp_path):
    proc = run_weights([CLIP_ID], tmp_path, fake_hub.base_url, free_bytes=2**30)
    error = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and error.startswith(f"error: {CLIP_ID} needs 0.0 GiB (+1 GiB spare)"), error
    assert not (tmp_path / "weights" / CLIP_ID).exists()
    assert run_weights([CLIP_ID], tmp_path, fake_hub.base_url).returncode == 0
    proc = run_weights([CLIP_ID], tmp_path, fake_hub.base_url, free_bytes=0)
    assert proc.returncode == 0 and "GiB to fetch" not in proc.stderr, proc.stderr[-3000:]


def test_weights_without_sizes_from_the_hub_skip_the_space_check(fake_hub, tmp_path):
    proc = run_weights([UNSIZED_ID], tmp_path, fake_hub.base_url, free_bytes=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{UNSIZED_ID}: the Hub reported no file sizes; skipping the free-space check" in proc.stderr
    assert (tmp_path / "weights" / UNSIZED_ID / "config.json").is_file()


def test_free_space_is_that_of_the_nearest_existing_directory(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda path: asked.append(path) or SimpleNamespace(free=7))
    assert weights.free_bytes(tmp_path / "weights" / "meta-llama" / "Meta-Llama-3-70B-Instruct") == 7
    assert asked == [tmp_path]


@pytest.mark.slow
def test_laion_result_goes_through_img2dataset_into_shards(server, tmp_path, monkeypatch):
    import tarfile

    from PIL import Image

    table, expected = laion400m_part()
    urls = []
    for sample_id, url in zip(table["SAMPLE_ID"].to_pylist(), table["URL"].to_pylist(), strict=True):
        image = io.BytesIO()
        Image.new("RGB", (64, 48), (sample_id * 15, 80, 160)).save(image, "JPEG")
        server.files[f"/img/{sample_id}.jpg"] = image.getvalue()
        urls.append(server.url(f"/img/{sample_id}.jpg") if url.lower().startswith("http") else url)
    parquet = tmp_path / "meta.parquet"
    pq.write_table(table.set_column(1, "URL", pa.array(urls)), parquet)
    # img2dataset runs in other processes: guard them too, and give them the venv's executables.
    guard_log = tmp_path / "guard.jsonl"
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(GUARD_DIR), str(ROOT)]))
    monkeypatch.setenv("NETWORK_GUARD_LOG", str(guard_log))
    code = laion.main(
        [
            "--out-dir",
            str(tmp_path / "meta"),
            "--local",
            str(parquet),
            "--shards",
            str(tmp_path / "shards"),
            "--",
            "--processes",
            "1",
            "--threads",
            "4",
            "--image-size",
            "32",
        ]
    )
    assert code == 0
    assert not guard_log.exists(), guard_log.read_text()
    assert any("img2dataset" in " ".join(entry["argv"]) for entry in map(json.loads, open(f"{guard_log}.installed")))
    samples = {}
    for shard in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    record = json.load(tar.extractfile(member))
                    samples[record["SAMPLE_ID"]] = record
    assert set(samples) == expected
    assert all(record["status"] == "success" and record["NSFW"].upper() == "UNLIKELY" for record in samples.values())
    assert {r["path"] for r in server.requests} == {f"/img/{i}.jpg" for i in expected}
