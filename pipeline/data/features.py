"""Feature shards: cached vision-tower features of image shards, their format, and the decoder that trains from them.

A feature shard is a plain webdataset tar with the same samples, keys and order as the image shard it was made
from (`pipeline.prep.feature_cache` writes them). Each sample has three members:

    KEY.features.safetensors  one tensor "features", [tokens, width] ([257, 1024] for CLIP ViT-L/14 at 224 px,
                              [729, 1152] for SigLIP so400m/14 at 384 px), in the cache's dtype (float16 by
                              default; bfloat16; float32 for tests). A standard safetensors file, so any
                              safetensors reader loads it.
    KEY.txt                   the caption, byte for byte as in the image shard
    KEY.json                  the image shard's metadata plus a "feature_cache" entry: model, tower (family and
                              architecture), feature layer, tower dtype, dtype, shape and the image shard's name

The manifest record of each shard (`manifest/NAME.json` beside the shards) holds the same entry; training from
features checks the first sample's entry against its own tower before anything loads
(`pipeline.training.preflight`).

Tar headers carry no time, owner or host, so the same input gives the same bytes. `FeatureDecoder` is the
stage-1 decoder for `data.input: features`: it yields "image_features" where `CaptionDecoder` yields
"pixel_values", so the stream, skipping, resume and collate are the ones training from images uses.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import torch

from pipeline.common.dtypes import TORCH_DTYPES
from pipeline.data.captions import CaptionSampleDecoder
from pipeline.data.skips import SkipSample, describe_error

FEATURES_MEMBER = "features.safetensors"
FEATURES_TENSOR = "features"
STORAGE_DTYPES = TORCH_DTYPES
_SAFETENSORS_CODES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_DTYPES_BY_CODE = {code: dtype for dtype, code in _SAFETENSORS_CODES.items()}
_TAR_BLOCK = tarfile.BLOCKSIZE
_TAR_RECORD = tarfile.RECORDSIZE


def features_header(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """The safetensors prefix (length + JSON header) of a "features" tensor; its raw little-endian data follows."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    entry = {"dtype": _SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}
    header = json.dumps({FEATURES_TENSOR: entry}, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % 8)  # the format pads with spaces so the data starts 8-byte aligned
    return len(header).to_bytes(8, "little") + header


def decode_features(data: bytes) -> torch.Tensor:
    """The "features" tensor of a safetensors member, in its stored dtype; ValueError when malformed."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes is too short for a safetensors member")
    header_length = int.from_bytes(data[:8], "little")
    if 8 + header_length > len(data):
        raise ValueError(f"safetensors header of {header_length} bytes runs past the {len(data)}-byte member")
    try:
        entry = json.loads(data[8 : 8 + header_length])[FEATURES_TENSOR]
        dtype, shape = _DTYPES_BY_CODE[entry["dtype"]], tuple(int(n) for n in entry["shape"])
        start, end = (int(n) for n in entry["data_offsets"])
        if min(shape, default=0) < 0:
            raise ValueError(f"negative shape {list(shape)}")
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"bad safetensors header: {describe_error(error)}") from None
    base = 8 + header_length
    if end - start != torch.Size(shape).numel() * dtype.itemsize or base + end != len(data) or start != 0:
        raise ValueError(f"safetensors data of {len(data) - base} bytes does not hold {entry['dtype']} {list(shape)}")
    # bytearray: torch.frombuffer wants writable memory, and the copy frees the tar member's bytes.
    return torch.frombuffer(bytearray(memoryview(data)[base:]), dtype=dtype).reshape(shape)


def expected_feature_shape(vision_model: str) -> tuple[int, int]:
    """[tokens, width] of the hidden states a vision tower yields, read off the tower built from its config alone on
    the meta device (no weights): its position embeddings count the tokens, patches plus CLS where the family has
    one (CLIP ViT-L/14 at 224 px: [257, 1024]; SigLIP so400m/14 at 384 px: [729, 1152])."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(vision_model)
    config = getattr(config, "vision_config", None) or config
    with torch.device("meta"):
        tower = AutoModel.from_config(config)
    body = getattr(tower, "vision_model", tower)
    return (int(body.embeddings.num_positions), int(config.hidden_size))


