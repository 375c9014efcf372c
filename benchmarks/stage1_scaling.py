"""Weak scaling of stage 1 over 1, 2, 4 GPUs of one host, through the user's launch path (launch/stage1_local.sh).

It writes, under --work (local disk):
  llm/     LLaMA-3-8B (released config values) with random weights, bf16, plus the toy tokenizer (ids < 128256)
  clip/    CLIP ViT-L/14 with random weights and its 224 px image processor
  shards/  synthetic img2dataset-layout shards: 224 px JPEGs with LAION-like caption lengths
then runs `launch/stage1_local.sh configs/stage1_8b.yaml` with NPROC = 1, 2, 4 at a fixed micro batch and
accumulation (the recipe's 8 by default, as on one 8-GPU node; the global batch grows with the GPU count) and reads
samples/s per GPU from each run's metrics.jsonl, averaging the second half of the steps (after start-up and
compilation). Efficiency = per-GPU rate at N GPUs / per-GPU rate at 1 GPU.

    python benchmarks/stage1_scaling.py --work /tmp/scaling --gpus 1 2 4 --micro-batch 32 --accumulation 8 --steps 10
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_models(work: Path) -> None:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM

    from pipeline.model.reference import clip_vit_l14_config, llama3_8b_config
    from pipeline.toy.models import build_tokenizer, toy_vocabulary

    if not (work / "llm" / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda"):
            llm = LlamaForCausalLM(llama3_8b_config()).to(torch.bfloat16)
        llm.save_pretrained(work / "llm")
        del llm
        build_tokenizer(work / "llm", toy_vocabulary())
    if not (work / "clip" / "config.json").is_file():
        CLIPVisionModel(clip_vit_l14_config()).to(torch.bfloat16).save_pretrained(work / "clip")
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
            work / "clip"
        )


def write_shards(work: Path, shards: int, per_shard: int) -> None:
    from PIL import Image

    from pipeline.toy.world import vocabulary

    out = work / "shards"
    if out.is_dir() and len(list(out.glob("*.tar"))) == shards:
        return
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = [w for w in vocabulary() if w.isalpha()]
    for shard in range(shards):
        with tarfile.open(out / f"{shard:05d}.tar", "w") as tar:
            for index in range(per_shard):
                key = f"{shard:05d}{index:04d}"
                image = Image.new("RGB", (256, 256), tuple(rng.randrange(256) for _ in range(3)))
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=85)
                length = max(3, min(63, round(rng.lognormvariate(2.77, 0.5))))
                caption = " ".join(rng.choice(words) for _ in range(length))
                for ext, payload in (("jpg", buffer.getvalue()), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def run(work: Path, gpus: int, micro: int, accumulation: int, steps: int, attn: str, compile_layers: bool) -> dict:
    run_dir = work / f"run_{gpus}gpu"
    env = {**os.environ, "NPROC": str(gpus), "MASTER_PORT": str(29600 + gpus)}
    subprocess.run(
        [
            str(ROOT / "launch/stage1_local.sh"),
            "configs/stage1_8b.yaml",
            f"run_dir={run_dir}",
            f"model.vision.model={work / 'clip'}",
            f"model.llm.model={work / 'llm'}",
            f"model.llm.attn_implementation={attn}",
            f"model.llm.compile_layers={str(compile_layers).lower()}",
            f"data.sources=[{{shards: '{work}/shards/*.tar'}}]",
            "data.val_shards=",
            "data.num_workers=6",
            f"train.micro_batch_size={micro}",
            f"train.global_batch_size={micro * gpus * accumulation}",
            f"train.max_steps={steps}",
            "train.log_every_steps=1",
            "train.save_every_steps=100000",
            "train.eval_every_steps=0",
            "logging.wandb_mode=disabled",
            "logging.sample_every_steps=0",
            "optim.warmup_steps=1",
        ],
        check=True,
        cwd=ROOT,
        env=env,
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if "samples_per_s_per_gpu" in r and r["step"] > steps // 2]
    return {
        "gpus": gpus,
        "samples_per_s_per_gpu": sum(r["samples_per_s_per_gpu"] for r in steady) / len(steady),
        "data_wait_frac": sum(r["data_wait_frac"] for r in steady) / len(steady),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in steady),
        "steps_averaged": [r["step"] for r in steady],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/anymal_scaling")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--accumulation", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--attn", default="varlen")
    parser.add_argument("--compile-layers", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    work = Path(args.work)
    write_models(work)
    write_shards(work, shards=32, per_shard=400)
    import torch

    rows = [
        run(work, g, args.micro_batch, args.accumulation, args.steps, args.attn, args.compile_layers) for g in args.gpus
    ]
    base = rows[0]["samples_per_s_per_gpu"]
    for row in rows:
        row["efficiency"] = row["samples_per_s_per_gpu"] / base
    result = {
        "device": torch.cuda.get_device_name(),
        "micro_batch": args.micro_batch,
        "accumulation": args.accumulation,
        "attn": args.attn,
        "compile_layers": args.compile_layers,
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
