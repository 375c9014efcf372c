"""The SigLIP + Qwen3 pair through the real entry points, switched by config alone: the feature-caching job with the
SigLIP tower, stage 1 from its cached features (Qwen3 has no BOS), stage 2 on images with LoRA on every Linear layer
of the decoder and Qwen3's chat template, `pipeline.chat` on the result; and training from features cached with
another tower refused with one line before anything loads."""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import run_module, write_caption_shards
from families import build_tiny_llm, build_tiny_siglip

from pipeline.config import VisionConfig
from pipeline.prep.feature_cache import cache_features
from pipeline.prep.instruct_shards import convert
from pipeline.toy import instruct, world
from pipeline.toy.models import build_tiny_clip

ROOT = Path(__file__).resolve().parents[1]


def run(module: str, *args: str, returncode: int = 0) -> subprocess.CompletedProcess:
    proc = run_module(module, *args)
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def common_overrides(run_dir: Path, models: dict, shards: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"model.vision.model={models['siglip']}",
        f"model.llm.model={models['qwen3']}",
        f"data.sources=[{{shards: '{shards}'}}]",
        "data.val_shards=",
        "data.num_workers=1",
        "data.shuffle_buffer=10",
        "train.micro_batch_size=4",
        "train.global_batch_size=4",
        "train.max_steps=3",
        "train.log_every_steps=1",
        "train.save_every_steps=100",
        "train.eval_every_steps=0",
        "logging.wandb_mode=disabled",
        "logging.sample_every_steps=0",
        "optim.warmup_steps=1",
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("siglip_qwen3")
    models = {
        "siglip": build_tiny_siglip(root / "siglip"),
        "clip": build_tiny_clip(root / "clip"),
        "qwen3": build_tiny_llm("qwen3", root / "qwen3"),
    }
    shards = write_caption_shards(root / "shards", n_shards=2, per_shard=12)
    for tower in ("siglip", "clip"):
        vision = VisionConfig(model=str(models[tower]), feature_layer=-2, dtype="float32")
        cache_features(
            vision,
            [str(s) for s in shards],
            root / f"features_{tower}",
            dtype="float32",
            batch_size=8,
            progress=False,
            device=None,
        )
    world.write_toy_world(root / "world", n_train=24, n_val=2, seed=0)
    source = instruct.write_llava_json(root / "world", "train", root / "llava_train.json")
    convert(source, root / "world", root / "conversations", shard_size=12, workers=1)
    return {"root": root, "models": models}


@pytest.mark.slow
def test_siglip_and_qwen3_train_both_stages_and_chat_by_config_alone(data):
    root, models = data["root"], data["models"]
    manifest = json.loads((root / "features_siglip" / "manifest" / "00000.tar.json").read_text())
    assert manifest["shape"] == [64, 96] and manifest["tower"]["family"] == "siglip"
    stage1 = root / "stage1"
    run(
        "pipeline.train",
        "--config",
        "configs/toy.yaml",
        *common_overrides(stage1, models, f"{root}/features_siglip/*.tar"),
        "data.input=features",
    )
    losses = [json.loads(line)["loss"] for line in (stage1 / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert json.loads((stage1 / "export" / "resampler.json").read_text())["resampler"]["vision_width"] == 96

    stage2 = root / "stage2"
    run(
        "pipeline.train_stage2",
        "--config",
        "configs/toy_stage2.yaml",
        *common_overrides(stage2, models, f"{root}/conversations/*.tar"),
        f"model.stage1_resampler={stage1}",
        "model.lora.r=4",
        "model.lora.target_modules=[all-linear]",
    )
    assert (stage2 / "FINISHED").is_file()
    adapter = json.loads((stage2 / "export" / "adapter" / "adapter_config.json").read_text())
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == projections
    assert not any("lm_head" in name for name in adapter["target_modules"])
    image = root / "world" / "images" / "val" / "000000.jpg"
    chat = run(
        "pipeline.chat", str(stage2), "--image", str(image), "--question", "what shape ?", "--max-new-tokens", "3"
    )
    assert chat.returncode == 0 and "Traceback" not in chat.stderr


@pytest.mark.slow
def test_training_refuses_features_cached_with_another_tower(data):
    root, models = data["root"], data["models"]
    proc = run(
        "pipeline.train",
        "--config",
        "configs/toy.yaml",
        *common_overrides(root / "refused", models, f"{root}/features_clip/*.tar"),
        "data.input=features",
        returncode=2,
    )
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: ") and "holds features of" in line and "tower and hidden state and shape" in line
    assert "[65, 128]" in line and "[64, 96]" in line and not (root / "refused" / "metrics.jsonl").exists()