class FeatureDecoder(CaptionSampleDecoder):
    """Cached features + caption -> {"key", "image_features": [tokens, width] (stored dtype), "caption_ids": [n]}.

    Features that do not parse, are not 2-D, differ from `expected_shape` (when given) or hold NaN or infinity
    are skipped as "corrupt_image": the image half of the sample is unusable, as with a corrupt JPEG.
    """

    image_members = (FEATURES_MEMBER,)

    def __init__(self, tokenizer_path: str, max_caption_tokens: int, expected_shape: tuple[int, int] | None = None):
        super().__init__(tokenizer_path, max_caption_tokens)
        self.expected_shape = tuple(expected_shape) if expected_shape is not None else None

    def decode_image(self, data: bytes) -> dict[str, torch.Tensor]:
        try:
            features = decode_features(data)
        except ValueError as error:
            raise SkipSample("corrupt_image", f"cached features: {error}") from None
        if features.ndim != 2 or (self.expected_shape is not None and tuple(features.shape) != self.expected_shape):
            expected = list(self.expected_shape) if self.expected_shape else "[tokens, width]"
            raise SkipSample("corrupt_image", f"cached features of shape {list(features.shape)}, expected {expected}")
        if not torch.isfinite(features).all():
            raise SkipSample("corrupt_image", "cached features hold NaN or infinity")
        return {"image_features": features}


class FeatureShardWriter:
    """Writes one feature shard under `path + ".tmp"`, hashing as it goes; `close()` renames it to `path`.

    Members are written directly (header, data, padding) rather than through `tarfile`, so the features go from
    their buffer to the file without a copy and a sample costs three writes: at ~2,500 samples/s per GPU the
    Python time per sample decides whether the writers keep up.
    """

    def __init__(self, path: str):
        self.path = path
        self.temporary_path = path + ".tmp"
        self._file = open(self.temporary_path, "wb")  # closed by close() or abandon()
        self._sha256 = hashlib.sha256()
        self.bytes = 0
        self.samples = 0

    def _write(self, data) -> None:
        self._file.write(data)
        self._sha256.update(data)
        self.bytes += memoryview(data).nbytes

    def add_sample(self, key: str, header: bytes, features: torch.Tensor, caption: bytes, metadata: bytes) -> None:
        """One sample; `features` is a contiguous CPU tensor matching `header`, written from its memory."""
        data = features.view(torch.uint8).numpy()
        size = len(header) + data.nbytes
        self._write(tar_member_header(f"{key}.{FEATURES_MEMBER}", size) + header)
        self._write(data)
        self._write(
            b"".join(
                (
                    _padding(size),
                    tar_member_header(f"{key}.txt", len(caption)),
                    caption,
                    _padding(len(caption)),
                    tar_member_header(f"{key}.json", len(metadata)),
                    metadata,
                    _padding(len(metadata)),
                )
            )
        )
        self.samples += 1

    def close(self) -> dict:
        """End the archive as tarfile does, make it durable, rename it; returns samples, bytes and sha256."""
        self._write(b"\0" * (2 * _TAR_BLOCK))
        self._write(b"\0" * (-self.bytes % _TAR_RECORD))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temporary_path, self.path)
        return {"samples": self.samples, "bytes": self.bytes, "sha256": self._sha256.hexdigest()}

    def abandon(self) -> None:
        self._file.close()


def tar_member_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file: mode 0644, owner 0:0 with no names, mtime 0.

    Written here rather than by `tarfile` so the bytes do not depend on the Python version, and because
    `TarInfo.tobuf` costs ~50 us, three times per sample. Names over 100 bytes take a PAX header from `tarfile`.
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "", ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    # The checksum is the byte sum of the header with its own field as eight spaces, which the template holds.
    checksum = _USTAR_TEMPLATE_SUM + sum(encoded) + sum(size_field)
    template = _USTAR_TEMPLATE
    return b"".join(
        (
            encoded,
            bytes(100 - len(encoded)),
            template[100:124],
            size_field,
            template[136:148],
            b"%06o\0 " % checksum,
            template[156:],
        )
    )


