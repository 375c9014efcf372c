"""Stage 2 through its real entry points on tiny models and toy conversation shards (converted from LLaVA format):
a resumed run reproduces the uninterrupted run's losses, the finished run exports and writes FINISHED, and
`python -m pipeline.eval --task vqa` scores it on toy VQA files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_module

from pipeline.prep.instruct_shards import convert
from pipeline.toy import instruct, world

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stage2_data")
    world.write_toy_world(root / "world", n_train=48, n_val=8, seed=0)
    source = instruct.write_llava_json(root / "world", "train", root / "llava_train.json")
    convert(source, root / "world", root / "shards", shard_size=12, workers=2)
    vqa = instruct.write_vqa_files(root / "world", "val", root / "vqa", per_image=2)
    return {"shards": root / "shards", "vqa": vqa}


def run(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = run_module(module, *args, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train(run_dir: Path, models: Path, shards: Path, *extra: str, resume: bool = False):
    args = ["--resume", str(run_dir)] if resume else ["--config", "configs/toy_stage2.yaml", f"run_dir={run_dir}"]
    overrides = (
        []
        if resume
        else [
            f"model.vision.model={models}/clip",
            f"model.llm.model={models}/llm",
            "model.stage1_resampler=",
            f"data.sources=[{{shards: '{shards}/*.tar'}}]",
            "data.val_shards=",
            "data.num_workers=2",
            "data.shuffle_buffer=10",
            "train.micro_batch_size=4",
            "train.global_batch_size=8",
            "train.max_steps=6",
            "train.log_every_steps=1",
            "train.save_every_steps=100",
            "train.eval_every_steps=0",
            "train.record_sample_keys=true",
            "logging.wandb_mode=disabled",
            "logging.sample_every_steps=0",
            "optim.warmup_steps=2",
            "model.lora.r=8",
        ]
    )
    return run("pipeline.train_stage2", *args, *overrides, *extra)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_models, conversations, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stage2_runs")
    straight, resumed = root / "straight", root / "resumed"
    train(straight, tiny_models, conversations["shards"])
    train(resumed, tiny_models, conversations["shards"], "train.stop_after_steps=3")
    stopped = {
        "checkpoint": (resumed / "checkpoints" / "step_00000003" / "COMPLETE").is_file(),
        "export": (resumed / "export").exists(),
        "finished": (resumed / "FINISHED").exists(),
    }
    train(resumed, tiny_models, conversations["shards"], "train.stop_after_steps=0", resume=True)
    return {"straight": straight, "resumed": resumed, "stopped": stopped}


@pytest.mark.slow
def test_resumed_stage2_run_reproduces_the_uninterrupted_losses(runs):
    straight, resumed = runs["straight"], runs["resumed"]
    assert runs["stopped"] == {"checkpoint": True, "export": False, "finished": False}
    losses = {r["step"]: r["loss"] for r in read_jsonl(straight / "metrics.jsonl")}
    resumed_losses = {r["step"]: r["loss"] for r in read_jsonl(resumed / "metrics.jsonl")}
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1]
    for step in range(1, 7):  # LoRA dropout draws from the restored RNG: the same masks, the same losses
        assert resumed_losses[step] == losses[step], step
    keys = read_jsonl(straight / "logs" / "keys_rank_00000.jsonl")
    assert keys == read_jsonl(resumed / "logs" / "keys_rank_00000.jsonl")
    for run_dir in (straight, resumed):
        assert (run_dir / "FINISHED").read_text().strip() == "6"
        export = run_dir / "export"
        assert json.loads((export / "manifest.json").read_text())["step"] == 6
        assert (export / "adapter" / "adapter_model.safetensors").is_file()
    adapters = [
        (run_dir / "export" / "adapter" / "adapter_model.safetensors").read_bytes() for run_dir in (straight, resumed)
    ]
    assert adapters[0] == adapters[1]


@pytest.mark.slow
def test_eval_entry_point_scores_toy_vqa_on_a_stage2_run(runs, conversations, tmp_path):
    vqa = conversations["vqa"]
    out = tmp_path / "vqa"
    args = [
        "--run",
        str(runs["straight"]),
        "--task",
        "vqa",
        "--questions",
        str(vqa["questions"]),
        "--annotations",
        str(vqa["annotations"]),
        "--images",
        str(vqa["images"]),
        "--image-pattern",
        vqa["image_pattern"],
        "--out",
        str(out),
        "--batch-size",
        "5",
        "--max-new-tokens",
        "4",
    ]
    run("pipeline.eval", *args)
    metrics = json.loads((out / "metrics.json").read_text())
    answers = read_jsonl(out / "answers.jsonl")
    assert metrics["task"] == "vqa" and metrics["n"] == len(answers) == 16
    assert metrics["fingerprint"]["adapter_sha256"]
    assert metrics["accuracy"] == pytest.approx(100 * sum(a["accuracy"] for a in answers) / 16, abs=0.01)
    assert len(json.loads((out / "predictions.json").read_text())) == 16
    assert "toy_caption" in run_error(
        "pipeline.eval",
        "--run",
        str(runs["straight"]),
        "--task",
        "toy_caption",
        "--shards",
        str(conversations["shards"] / "*.tar"),
        "--out",
        str(tmp_path / "c"),
    )


def run_error(module: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    return proc.stderr
