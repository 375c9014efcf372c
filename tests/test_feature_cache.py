"""Cached CLIP features: the caching job, its restart and `verify`, and stage 1 trained from its shards.

Tiny CLIP (64 px, [65, 128] features) and toy-world shards from conftest; the job runs in-process where only its
output matters, and as `python -m pipeline.prep.feature_cache` where it is killed and restarted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import add_member, run_module, three_step_overrides, write_caption_shards

from pipeline.config import load_config
from pipeline.data.captions import CaptionDecoder, collate_captions, iterate_eval_batches
from pipeline.data.features import (
    FEATURES_MEMBER,
    FeatureDecoder,
    decode_features,
    expected_feature_shape,
    features_header,
)
from pipeline.data.shards import DataError
from pipeline.data.skips import SkipSample
from pipeline.prep.feature_cache import cache_features, main, rank_and_world

ROOT = Path(__file__).resolve().parents[1]
PER_SHARD = 48  # enough for the kill below to land while shard 1 is being written
BATCH = 4


def toy_config(models: Path, *overrides: str):
    return load_config(
        ROOT / "configs" / "toy.yaml",
        [f"model.vision.model={models}/clip", f"model.llm.model={models}/llm", *overrides],
    )


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> Path:
    """Three toy shards of 48 samples, and a fourth with 3 good samples, a corrupt JPEG and an empty caption."""
    root = tmp_path_factory.mktemp("images")
    paths = write_caption_shards(root, n_shards=3, per_shard=PER_SHARD)
    with tarfile.open(root / "00003.tar", "w") as tar, tarfile.open(paths[0]) as good:
        members = good.getmembers()
        for member in members[:9]:
            add_member(tar, "3" + member.name, good.extractfile(member).read())
        add_member(tar, "bad_jpeg.jpg", b"\xff\xd8\xff\xe0 not a jpeg")
        add_member(tar, "bad_jpeg.txt", b"a small red circle")
        add_member(tar, "empty_caption.jpg", good.extractfile(members[0]).read())
        add_member(tar, "empty_caption.txt", b"  ")
    return root


@pytest.fixture(scope="module")
def cached(tiny_models, image_shards, tmp_path_factory) -> Path:
    """An uninterrupted run of the job (float16, the default), in this process with one thread, like the CLI below."""
    out = tmp_path_factory.mktemp("cached") / "features"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = cache_features(
            toy_config(tiny_models).model.vision,
            sorted(map(str, image_shards.glob("*.tar"))),
            out,
            batch_size=BATCH,
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    assert result["shards_cached"] == 4 and result["images"] == 3 * PER_SHARD + 3
    return out


def files_and_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_loss_and_gradients_from_features_equal_those_from_images(tiny_models, tmp_path):
    config = toy_config(tiny_models)
    shard = write_caption_shards(tmp_path / "images", n_shards=1, per_shard=8)[0]
    # float32 storage is for exactly this comparison; a different batch size than training's shows it does not matter.
    cache_features(
        config.model.vision, [str(shard)], tmp_path / "features", dtype="float32", batch_size=3, progress=False
    )
    from transformers import AutoTokenizer

    from pipeline.model.anymal import build_anymal

    images = CaptionDecoder(config.model.vision.model, config.model.llm.model, config.model.max_caption_tokens)
    features = FeatureDecoder(
        config.model.llm.model, config.model.max_caption_tokens, expected_feature_shape(config.model.vision.model)
    )
    image_batch = next(iterate_eval_batches([str(shard)], images, collate_captions, 8, 0, 1))
    feature_batch = next(
        iterate_eval_batches([str(tmp_path / "features" / "00000.tar")], features, collate_captions, 8, 0, 1)
    )
    assert feature_batch["keys"] == image_batch["keys"]
    assert torch.equal(feature_batch["caption_ids"], image_batch["caption_ids"])
    assert feature_batch["image_features"].shape == (8, 65, 128)
    assert feature_batch["image_features"].dtype == torch.float32

    torch.manual_seed(0)
    model = build_anymal(config.model, AutoTokenizer.from_pretrained(config.model.llm.model))
    model.freeze_for_stage1()

    def loss_and_gradients(batch):
        model.zero_grad(set_to_none=True)
        loss, _ = model.caption_loss(batch)
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in model.resampler.named_parameters()}

    image_loss, image_grads = loss_and_gradients(image_batch)
    feature_loss, feature_grads = loss_and_gradients(feature_batch)
    assert math.isfinite(image_loss) and image_loss > 0
    assert abs(feature_loss - image_loss) / image_loss <= 1e-5
    assert image_grads.keys() == feature_grads.keys() and len(image_grads) > 10
    for name, image_grad in image_grads.items():
        assert image_grad.norm() > 0, name
        assert (feature_grads[name] - image_grad).norm() / image_grad.norm() <= 1e-5, name


def test_float16_cache_holds_a_bfloat16_towers_output(tiny_models, tmp_path):
    """The default float16 storage loses nothing of a bfloat16 tower's output above 2^-17 (7 of bf16's 8 mantissa
    bits fit float16's 10), and at most half a float16 subnormal step (2^-25) below."""
    config = toy_config(tiny_models, "model.vision.dtype=bfloat16")
    shard = write_caption_shards(tmp_path / "images", n_shards=1, per_shard=8)[0]
    cache_features(config.model.vision, [str(shard)], tmp_path / "features", batch_size=8, progress=False)
    decoder = FeatureDecoder(config.model.llm.model, config.model.max_caption_tokens)
    cached = next(iterate_eval_batches([str(tmp_path / "features" / "00000.tar")], decoder, collate_captions, 8, 0, 1))
    images = CaptionDecoder(config.model.vision.model, config.model.llm.model, config.model.max_caption_tokens)
    pixels = next(iterate_eval_batches([str(shard)], images, collate_captions, 8, 0, 1))["pixel_values"]
    from pipeline.model.vision import load_vision_tower

    tower_output = load_vision_tower(config.model.vision)(pixels)
    assert tower_output.dtype == torch.bfloat16 and cached["image_features"].dtype == torch.float16
    stored, exact = cached["image_features"].float(), tower_output.float()
    assert (stored - exact).abs().max() <= 2**-25
    normal = exact.abs() >= 2**-17
    assert normal.float().mean() > 0.99 and torch.equal(stored[normal], exact[normal])


