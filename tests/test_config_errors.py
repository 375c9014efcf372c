"""User mistakes in configs, paths and data fail before anything slow (model load, process group), with exit
status 2 and one `error:` line that names the key, file or shard, and nothing written.

Every case runs the real entry point on inputs that are valid but for the one mistake: tiny models saved with
`save_pretrained`, image-caption shards, a feature shard and a run directory under tmp.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import add_member, three_step_overrides, write_caption_shards

from pipeline.config import ConfigError, gradient_accumulation_steps, load_config
from pipeline.training.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tiny_models, tmp_path_factory) -> dict:
    """Paths of valid inputs: models, two image shards, one feature shard, a DeepSpeed JSON with a managed key."""
    import tarfile

    root = tmp_path_factory.mktemp("inputs")
    write_caption_shards(root / "images", n_shards=2, per_shard=4)
    (root / "features").mkdir()
    with tarfile.open(root / "features" / "00000.tar", "w") as tar:
        add_member(tar, "k0.features.safetensors", b"not read by the checks")
        add_member(tar, "k0.txt", b"a small red circle on a blue background")
    ds = json.loads((ROOT / "ds_configs/zero2_stage1.json").read_text())
    (root / "managed.json").write_text(json.dumps({**ds, "train_batch_size": 8}))
    (root / "a_file").write_text("")
    return {"models": tiny_models, "root": root}


def base_overrides(inputs: dict, run_dir: Path) -> list[str]:
    models, root = inputs["models"], inputs["root"]
    return [*three_step_overrides(run_dir, models, root / "images"), "logging.sample_shards="]


def run_entry(args: list[str], module: str = "pipeline.train", env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if name not in (env_extra or {}):
            env.pop(name, None)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120
    )
    return proc, time.monotonic() - started


# (id, overrides added to a valid stage-1 run (R = the inputs' root, M = the models), env, text the line contains)
CASES = [
    ("batch-not-divisible", ["train.global_batch_size=6"], None, "train.global_batch_size=6"),
    ("batch-not-divisible-by-world", [], {"WORLD_SIZE": "3", "RANK": "0"}, "world size (3)"),
    (
        "recipe-micro-on-32-gpus",
        ["train.global_batch_size=2048", "train.micro_batch_size=128"],
        {"WORLD_SIZE": "32", "RANK": "0"},
        "train.micro_batch_size=64 (accumulation 1)",
    ),
    ("unknown-key", ["optim.lrr=1e-4"], None, "unknown config key 'optim.lrr'"),
    ("unknown-section", ["model.visoin.model=x"], None, "model.visoin"),
    ("wrong-type", ["train.max_steps=lots"], None, "'train.max_steps' must be int"),
    ("override-not-yaml", ["data.sources=[{shards: /x/{0..9}.tar}]"], None, "is not valid YAML"),
    ("override-without-equals", ["optim.lr"], None, "must look like key.subkey=value"),
    ("negative-warmup", ["optim.warmup_steps=-1"], None, "'optim.warmup_steps' must be >= 0"),
    ("negative-shuffle-buffer", ["data.shuffle_buffer=-5"], None, "'data.shuffle_buffer' must be >= 0"),
    ("negative-grad-clip", ["optim.grad_clip=-1"], None, "'optim.grad_clip' must be >= 0"),
    ("negative-weight-decay", ["optim.weight_decay=-0.1"], None, "'optim.weight_decay' must be >= 0"),
    ("beta-not-below-one", ["optim.betas=[0.9, 1.5]"], None, "'optim.betas[1]' must be in [0, 1)"),
    ("nan-learning-rate", ["optim.lr=.nan"], None, "'optim.lr' must be positive, got nan"),
    ("zero-log-interval", ["train.log_every_steps=0"], None, "'train.log_every_steps' must be positive"),
    ("zero-pixel-cap", ["data.max_image_pixels=0"], None, "'data.max_image_pixels' must be positive"),
    ("unknown-backend", ["train.distributed_backend=mpi"], None, "must be nccl or gloo"),
    ("shards-match-nothing", ["data.sources=[{shards: '/nonexistent/laion/{00000..00009}.tar'}]"], None, "matches no"),
    ("reversed-brace-range", ["data.sources=[{shards: 'R/images/{00001..00000}.tar'}]"], None, "runs backwards"),
    (
        "brace-range-with-missing-shards",
        ["data.sources=[{shards: 'R/images/{00000..00009}.tar'}]"],
        None,
        "8 of the 10 paths",
    ),
    ("val-shards-match-nothing", ["data.val_shards=/nonexistent/val/*.tar"], None, "'data.val_shards'"),
    ("sample-shards-match-nothing", ["logging.sample_shards=/nonexistent/s/*.tar"], None, "'logging.sample_shards'"),
    ("more-readers-than-shards", ["data.num_workers=3"], None, "has 2 shards but 3 readers"),
    ("features-input-on-image-shards", ["data.input=features"], None, "data.input=features reads cached features"),
    (
        "image-input-on-feature-shards",
        ["data.sources=[{shards: 'R/features/*.tar'}]", "data.num_workers=1"],
        None,
        "set data.input=features",
    ),
    ("llm-path-missing", ["model.llm.model=/no/llama"], None, "model.llm.model '/no/llama' was read as a local path"),
    ("vision-path-missing", ["model.vision.model=./no/clip"], None, "model.vision.model './no/clip' was read as a"),
    ("model-dir-without-config", ["model.llm.model=R/images"], None, "has no config.json"),
    ("not-a-model-name", ["model.vision.model=not a model!"], None, "neither an existing directory nor a hub id"),
    (
        "hub-id-offline-not-cached",
        ["model.llm.model=meta-llama/No-Such-Model"],
        {"HF_HUB_OFFLINE": "1"},
        "read as a hub id; it is not in the Hugging Face cache",
    ),
    ("feature-layer-out-of-range", ["model.vision.feature_layer=-9"], None, "model.vision.feature_layer=-9"),
    ("run-dir-under-a-file", ["run_dir=R/a_file/run"], None, "is a file, not a directory"),
    ("run-dir-unwritable", ["run_dir=/proc/anymal-run"], None, "cannot be written"),
    ("nccl-without-gpus", ["train.distributed_backend=nccl"], None, "train.distributed_backend=nccl needs GPUs"),
    ("deepspeed-json-missing", ["train.deepspeed_config=ds_configs/nope.json"], None, "'ds_configs/nope.json' does"),
    ("deepspeed-json-managed-key", ["train.deepspeed_config=R/managed.json"], None, "sets 'train_batch_size'"),
    ("stage-2-config-in-stage-1", ["stage=2"], None, "train it with python -m pipeline.train_stage2"),
]


@pytest.mark.parametrize("overrides, env_extra, expected", [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_mistake_fails_fast_with_one_line(inputs, overrides, env_extra, expected, tmp_path):
    root = str(inputs["root"])
    run_dir = tmp_path / "run"
    args = ["--config", "configs/toy.yaml", *base_overrides(inputs, run_dir)]
    args += [override.replace("R/", f"{root}/") for override in overrides]
    proc, seconds = run_entry(args, env_extra=env_extra)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    print(f"\n{seconds:.2f} s, exit {proc.returncode}: {lines[-1] if lines else ''}")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert seconds < 30, f"took {seconds:.1f} s"
    assert not run_dir.exists(), "nothing may be written before the run is known to be valid"


def test_stage_2_on_caption_shards_is_named(inputs, tmp_path):
    """Stage 2 pointed at stage-1 caption shards says so, before any model loads."""
    overrides = [*base_overrides(inputs, tmp_path / "run"), "model.stage1_resampler=", "data.num_workers=1"]
    proc, _ = run_entry(["--config", "configs/toy_stage2.yaml", *overrides], module="pipeline.train_stage2")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: ") and "caption shards of stage 1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_config_file_is_named(tmp_path):
    proc, _ = run_entry(["--config", "configs/nope.yaml"])
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: config file 'configs/nope.yaml' does not exist; pass one from configs/, e.g. configs/toy.yaml"
    )


def test_valid_base_passes_the_checks(inputs, tmp_path):
    """The inputs every mistake above is made on pass the checks, so each case fails for its own reason."""
    config = load_config(ROOT / "configs/toy.yaml", base_overrides(inputs, tmp_path / "run"))
    preflight(config, world_size=1)
    assert not (tmp_path / "run").exists()


def test_missing_shards_are_allowed_when_asked(inputs, tmp_path, caplog):
    spec = f"data.sources=[{{shards: '{inputs['root']}/images/{{00000..00009}}.tar'}}]"
    config = load_config(
        ROOT / "configs/toy.yaml", [*base_overrides(inputs, tmp_path / "run"), spec, "data.allow_missing_shards=true"]
    )
    preflight(config, world_size=1)
    assert "8 of the paths" in caplog.text


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
