"""Must-show (d): user mistakes fail fast, before any process group, with one line naming the problem."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, gradient_accumulation_steps, load_config

ROOT = Path(__file__).resolve().parents[1]


def run_train(*overrides, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--config", "configs/toy.yaml", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return proc, time.monotonic() - started


@pytest.mark.parametrize(
    "overrides, env_extra, expected",
    [
        (["train.global_batch_size=100"], None, "train.global_batch_size=100"),
        ([], {"WORLD_SIZE": "3", "RANK": "0"}, "world size (3)"),
        # The 8B recipe's micro batch on 4 nodes of 8 GPUs: the message names the micro batch that fits.
        (
            ["train.global_batch_size=2048", "train.micro_batch_size=128"],
            {"WORLD_SIZE": "32", "RANK": "0"},
            "train.micro_batch_size=64 (accumulation 1)",
        ),
        (["data.sources=[{shards: /nonexistent/laion/{00000..00009}.tar}]"], None, "/nonexistent/laion/"),
        (["optim.lrr=1e-4"], None, "optim.lrr"),
        (["model.visoin.model=x"], None, "model.visoin"),
    ],
    ids=[
        "batch-not-divisible",
        "batch-not-divisible-by-world",
        "recipe-micro-on-32-gpus",
        "shards-match-nothing",
        "unknown-key",
        "unknown-section",
    ],
)
def test_cli_fails_fast_with_one_line(overrides, env_extra, expected, tmp_path):
    proc, seconds = run_train(f"run_dir={tmp_path}/run", *overrides, env_extra=env_extra)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert seconds < 5, f"took {seconds:.1f} s"
    assert not (tmp_path / "run").exists(), "nothing may be written before the config is valid"


def test_overrides_are_typed_and_validated():
    config = load_config(ROOT / "configs/stage1_8b.yaml", ["optim.lr=1e-4", "train.micro_batch_size=16"])
    assert config.optim.lr == 1e-4 and config.train.micro_batch_size == 16
    assert gradient_accumulation_steps(config, 8) == 16
    assert gradient_accumulation_steps(config, 64) == 2
    with pytest.raises(ConfigError, match="'train.max_steps' must be int"):
        load_config(ROOT / "configs/stage1_8b.yaml", ["train.max_steps=lots"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ROOT / "configs/nope.yaml")


def test_recipes_resolve():
    real = load_config(ROOT / "configs/stage1_8b.yaml")
    assert real.train.global_batch_size == 2048 and real.optim.lr == 2e-4 and real.train.max_steps == 100_000
    assert real.model.resampler.width is None and real.model.resampler.num_latents == 64
    toy = load_config(ROOT / "configs/toy.yaml")
    assert toy.train.distributed_backend == "gloo" and toy.train.precision == "float32"