def test_bad_samples_are_skipped_counted_and_shards_keep_input_order(cached, image_shards):
    record = json.loads((cached / "manifest" / "00003.tar.json").read_text())
    assert record["samples"] == 3 and record["records_read"] == 5
    skipped = record["skipped"]
    assert skipped["corrupt_image"] == 1 and skipped["empty_caption"] == 1 and sum(skipped.values()) == 2
    assert skipped["nonfinite_features"] == 0 and "bad_tar" in skipped
    assert record["dtype"] == "float16" and record["shape"] == [65, 128] and record["feature_layer"] == -2
    with tarfile.open(cached / "00001.tar") as features, tarfile.open(image_shards / "00001.tar") as images:
        feature_names = features.getnames()
        assert [n.split(".")[0] for n in feature_names[::3]] == [n.split(".")[0] for n in images.getnames()[::3]]
        member = features.getmember(feature_names[0])
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (0, 0, 0, "", "")
        first = features.extractfile(feature_names[0]).read()
        metadata = json.loads(features.extractfile(feature_names[2]).read())
    assert decode_features(first).shape == (65, 128)
    assert metadata["attrs"] and metadata["feature_cache"]["source_shard"] == "00001.tar"
    # A standard safetensors file: any reader loads it.
    from safetensors.torch import load

    assert torch.equal(load(first)["features"], decode_features(first))