def _ustar_template() -> bytes:
    header = bytearray(_TAR_BLOCK)
    header[100:108] = b"%07o\0" % 0o644  # mode
    header[108:116] = b"%07o\0" % 0  # uid
    header[116:124] = b"%07o\0" % 0  # gid
    header[136:148] = b"%011o\0" % 0  # mtime
    header[148:156] = b" " * 8  # checksum, filled per member
    header[156:157] = tarfile.REGTYPE
    header[257:265] = tarfile.POSIX_MAGIC  # "ustar\0" + version "00"
    return bytes(header)


_USTAR_TEMPLATE = _ustar_template()
_USTAR_TEMPLATE_SUM = sum(_USTAR_TEMPLATE)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % _TAR_BLOCK)


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts what passes through, for checking a shard in one pass."""

    def __init__(self, stream):
        self._stream = stream
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._stream.readinto(buffer)
        self.sha256.update(memoryview(buffer)[:count])
        self.bytes += count
        return count


def check_feature_shard(path: str, record: dict) -> list[str]:
    """Problems of one feature shard against its manifest record, one phrase per kind; [] when it is sound.

    One pass over the file: the tar is parsed from the same bytes that are hashed.
    """
    problems = _Problems()
    samples, keys = 0, set()
    with open(path, "rb") as raw:
        stream = _HashingReader(raw)
        try:
            with tarfile.open(fileobj=io.BufferedReader(stream, 1 << 20), mode="r|") as archive:
                key, members = None, {}
                for info in archive:
                    directory, _, name = info.name.rpartition("/")
                    stem, _, extension = name.partition(".")
                    member_key = f"{directory}/{stem}" if directory else stem
                    if key is not None and member_key != key:
                        _check_sample(key, members, record, problems)
                        samples, members = samples + 1, {}
                        keys.add(key)
                    key = member_key
                    members[extension] = archive.extractfile(info).read()
                    archive.members = []
                if key is not None:
                    _check_sample(key, members, record, problems)
                    samples += 1
                    keys.add(key)
        except (tarfile.TarError, OSError, EOFError) as error:
            problems.add("unreadable", f"unreadable tar after {samples} samples ({describe_error(error)})")
        while stream.read(1 << 20):
            pass  # hash what the tar reader left: the end-of-archive padding, or the rest after an error
    if stream.bytes != record["bytes"]:
        problems.add("bytes", f"{stream.bytes} bytes, the manifest says {record['bytes']}")
    digest = stream.sha256.hexdigest()
    if digest != record["sha256"]:
        problems.add("sha256", f"sha256 {digest[:12]}... differs from the manifest's {record['sha256'][:12]}...")
    if samples != record["samples"]:
        problems.add("samples", f"{samples} samples, the manifest says {record['samples']}")
    if len(keys) != samples:
        problems.add("keys", f"{samples - len(keys)} repeated sample keys")
    return problems.lines()


class _Problems:
    """Problems by kind: the first example and a count, so 10,000 bad samples make one line, not 10,000."""

    def __init__(self):
        self._first: dict[str, str] = {}
        self._counts: dict[str, int] = {}

    def add(self, kind: str, message: str) -> None:
        self._first.setdefault(kind, message)
        self._counts[kind] = self._counts.get(kind, 0) + 1

    def lines(self) -> list[str]:
        return [
            message if self._counts[kind] == 1 else f"{message} (and {self._counts[kind] - 1} more samples)"
            for kind, message in self._first.items()
        ]


def _check_sample(key: str, members: dict[str, bytes], record: dict, problems: _Problems) -> None:
    missing = [name for name in (FEATURES_MEMBER, "txt", "json") if name not in members]
    if missing:
        problems.add("members", f"sample {key} lacks {', '.join(missing)}")
        return
    try:
        features = decode_features(members[FEATURES_MEMBER])
    except ValueError as error:
        problems.add("parse", f"sample {key}: {error}")
        return
    dtype = str(features.dtype).removeprefix("torch.")
    if dtype != record["dtype"]:
        problems.add("dtype", f"sample {key} has {dtype} features, the manifest says {record['dtype']}")
    if list(features.shape) != record["shape"]:
        problems.add(
            "shape", f"sample {key} has features of shape {list(features.shape)}, the manifest says {record['shape']}"
        )
    if not torch.isfinite(features).all():
        problems.add("finite", f"sample {key} has NaN or infinite features")
