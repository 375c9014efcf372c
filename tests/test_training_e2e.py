"""Exact resume, partial checkpoints cleared at resume, and bad data skipped and counted while training goes on.

Runs the real entry point (`python -m pipeline.train`) on tiny models and toy shards, with two data-loader workers
so that resume must restore the worker rotation as well as the shuffle buffers.
"""

import io
import json
import tarfile
from pathlib import Path

import pytest
from conftest import add_member, run_module, write_caption_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards_with_bad_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    # Few shards, so that both readers reach the bad ones within the 10 steps whatever the shuffle order.
    paths = write_caption_shards(root, n_shards=2, per_shard=24)
    # Shard 00004: a corrupt JPEG and an empty caption among good samples.
    with tarfile.open(root / "00004.tar", "w") as tar:
        good = tarfile.open(paths[0])
        for member in good.getmembers()[:30]:
            renamed = "9" + member.name
            add_member(tar, renamed, good.extractfile(member).read())
        add_member(tar, "bad_jpeg.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg")
        add_member(tar, "bad_jpeg.txt", b"a small red circle on a blue background")
        add_member(tar, "empty_caption.jpg", good.extractfile(good.getmembers()[0]).read())
        add_member(tar, "empty_caption.txt", b"   ")
    # Shard 00005: truncated mid-member, as an interrupted copy leaves it.
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        source = tarfile.open(paths[1])
        for member in source.getmembers():
            add_member(tar, "8" + member.name, source.extractfile(member).read())
    # Cut inside the data of a member halfway through (cuts in and at headers: tests/test_data.py).
    middle = tarfile.open(fileobj=io.BytesIO(whole.getvalue())).getmembers()[len(source.getmembers()) // 2]
    (root / "00005.tar").write_bytes(whole.getvalue()[: middle.offset_data + middle.size // 2])
    return root


def train(run_dir: Path, models: Path, shards: Path, *extra: str, resume: bool = False):
    args = ["--resume", str(run_dir)] if resume else ["--config", "configs/toy.yaml", f"run_dir={run_dir}"]
    overrides = (
        []
        if resume
        else [
            f"model.vision.model={models}/clip",
            f"model.llm.model={models}/llm",
            f"data.sources=[{{shards: '{shards}/*.tar'}}]",
            "data.val_shards=",
            "data.num_workers=2",
            "data.shuffle_buffer=20",
            "train.micro_batch_size=4",
            "train.global_batch_size=8",
            "train.max_steps=10",
            "train.log_every_steps=1",
            "train.save_every_steps=100",
            "train.eval_every_steps=0",
            "train.record_sample_keys=true",
            "logging.wandb_mode=disabled",
            "optim.warmup_steps=2",
        ]
    )
    proc = run_module("pipeline.train", *args, *overrides, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(tiny_models, shards_with_bad_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, tiny_models, shards_with_bad_data)
    train(resumed, tiny_models, shards_with_bad_data, "train.stop_after_steps=4")
    assert (resumed / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    assert not (resumed / "export").exists(), "a stopped run is not finished"
    # What a rank killed mid-write leaves: checkpoint folders without COMPLETE, before and after the newest one.
    for step in (2, 6):
        (resumed / "checkpoints" / f"step_{step:08d}").mkdir()
        (resumed / "checkpoints" / f"step_{step:08d}" / "rank_00000.pt").write_bytes(b"partial")
    train(resumed, tiny_models, shards_with_bad_data, "train.stop_after_steps=0", resume=True)
    left = sorted(path.name for path in (resumed / "checkpoints").glob("step_*"))
    assert left == ["step_00000004", "step_00000010"], left

    losses = {r["step"]: r["loss"] for r in read_jsonl(straight / "metrics.jsonl")}
    resumed_losses = {r["step"]: r["loss"] for r in read_jsonl(resumed / "metrics.jsonl")}
    assert sorted(losses) == list(range(1, 11))
    for step in range(5, 11):
        assert resumed_losses[step] == losses[step], step
    keys = {r["step"]: r["keys"] for r in read_jsonl(straight / "logs" / "keys_rank_00000.jsonl")}
    resumed_keys = {r["step"]: r["keys"] for r in read_jsonl(resumed / "logs" / "keys_rank_00000.jsonl")}
    assert all(len(keys[s]) == 8 for s in keys)
    for step in range(1, 11):
        assert resumed_keys[step] == keys[step], step
    assert (resumed / "export" / "resampler.safetensors").is_file()

    # (c) the corrupt JPEG, the empty caption and the truncated tar were met, skipped, counted; training finished.
    final = read_jsonl(straight / "metrics.jsonl")[-1]
    assert final["step"] == 10
    seen = set().union(*(keys.values()))
    assert "bad_jpeg" not in seen and "empty_caption" not in seen
    skipped = {k: v for k, v in final.items() if k.startswith("skipped/")}
    assert skipped["skipped/corrupt_image"] >= 1
    assert skipped["skipped/empty_caption"] >= 1
    assert skipped["skipped/bad_tar"] >= 1