def test_killed_job_resumes_to_byte_identical_output(tiny_models, image_shards, cached, tmp_path):
    out = tmp_path / "features"
    command = [
        sys.executable,
        "-m",
        "pipeline.prep.feature_cache",
        "run",
        "--config",
        "configs/toy.yaml",
        "--shards",
        f"{image_shards}/*.tar",
        "--out",
        str(out),
        "--batch-size",
        str(BATCH),
        "--num-workers",
        "1",
        "--writer-threads",
        "2",
        "--no-progress",
        f"model.vision.model={tiny_models}/clip",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        env.pop(name, None)
    job = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    first_complete, second_partial = out / "manifest" / "00000.tar.json", out / "00001.tar.tmp"
    deadline = time.monotonic() + 120
    while not (first_complete.exists() and second_partial.exists()):
        assert job.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.002)
    os.killpg(job.pid, signal.SIGKILL)  # the job and its decode worker, all of this test's own session
    job.wait()
    assert not (out / "00001.tar").exists() and not (out / "manifest" / "00001.tar.json").exists()
    completed = (out / "00000.tar").stat()

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 of its 4 shards are already cached; caching 3" in rerun.stderr
    again = (out / "00000.tar").stat()
    assert (again.st_ino, again.st_mtime_ns) == (completed.st_ino, completed.st_mtime_ns), "shard 0 was recomputed"
    assert files_and_bytes(out) == files_and_bytes(cached)


