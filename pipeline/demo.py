"""`make demo`: the whole stage-1 pipeline on the toy world, on a CPU, with no weights and no internet.

    toy images → loopback HTTP → img2dataset shards → tiny CLIP + tiny pretrained Llama (save_pretrained)
    → DeepSpeed ZeRO-2 stage 1 on 2 CPU ranks (gloo) → greedy captions of held-out images → summary.json

Every step runs the production code path: img2dataset downloads over HTTP, the models load through
`from_pretrained`, and training starts through `launch/stage1_local.sh` exactly as on a GPU node.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("pipeline.demo")
ROOT = Path(__file__).resolve().parents[1]


def download_shards(world_dir: Path, shard_root: Path, split: str, base_url: str, shard_size: int) -> Path:
    from pipeline.toy.world import write_url_parquet

    parquet = write_url_parquet(world_dir, split, base_url, world_dir / f"{split}_urls.parquet")
    out = shard_root / split
    subprocess.run(
        ["bash", str(ROOT / "data_prep/img2dataset.sh"), "--input", str(parquet), "--output", str(out),
         "--image-size", "64", "--processes", "2", "--threads", "8", "--shard-size", str(shard_size)],
        check=True, stdout=subprocess.DEVNULL,
    )
    return out


def train_stage1(run_dir: Path, models: dict, shard_root: Path, overrides: list[str]) -> None:
    env = {**os.environ, "NPROC": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(
        [str(ROOT / "launch/stage1_local.sh"), "configs/toy.yaml", f"run_dir={run_dir}",
         f"model.vision.model={models['clip']}", f"model.llm.model={models['llm']}",
         f"data.sources=[{{shards: '{shard_root}/train/*.tar'}}]", f"data.val_shards={shard_root}/val/*.tar",
         *overrides],
        check=True, cwd=ROOT, env=env,
    )


def evaluate_stage1(run_dir: Path, shard_root: Path) -> dict:
    from pipeline.data.shards import expand_shards
    from pipeline.evaluation.benchmarks import evaluate_toy_captions
    from pipeline.evaluation.loading import load_run

    model, tokenizer, config = load_run(run_dir)
    shards = expand_shards(f"{shard_root}/val/*.tar", "demo val shards")
    return evaluate_toy_captions(model, tokenizer, config, shards, run_dir / "eval" / "toy_caption")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the toy world end to end.")
    parser.add_argument("--out", default="runs/demo", help="demo directory (recreated)")
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("--lm-seconds", type=float, default=60.0, help="pretraining time of the tiny LM")
    parser.add_argument("overrides", nargs="*", help="stage-1 config overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s demo: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pipeline.toy.http_server import serve_directory
    from pipeline.toy.models import build_toy_models
    from pipeline.toy.world import write_toy_world

    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    timings = {}
    started = time.monotonic()

    log.info("writing the toy world: %d train, %d held-out images", args.train_images, args.val_images)
    world_dir = out / "world"
    write_toy_world(world_dir, args.train_images, args.val_images, seed=0)

    log.info("downloading it with img2dataset from a loopback HTTP server")
    base_url, stop_server = serve_directory(world_dir)
    try:
        shard_root = out / "shards"
        download_shards(world_dir, shard_root, "train", base_url, shard_size=500)
        download_shards(world_dir, shard_root, "val", base_url, shard_size=500)
    finally:
        stop_server()
    timings["data_s"] = time.monotonic() - started

    log.info("building the tiny CLIP and pretraining the tiny Llama for %.0f s", args.lm_seconds)
    mark = time.monotonic()
    models = build_toy_models(out / "models", world_dir, lm_seconds=args.lm_seconds, seed=0)
    timings["models_s"] = time.monotonic() - mark

    log.info("stage 1: DeepSpeed ZeRO-2 on 2 CPU ranks")
    mark = time.monotonic()
    run_dir = out / "stage1"
    train_stage1(run_dir, models, shard_root, args.overrides)
    timings["stage1_train_s"] = time.monotonic() - mark

    log.info("captioning the held-out images")
    scores = evaluate_stage1(run_dir, shard_root)
    scores = {k.replace("colour", "color"): v for k, v in scores.items()}
    timings["total_s"] = time.monotonic() - started
    summary = {"stage1": {**scores, "input": "images", "run_dir": str(run_dir)}, "timings": timings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