def test_verify_names_each_damaged_shard(cached, tmp_path, capsys):
    out = tmp_path / "features"
    shutil.copytree(cached, out)
    assert main(["verify", str(out), "--workers", "1"]) == 0
    capsys.readouterr()

    truncated = (out / "00000.tar").read_bytes()
    (out / "00000.tar").write_bytes(truncated[: len(truncated) // 2])
    changed = bytearray((out / "00001.tar").read_bytes())
    changed[512 + 8 + int.from_bytes(changed[512:520], "little") + 100] ^= 0x01  # one bit of sample 0's features
    (out / "00001.tar").write_bytes(changed)
    with tarfile.open(cached / "00002.tar") as source, tarfile.open(out / "00002.tar", "w") as rewritten:
        dropped = source.getnames()[3 * 5].split(".")[0]
        for member in source.getmembers():
            if not member.name.startswith(dropped + "."):
                rewritten.addfile(member, source.extractfile(member))
    # NaN in shard 3, with a manifest that matches the damaged file: only the content check can catch it.
    nan = bytearray((out / "00003.tar").read_bytes())
    start = 512 + 8 + int.from_bytes(nan[512:520], "little")
    nan[start : start + 2] = torch.tensor([float("nan")], dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    (out / "00003.tar").write_bytes(nan)
    manifest = out / "manifest" / "00003.tar.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "sha256": hashlib.sha256(nan).hexdigest()}))

    assert main(["verify", str(out), "--workers", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    by_shard = {
        name: [line for line in lines if line.startswith(name + ": ")]
        for name in ("00000.tar", "00001.tar", "00002.tar", "00003.tar")
    }
    assert any("bytes, the manifest says" in line for line in by_shard["00000.tar"])
    assert any("unreadable tar" in line or "samples, the manifest says" in line for line in by_shard["00000.tar"])
    assert len(by_shard["00001.tar"]) == 1 and "sha256" in by_shard["00001.tar"][0]
    assert any(f"{PER_SHARD - 1} samples, the manifest says {PER_SHARD}" in line for line in by_shard["00002.tar"])
    with tarfile.open(cached / "00003.tar") as shard:
        first_key = shard.getnames()[0].split(".")[0]
    assert by_shard["00003.tar"] == [f"00003.tar: sample {first_key} has NaN or infinite features"]
    assert lines[-1] == f"verify: {sum(map(len, by_shard.values()))} problems"


def test_feature_decoder_skips_unusable_features():
    decoder = FeatureDecoder("unused", 8, expected_shape=(3, 4))
    good = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    member = features_header(good.dtype, (3, 4)) + good.numpy().tobytes()
    assert torch.equal(decoder.decode_image(member)["image_features"], good)
    bf16 = torch.ones(3, 4, dtype=torch.bfloat16)
    assert (
        decoder.decode_image(features_header(bf16.dtype, (3, 4)) + bf16.view(torch.uint8).numpy().tobytes())[
            "image_features"
        ].dtype
        == torch.bfloat16
    )
    nan = good.clone()
    nan[1, 2] = float("nan")
    wrong_shape = torch.zeros(4, 3, dtype=torch.float16)
    for bad in (
        features_header(nan.dtype, (3, 4)) + nan.numpy().tobytes(),
        member[:-2],
        b"\x01",
        features_header(wrong_shape.dtype, (4, 3)) + wrong_shape.numpy().tobytes(),
    ):
        with pytest.raises(SkipSample) as skipped:
            decoder.decode_image(bad)
        assert skipped.value.reason == "corrupt_image"
    assert FeatureDecoder.image_members == (FEATURES_MEMBER,)


def test_rank_and_world_from_arguments_and_environment():
    assert rank_and_world(3, 8, env={}) == (3, 8)
    assert rank_and_world(None, None, env={}) == (0, 1)
    assert rank_and_world(None, None, env={"RANK": "5", "WORLD_SIZE": "16", "SLURM_PROCID": "0"}) == (5, 16)
    assert rank_and_world(None, None, env={"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "4"}) == (2, 4)
    array = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "10"}
    assert rank_and_world(None, None, env=array) == (6, 10)
    assert rank_and_world(None, None, env={**array, "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "8"}) == (49, 80)
    # In the batch step of an 8-task allocation (no srun), SLURM_NTASKS=8 must not make this rank 0 of 8.
    assert rank_and_world(None, None, env={"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == (0, 1)
    with pytest.raises(DataError):
        rank_and_world(8, 8, env={})
    with pytest.raises(DataError):
        rank_and_world(1, None, env={})


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["none", "nf4"])
def test_stage1_trains_from_cached_features(tiny_models, cached, tmp_path, weights):
    """Stage 1 on cached features, over the frozen LLM in its dtype or in 4-bit NF4: the tower never loads."""
    run_dir = tmp_path / "run"
    overrides = three_step_overrides(
        run_dir, tiny_models, cached, "data.input=features", f"model.llm.quantization={weights}", global_batch=8
    )
    proc = run_module("pipeline.train", "--config", "configs/toy.yaml", *overrides)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    assert "LLM " in output and "vision tower" not in output  # the LLM was logged loading; the tower never loaded
    assert ("nf4 weights" in output) == (weights == "nf4")
    assert (run_dir / "export" / "resampler.safetensors").is_file()


def test_verify_reports_interrupted_and_missing_shards(cached, image_shards, tmp_path, capsys):
    out = tmp_path / "features"
    shutil.copytree(cached, out)
    (out / "00001.tar").rename(out / "00001.tar.tmp")
    (out / "manifest" / "00002.tar.json").unlink()
    extra = image_shards.parent / "more_images"
    extra.mkdir(exist_ok=True)
    for name in ("00000.tar", "00004.tar"):
        shutil.copy(image_shards / "00000.tar", extra / name)
    assert main(["verify", str(out), "--workers", "1", "--shards", f"{extra}/*.tar"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "00001.tar.tmp: partial output of an interrupted run; rerun the job" in lines
    assert "00001.tar: in the manifest but not on disk; rerun the job" in lines
    assert "00002.tar: no manifest record, so it may be incomplete; rerun the job" in lines
    assert "00004.tar: not cached yet; run the job" in lines
    assert not any(line.startswith("00000.tar") or line.startswith("00003.tar") for line in lines)


def test_sample_metadata_json_keeps_the_source_and_is_deterministic():
    from pipeline.prep.feature_encoding import sample_metadata

    entry = {"model": "m", "dtype": "float16"}
    source = json.dumps({"url": "http://x/1.jpg", "key": "000000001", "width": 256}).encode()
    made = sample_metadata(source, "000000001", entry)
    assert made == sample_metadata(source, "000000001", dict(reversed(entry.items())))
    assert json.loads(made) == {"url": "http://x/1.jpg", "key": "000000001", "width": 256, "feature_cache": entry}
    assert json.loads(sample_metadata(None, "k", entry)) == {"key": "k", "feature_cache": entry}
    assert json.loads(sample_metadata(b"not json", "k", entry))["source_metadata_unreadable"] is True
